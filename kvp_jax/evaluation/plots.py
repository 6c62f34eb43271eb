"""The evaluation's figures, drawn from report.json's plain data alone (so they can be redrawn without
rerunning eval, and this module imports nothing of the runner).

- pareto.png: accuracy against TTFT FLOPs (ours), one point per method, one panel per task; each method kind
  has its own marker, points are labelled with their aux, and kvp ablation variants are open markers.
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
    label += " " + ",".join(str(v) for v in r["settings"].values())
  return label


def pareto(report: dict, path, task_of_metric: dict[str, str]) -> Path:
  """task_of_metric: metric -> the task key of `ttft_flops_by_task` its x value is read from."""
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
      ablation = r["method"] == "kvp" and bool(r.get("settings"))  # same method, open marker
      h = ax.scatter([x], [y], c="none" if ablation else color, edgecolors=color, marker=marker, s=60, zorder=3)
      if not ablation:
        handles.setdefault(r["method"], h)
      ax.annotate(_point_label(r), (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
    # Zoom to the points when they all sit low (e.g. token accuracy 0.14-0.20): a fixed [0, 1] axis would
    # flatten differences larger than the noise; the axis still starts at 0 so heights compare honestly.
    top = max([r["metrics"][t] for r in report["results"] if t in r["metrics"]] + [0.0])
    hi = 1.0 if top > 0.5 else max(0.05, 1.25 * top)
    ax.set(xscale="log", xlabel="TTFT FLOPs per prompt (ours)", ylabel=t, title=t, ylim=(-0.03 * hi, 1.03 * hi))
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
