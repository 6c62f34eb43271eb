"""The evaluation report: the closing comparisons computed from its rows, and its markdown table.

report.json: `tasks` (metric names); `results`, one per method: method, aux (absent for the base), label,
settings (if any), ttft_flops / ttft_flops_paper (at the mean length of all prompts), ttft_flops_by_task /
ttft_flops_paper_by_task (keyed qa, qa_2hop, code), metrics (metric -> [0, 1]), eval_s, spec; `gap_recovered`
(aux -> metric -> share of the aux-to-base gap, null where there is no gap); `equal_flops`; `rivals` (each
rival row against KV Prediction at no more FLOPs and at the nearest FLOPs); `kv_error`
(kvp label -> per-layer K and V L1 error); `prompt_len_mean`; `config`; `env`.
"""

from __future__ import annotations

from pathlib import Path

from kvp_jax.evaluation.tasks import TASK_OF_METRIC
from kvp_jax.models import checkpoints

# Rows compared against the base to get "the aux-to-base gap": the aux model alone, else the pruned model alone.
BASELINE_METHODS = ("aux_only", "lp_alone")
# Other ways to cut TTFT (kvp_jax/baselines/), each set side by side with KV Prediction at its FLOPs.
RIVAL_METHODS = ("swiftkv", "specprefill", "gemfilter")


def gap_recovered(results: list[dict]) -> dict[str, dict[str, float | None]]:
  """Per aux and metric: (kvp - aux alone) / (base - aux alone), for the plain kvp rows (no settings).

  'aux alone' is the aux_only row of that aux, else its lp_alone row; None where base equals it.
  """
  base = next((r for r in results if r["method"] == "base"), None)
  out = {}
  for r in results:
    if r["method"] != "kvp" or r.get("settings") or base is None:
      continue
    ref = next((b for m in BASELINE_METHODS for b in results if b["method"] == m and b.get("aux") == r["aux"]
                and not b.get("settings")), None)
    if ref is None:
      continue
    out[r["aux"]] = {}
    for t in r["metrics"]:
      den = base["metrics"][t] - ref["metrics"][t]
      out[r["aux"]][t] = None if abs(den) < 1e-12 else (r["metrics"][t] - ref["metrics"][t]) / den
  return out


def equal_flops(results: list[dict]) -> list[dict]:
  """For every kvp row and metric: its value, its own aux alone (the paper's equal FLOPs), and the best of base /
  aux_only / lp_alone spending at most the kvp row's TTFT FLOPs (ours)."""
  baselines = [r for r in results if r["method"] in ("base",) + BASELINE_METHODS and not r.get("settings")]
  out = []
  for r in results:
    if r["method"] != "kvp":
      continue
    ref = next((b for b in baselines if b["method"] in BASELINE_METHODS and b.get("aux") == r["aux"]), None)
    for t, v in r["metrics"].items():
      task = TASK_OF_METRIC[t]
      f = r["ttft_flops_by_task"][task]
      cheaper = [b for b in baselines if b["ttft_flops_by_task"][task] <= f]
      best = max(cheaper, key=lambda b: b["metrics"][t], default=None)
      out.append({"label": r["label"], "aux": r["aux"], "metric": t, "kvp": v, "ttft_flops": f,
                  "aux_alone": None if ref is None else ref["metrics"][t],
                  "aux_alone_method": None if ref is None else ref["method"],
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


def markdown(report: dict) -> str:
  """The main table (one row per method), then the closing figures: equal-FLOPs comparison and gap recovered."""
  tasks, rows = report["tasks"], report["results"]
  base = next((r for r in rows if r["method"] == "base"), None)
  lines = [f"TTFT FLOPs per prompt at the mean prompt length ({report['prompt_len_mean_all']:.0f} tokens); "
           "speed-up = base FLOPs / method FLOPs (ours).", "",
           "| method | aux | settings | TTFT GFLOPs (ours) | TTFT GFLOPs (paper) | speed-up | "
           + " | ".join(tasks) + " |", "|" + "---|" * (6 + len(tasks))]
  for r in rows:
    settings = ",".join(f"{k}={v}" for k, v in r.get("settings", {}).items()) or "-"
    speed = f"{base['ttft_flops'] / r['ttft_flops']:.2f}x" if base else "-"
    lines.append(f"| {r['method']} | {r.get('aux', '-')} | {settings} | {r['ttft_flops'] / 1e9:.4g} | "
                 f"{r['ttft_flops_paper'] / 1e9:.4g} | {speed} | "
                 + " | ".join(_fmt(r["metrics"].get(t)) for t in tasks) + " |")
  eq = report.get("equal_flops", [])
  if eq:
    lines += ["", "At equal TTFT FLOPs: KV Prediction, its aux alone (equal FLOPs as the paper counts them), and "
              "the best of base / aux alone / LP alone spending no more FLOPs than it (ours).", "",
              "| kvp | metric | kvp | aux alone | best baseline at <= FLOPs |", "|---|---|---|---|---|"]
    for e in eq:
      best = "-" if e["best_baseline_label"] is None else (
          f"{_fmt(e['best_baseline_at_most_flops'])} ({e['best_baseline_label']})")
      alone = "-" if e["aux_alone"] is None else f"{_fmt(e['aux_alone'])} ({e['aux_alone_method']})"
      lines.append(f"| {e['label']} | {e['metric']} | {_fmt(e['kvp'])} | {alone} | {best} |")
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
