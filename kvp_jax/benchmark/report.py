"""The benchmark's target figures, its terminal table and its plot, from the bench.json object alone."""

from __future__ import annotations

from typing import Any

from kvp_jax.benchmark.methods import settings_label


def figures(result: dict) -> dict[str, Any]:
  """The issues' target figures, from the rows (None where the rows needed were not measured)."""
  rows = [r for r in result["rows"] if r["method"] != "matmul"]
  out: dict[str, Any] = {}
  eff = [r["speedup_over_ideal"] for r in rows if r["method"] == "kvp" and r["prompt_len"] >= 512]
  out["kvp_speedup_over_ideal_min_T_ge_512"] = min(eff) if eff else None
  base = {(r["prompt_len"], r["batch"]): r for r in rows if r["method"] == "base"}
  for b in sorted({r["batch"] for r in rows}):
    ratios = [r["jax_over_torch_ttft"] for r in rows if r["method"] == "hf_torch" and r["batch"] == b]
    out[f"jax_over_torch_ttft_max_batch{b}"] = max(ratios) if ratios else None
  frac = [r["fraction_of_matmul_peak"] for r in base.values() if r["prompt_len"] >= 1024]
  out["base_prefill_fraction_of_matmul_peak_min_T_ge_1024"] = min(frac) if frac else None
  dev, paired = [], []
  for r in rows:
    if r["method"] == "kvp" and "tpot_s_median" in r:
      own = base[(r["prompt_len"], r["batch"])]["tpot_s_median"]
      dev.append(r["tpot_s_median"] / own - 1)
      paired.append(r["tpot_over_own_paired_median"] - 1)
  out["tpot_predicted_over_own_minus_1_max_abs"] = max(map(abs, dev)) if dev else None  # ratio of medians
  out["tpot_paired_ratio_minus_1_max_abs"] = max(map(abs, paired)) if paired else None  # median of step ratios
  # Issue 14: TTFT against the roofline, decode at B=8 against B=1, and the peers.
  for meth in ("base", "kvp"):
    x = [r["ttft_over_roofline"] for r in rows if r["method"] == meth and r["prompt_len"] >= 512
         and "ttft_over_roofline" in r]
    out[f"{meth}_ttft_over_roofline_max_T_ge_512"] = max(x) if x else None
  out["base_tpot_b8_over_b1_max"] = _b8_over_b1(rows, "base", "tpot_s_median")
  out["kvp_base_step_b8_over_b1_max"] = _b8_over_b1(rows, "kvp", "kvp_base_step_s_median")
  for b in sorted({r["batch"] for r in rows}):
    x = [base[(r["prompt_len"], b)]["tpot_s_median"] / r["tpot_s_median"] for r in rows
         if r["method"] == "hf_torch" and r["batch"] == b and "tpot_s_median" in r and (r["prompt_len"], b) in base]
    out[f"jax_over_torch_tpot_max_batch{b}"] = max(x) if x else None
  for b in sorted({r["batch"] for r in rows if r["method"] == "onnxruntime"}):
    out[f"jax_over_onnxruntime_ttft_max_batch{b}"] = max(
        r["jax_over_onnxruntime_ttft"] for r in rows if r["method"] == "onnxruntime" and r["batch"] == b)
  llama = {r["prompt_len"]: r for r in rows if r["method"] == "llama_cpp" and r["batch"] == 1}
  for r in rows:
    if r["method"] == "kvp" and r["batch"] == 1 and r["prompt_len"] >= 512 and r["prompt_len"] in llama:
      key = f"kvp_{r['aux']}_over_llama_cpp_ttft_max_T_ge_512"
      ratio = r["ttft_s_median"] / llama[r["prompt_len"]]["ttft_s_median"]
      out[key] = max(out.get(key) or 0.0, ratio)
  return out


def _b8_over_b1(rows: list[dict], method: str, field: str) -> float | None:
  """Largest ratio of a field at batch 8 over batch 1 at the same prompt length (first row of `method` each)."""
  by = {}
  for r in rows:
    if r["method"] == method and field in r:
      by.setdefault((r["prompt_len"], r["batch"]), r[field])
  x = [by[(T, 8)] / by[(T, 1)] for (T, b) in by if b == 8 and (T, 1) in by]
  return max(x) if x else None


def table(result: dict) -> str:
  """A fixed-width table of the rows for the terminal."""
  hdr = (f"{'method':13s} {'aux':7s} {'B':>2s} {'T':>5s} {'ttft_med':>9s} {'min':>8s} {'max':>8s} {'comp_s':>6s} "
         f"{'GFLOP':>8s} {'GF/s':>6s} {'%peak':>5s} {'x/ideal':>7s} {'x/roof':>6s} {'tpot_ms':>7s} {'mem_MB':>7s} "
         "settings")
  lines = [hdr]
  for r in result["rows"]:
    if r["method"] == "matmul":
      continue
    f = lambda k, fmt, scale=1.0: (fmt.format(r[k] * scale) if r.get(k) is not None else "-")
    lines.append(
        f"{r['method']:13s} {str(r['aux'] or '-'):7s} {r['batch']:>2d} {r['prompt_len']:>5d} "
        f"{f('ttft_s_median', '{:9.4f}'):>9s} {f('ttft_s_min', '{:8.4f}'):>8s} {f('ttft_s_max', '{:8.4f}'):>8s} "
        f"{f('compile_s', '{:6.1f}'):>6s} {f('flops', '{:8.2f}', 1e-9):>8s} "
        f"{f('achieved_flops_per_s', '{:6.1f}', 1e-9):>6s} {f('fraction_of_matmul_peak', '{:5.2f}'):>5s} "
        f"{f('speedup_over_ideal', '{:7.2f}'):>7s} {f('ttft_over_roofline', '{:6.2f}'):>6s} "
        f"{f('tpot_s_median', '{:7.2f}', 1e3):>7s} "
        f"{f('peak_mem_bytes', '{:7.0f}', 2 ** -20):>7s} {settings_label(r['method'], r.get('settings'))}")
  lines.append(f"matmul peak (median over all rounds): {result['matmul_peak_flops_per_s'] / 1e9:.1f} GFLOP/s")
  if "read_bandwidth_bytes_per_s" in result:
    lines.append(f"read bandwidth (median over all rounds): {result['read_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s")
  for peer, status in (result.get("peers") or {}).items():
    if status:
      lines.append(f"{peer}: {status}")
  if "torch_matmul_peak_flops_per_s" in result:
    lines.append(f"torch matmul peak, same shape, same rounds: {result['torch_matmul_peak_flops_per_s'] / 1e9:.1f} GFLOP/s")
  lines += [f"{k}: {v}" for k, v in result["figures"].items()]
  return "\n".join(lines)


def plot(result: dict, path) -> bool:
  """TTFT against prompt length per method (one panel per batch size); False where matplotlib is missing."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return False
  rows = [r for r in result["rows"] if r["method"] != "matmul"]
  batches = sorted({r["batch"] for r in rows})
  fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.5), squeeze=False)
  for ax, b in zip(axes[0], batches):
    lab = lambda r: (r["method"], r["aux"] or "", settings_label(r["method"], r.get("settings")))
    for meth, aux, st in sorted({lab(r) for r in rows if r["batch"] == b}):
      pts = sorted((r["prompt_len"], r["ttft_s_median"]) for r in rows if r["batch"] == b and lab(r) == (meth, aux, st))
      ax.plot(*zip(*pts), marker="o", label=" ".join(x for x in (meth, aux, st) if x))
    ax.set(xscale="log", yscale="log", xlabel="prompt length (tokens)", ylabel="TTFT median (s)",
           title=f"batch {b}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True
