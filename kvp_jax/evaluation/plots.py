"""The evaluation's figures, drawn from report.json's plain data alone (so they can be redrawn without
rerunning eval, and this module imports nothing of the runner).

- pareto.png: accuracy against TTFT FLOPs (ours), one point per method with its standard error, one panel per
  metric (fidelity to the base included); each method kind has its own marker, points are labelled with their
  aux, and kvp variants (settings) are open markers.
- kv_error.png: per base layer, the mean L1 error of the predicted K and V against the base's own cache.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402

STYLE = {"base": ("k", "*"), "aux_only": ("tab:blue", "s"), "lp_alone": ("tab:green", "^"),
         "kvp": ("tab:red", "o")}
FALLBACK_MARKERS = "DPXvp<>h"


def _style(method: str, seen: dict) -> tuple[str, str]:
  if method not in STYLE:
    i = seen.setdefault(method, len(seen))
    return f"C{(i + 4) % 10}", FALLBACK_MARKERS[i % len(FALLBACK_MARKERS)]
  return STYLE[method]


def _point_label(r: dict) -> str:
  """The aux name, plus the varied settings for a kvp ablation row (other methods' settings are in the legend)."""
  label = r.get("aux", "")
  if r["method"] == "kvp" and r.get("settings"):
    label += " " + ",".join(f"{k}={v}" for k, v in r["settings"].items())
  return label


def _open(r: dict) -> bool:
  """A kvp row with settings (an ablation, or the least-squares fit before training: train_steps=0): same method,
  drawn as an open marker."""
  return r["method"] == "kvp" and bool(r.get("settings"))


def _legend_key(r: dict) -> str:
  """Open rows get their own legend entry: a report whose only kvp rows carry settings must still show kvp."""
  return "kvp, settings at the point (open)" if _open(r) else r["method"]


def pareto(report: dict, path, task_of_metric: dict[str, str], unbounded=("first_token_kl",)) -> Path:
  """task_of_metric: metric -> the task key of `ttft_flops_by_task` its x value is read from; `unbounded`: metrics
  not in [0, 1] (drawn on their own scale). Error bars: one standard error, where the report has them."""
  tasks = report["tasks"]
  cols = min(2, len(tasks))
  rows = -(-len(tasks) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 4.4 * rows), squeeze=False)
  seen, handles = {}, {}
  for ax, t in zip(axes.flat, tasks):
    for r in report["results"]:
      if t not in r["metrics"]:
        continue
      color, marker = _style(r["method"], seen)
      x, y = r["ttft_flops_by_task"][task_of_metric[t]], r["metrics"][t]
      se = r.get("stderr", {}).get(t)
      if se is not None and se == se and se > 0:  # one standard error
        ax.errorbar([x], [y], yerr=[se], fmt="none", ecolor=color, elinewidth=0.8, capsize=2, alpha=0.6, zorder=2)
      h = ax.scatter([x], [y], c="none" if _open(r) else color, edgecolors=color, marker=marker, s=60, zorder=3)
      handles.setdefault(_legend_key(r), h)
      ax.annotate(_point_label(r), (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
    # Zoom to the points when they all sit low (e.g. token accuracy 0.14-0.20): a fixed [0, 1] axis would
    # flatten differences larger than the noise; the axis still starts at 0 so heights compare honestly.
    top = max([r["metrics"][t] + (r.get("stderr", {}).get(t) or 0.0) for r in report["results"]
               if t in r["metrics"]] + [0.0])
    if t in unbounded:  # a divergence (nats): its own scale, lower is better
      hi = max(top * 1.1, 1e-3)
      title = f"{t} (lower is better)"
    else:
      hi = 1.0 if top > 0.5 else max(0.05, 1.25 * top)
      title = t
    n = next((r["n"][t] for r in report["results"] if t in r.get("n", {})), None)
    title += "" if n is None else f", n={n}"
    ax.set(xscale="log", xlabel="TTFT FLOPs per prompt (ours)", ylabel=t, title=title, ylim=(-0.03 * hi, 1.03 * hi))
    ax.grid(True, which="both", alpha=0.3)
  for ax in list(axes.flat)[len(tasks):]:
    ax.axis("off")
  fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(len(handles), 8), fontsize=8)
  fig.tight_layout(rect=(0, 0.05, 1, 1))
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return Path(path)


def kv_error(report: dict, path) -> Path:
  errs = report.get("kv_error", {})
  fig, axes = plt.subplots(1, 2, figsize=(10, 4), squeeze=False)
  for ax, part in zip(axes[0], ("k", "v")):
    for label, e in errs.items():
      ax.plot(range(len(e[part])), e[part], marker="o", label=label)
    ax.set(xlabel="base layer", ylabel=f"mean |{part.upper()}_pred - {part.upper()}_base|",
           title=f"{'keys' if part == 'k' else 'values'}: L1 error of predicted cache")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    if errs:
      ax.legend(fontsize=8)
    else:
      ax.text(0.5, 0.5, "no kvp methods evaluated", ha="center", transform=ax.transAxes)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return Path(path)
