"""The evaluation report: the closing comparisons computed from its rows, and its markdown table.

report.json: `tasks` (metric names); `results`, one per method: method, aux (absent for the base), label,
settings (if any), ttft_flops / ttft_flops_paper (at the mean length of all prompts), ttft_flops_by_task /
ttft_flops_paper_by_task (keyed by task: qa, qa_2hop, code, ..., and "all"), metrics (metric -> value),
stderr (metric -> its standard error), n (metric -> examples), per_example (metric -> per-example scores;
for a ratio metric the numerators, with per_example_den the denominators), eval_s, spec; `gap_recovered`
(aux -> metric -> share of the aux-to-base gap, null where there is no gap); `equal_flops`; `rivals` (each
rival row against KV Prediction at no more FLOPs and at the nearest FLOPs); `kv_error`
(kvp label -> per-layer K and V L1 error); `prompt_len_mean`; `config`; `env`.
"""

from __future__ import annotations

from pathlib import Path

from kvp_jax.evaluation import stats
from kvp_jax.evaluation.tasks import LOWER_IS_BETTER, TASK_OF_METRIC
from kvp_jax.models import checkpoints

# Rows compared against the base to get "the aux-to-base gap": the aux model alone, else the pruned model alone.
BASELINE_METHODS = ("aux_only", "lp_alone")
# Other ways to cut TTFT (kvp_jax/baselines/), each set side by side with KV Prediction at its FLOPs.
RIVAL_METHODS = ("swiftkv", "specprefill", "gemfilter")


def _plain(r: dict) -> bool:
  """A main row: no settings but maybe its training steps (a least-squares fit or a pruned model at 0 steps)."""
  return not set(r.get("settings", {})) - {"train_steps"}


def _aux_alone(results: list[dict], r: dict) -> dict | None:
  """r's aux alone: the aux_only row of its aux, else its lp_alone row; of those, the one trained for as many
  steps as r (a kvp fit at 0 steps against the pruned model untrained) when there is one."""
  steps = r.get("settings", {}).get("train_steps")
  refs = [b for m in BASELINE_METHODS for b in results if b["method"] == m and b.get("aux") == r["aux"] and _plain(b)]
  return next((b for b in refs if b.get("settings", {}).get("train_steps") == steps), refs[0] if refs else None)


def gap_recovered(results: list[dict]) -> dict[str, dict[str, float | None]]:
  """Per aux and metric: (kvp - aux alone) / (base - aux alone), for the main kvp row of each aux (the trained
  one; the least-squares fit where nothing was trained).

  'aux alone': see _aux_alone; None where base equals it.
  """
  base = next((r for r in results if r["method"] == "base"), None)
  out = {}
  for r in results:
    if r["method"] != "kvp" or not _plain(r) or base is None or (r.get("settings") and r["aux"] in out):
      continue
    ref = _aux_alone(results, r)
    if ref is None:
      continue
    out[r["aux"]] = {}
    for t in r["metrics"]:
      den = base["metrics"][t] - ref["metrics"][t]
      out[r["aux"]][t] = None if abs(den) < 1e-12 else (r["metrics"][t] - ref["metrics"][t]) / den
  return out


def _paired(r: dict, ref: dict, metric: str) -> tuple[float | None, float | None]:
  """(r - ref, its standard error) on metric from paired per-example scores; None where either lacks them."""
  a, b = r.get("per_example", {}).get(metric), ref.get("per_example", {}).get(metric)
  if a is None or b is None or len(a) != len(b):
    return None, None
  return stats.paired_difference(a, b, r.get("per_example_den", {}).get(metric))


def equal_flops(results: list[dict]) -> list[dict]:
  """For every kvp row and metric: its value, its own aux alone (the paper's equal FLOPs) with the paired
  difference kvp - aux alone and its standard error, the share of the aux-to-base gap it recovers, and the best of
  base / aux_only / lp_alone spending at most the kvp row's TTFT FLOPs (ours; best = lowest for a lower-is-better
  metric)."""
  baselines = [r for r in results if r["method"] in ("base",) + BASELINE_METHODS and _plain(r)]
  base = next((r for r in results if r["method"] == "base"), None)
  out = []
  for r in results:
    if r["method"] != "kvp":
      continue
    ref = _aux_alone(results, r)
    for t, v in r["metrics"].items():
      task = TASK_OF_METRIC[t]
      f = r["ttft_flops_by_task"][task]
      cheaper = [b for b in baselines if b["ttft_flops_by_task"][task] <= f]
      sign = -1 if t in LOWER_IS_BETTER else 1
      best = max(cheaper, key=lambda b: sign * b["metrics"][t], default=None)
      diff, diff_se = (None, None) if ref is None else _paired(r, ref, t)
      gap = None
      if ref is not None and base is not None and abs(base["metrics"][t] - ref["metrics"][t]) > 1e-12:
        gap = (v - ref["metrics"][t]) / (base["metrics"][t] - ref["metrics"][t])
      out.append({"label": r["label"], "aux": r["aux"], "metric": t, "kvp": v, "ttft_flops": f,
                  "kvp_se": r.get("stderr", {}).get(t),
                  "aux_alone": None if ref is None else ref["metrics"][t],
                  "aux_alone_method": None if ref is None else ref["method"],
                  "aux_alone_ttft_flops": None if ref is None else ref["ttft_flops_by_task"][task],
                  "diff_vs_aux_alone": diff, "diff_se": diff_se, "gap_recovered": gap,
                  "best_baseline_at_most_flops": None if best is None else best["metrics"][t],
                  "best_baseline_label": None if best is None else best["label"]})
  return out


def rivals(results: list[dict]) -> list[dict]:
  """For every rival row and metric: its value and TTFT FLOPs, the best KV Prediction row spending no more FLOPs,
  and the KV Prediction row nearest in FLOPs (ratio of FLOPs, rival / kvp)."""
  kvps = [r for r in results if r["method"] == "kvp"]
  out = []
  for r in results:
    if r["method"] not in RIVAL_METHODS:
      continue
    for t, v in r["metrics"].items():
      task = TASK_OF_METRIC[t]
      f = r["ttft_flops_by_task"][task]
      cheaper = [k for k in kvps if k["ttft_flops_by_task"][task] <= f]
      best = max(cheaper, key=lambda k: k["metrics"][t], default=None)
      near = min(kvps, key=lambda k: abs(k["ttft_flops_by_task"][task] / f - 1), default=None)
      out.append({"label": r["label"], "method": r["method"], "metric": t, "value": v, "ttft_flops": f,
                  "best_kvp_at_most_flops": None if best is None else best["metrics"][t],
                  "best_kvp_label": None if best is None else best["label"],
                  "nearest_kvp": None if near is None else near["metrics"][t],
                  "nearest_kvp_label": None if near is None else near["label"],
                  "nearest_kvp_flops_ratio": None if near is None else f / near["ttft_flops_by_task"][task]})
  return out


def write_report(report: dict, out_dir: Path):
  checkpoints.write_json(out_dir / "report.json", report)
  (out_dir / "report.md").write_text(markdown(report) + "\n")


def _fmt(v) -> str:
  return "-" if v is None else f"{v:.3f}"


def _fmt_se(v, se) -> str:
  if v is None:
    return "-"
  return f"{v:.3f}" if se is None or se != se else f"{v:.3f} ± {se:.3f}"  # se != se: NaN (one example)


def _header(tasks: list[str], rows: list[dict]) -> list[str]:
  """Metric names with their number of examples (the same for every row of one evaluation)."""
  out = []
  for t in tasks:
    n = next((r["n"][t] for r in rows if t in r.get("n", {})), None)
    out.append(t if n is None else f"{t} (n={n})")
  return out


def markdown(report: dict) -> str:
  """The main table (one row per method, value ± standard error), then the closing figures: equal-FLOPs
  comparison and gap recovered."""
  tasks, rows = report["tasks"], report["results"]
  base = next((r for r in rows if r["method"] == "base"), None)
  lines = [f"TTFT FLOPs per prompt at the mean prompt length ({report['prompt_len_mean_all']:.0f} tokens); "
           "speed-up = base FLOPs / method FLOPs (ours); each metric as value ± standard error, n examples "
           "(code_token_acc: n files' next lines, the error clustered by example)"
           + ("; first_token_kl in nats, lower is better." if "first_token_kl" in tasks else "."), "",
           "| method | aux | settings | TTFT GFLOPs (ours) | TTFT GFLOPs (paper) | speed-up | "
           + " | ".join(_header(tasks, rows)) + " |", "|" + "---|" * (6 + len(tasks))]
  for r in rows:
    settings = ",".join(f"{k}={v}" for k, v in r.get("settings", {}).items()) or "-"
    speed = f"{base['ttft_flops'] / r['ttft_flops']:.2f}x" if base else "-"
    lines.append(f"| {r['method']} | {r.get('aux', '-')} | {settings} | {r['ttft_flops'] / 1e9:.4g} | "
                 f"{r['ttft_flops_paper'] / 1e9:.4g} | {speed} | "
                 + " | ".join(_fmt_se(r["metrics"].get(t), r.get("stderr", {}).get(t)) for t in tasks) + " |")
  eq = report.get("equal_flops", [])
  if eq:
    paired = any(e.get("diff_vs_aux_alone") is not None for e in eq)
    lines += ["", "At equal TTFT FLOPs: KV Prediction, its aux alone (equal FLOPs as the paper counts them)"
              + (", their paired difference ± its standard error, the share of the aux-to-base gap recovered"
                 if paired else "")
              + ", and the best of base / aux alone / LP alone spending no more FLOPs than it (ours).", "",
              "| kvp | metric | kvp | aux alone |" + (" kvp - aux alone | gap recovered |" if paired else "")
              + " best baseline at <= FLOPs |", "|---|---|---|---|" + ("---|---|" if paired else "") + "---|"]
    for e in eq:
      best = "-" if e["best_baseline_label"] is None else (
          f"{_fmt(e['best_baseline_at_most_flops'])} ({e['best_baseline_label']})")
      alone = "-" if e["aux_alone"] is None else f"{_fmt(e['aux_alone'])} ({e['aux_alone_method']})"
      extra = (f" {_fmt_se(e.get('diff_vs_aux_alone'), e.get('diff_se'))} | {_fmt(e.get('gap_recovered'))} |"
               if paired else "")
      lines.append(f"| {e['label']} | {e['metric']} | {_fmt_se(e['kvp'], e.get('kvp_se'))} | {alone} |{extra} {best} |")
  riv = report.get("rivals", [])
  if riv:
    lines += ["", "Rivals against KV Prediction: the best kvp row spending no more TTFT FLOPs (ours), and the kvp row "
              "nearest in FLOPs (rival FLOPs / its FLOPs).", "",
              "| rival | metric | rival | best kvp at <= FLOPs | nearest kvp (FLOPs ratio) |", "|---|---|---|---|---|"]
    for e in riv:
      best = "-" if e["best_kvp_label"] is None else f"{_fmt(e['best_kvp_at_most_flops'])} ({e['best_kvp_label']})"
      near = "-" if e["nearest_kvp_label"] is None else (
          f"{_fmt(e['nearest_kvp'])} ({e['nearest_kvp_label']}, {e['nearest_kvp_flops_ratio']:.2f}x)")
      lines.append(f"| {e['label']} | {e['metric']} | {_fmt(e['value'])} | {best} | {near} |")
  gap = report.get("gap_recovered", {})
  if gap:
    lines += ["", "Share of the aux-to-base gap KV Prediction recovers, (kvp - aux alone) / (base - aux alone):", "",
              "| aux | " + " | ".join(tasks) + " |", "|" + "---|" * (1 + len(tasks))]
    for aux, g in gap.items():
      lines.append(f"| {aux} | " + " | ".join(_fmt(g.get(t)) for t in tasks) + " |")
  return "\n".join(lines)
