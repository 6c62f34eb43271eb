"""Standard errors of the evaluation's figures, from per-example scores.

- A mean over examples (exact match, agreement, KL): the sample standard deviation (ddof 1) over sqrt(n).
- A ratio of sums (token accuracy: right tokens / scored tokens, summed over examples): the examples are the
  independent units, not the tokens, so its error is the clustered (linearised) one,
  sqrt(n / (n - 1) * sum_i (r_i - p t_i)^2) / sum_i t_i.
- Two methods scored on the same examples: the error of their difference from the paired differences, which is
  smaller than the two errors combined whenever the methods succeed and fail on the same examples.
"""

from __future__ import annotations

import numpy as np


def mean_se(values) -> tuple[float, float]:
  x = np.asarray(values, np.float64)
  if x.size == 0:
    raise ValueError("no examples to average")
  se = float(x.std(ddof=1) / np.sqrt(x.size)) if x.size > 1 else float("nan")
  return float(x.mean()), se


def ratio_se(num, den) -> tuple[float, float]:
  """sum(num) / sum(den) and its clustered standard error (one cluster per example)."""
  r, t = np.asarray(num, np.float64), np.asarray(den, np.float64)
  if r.shape != t.shape or r.size == 0:
    raise ValueError(f"need as many numerators as denominators, at least one; got {r.shape} and {t.shape}")
  total = t.sum()
  if total <= 0:
    return float("nan"), float("nan")
  p = r.sum() / total
  n = r.size
  se = float(np.sqrt(n / (n - 1) * np.sum((r - p * t) ** 2)) / total) if n > 1 else float("nan")
  return float(p), se


def estimate(values, den=None) -> tuple[float, float]:
  """(value, standard error) of a metric from its per-example scores (and denominators for a ratio metric)."""
  return mean_se(values) if den is None else ratio_se(values, den)


def paired_difference(a, b, den=None) -> tuple[float, float]:
  """(metric of a - metric of b, its standard error) for two methods scored on the same examples."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape:
    raise ValueError(f"paired scores need the same examples; got {a.shape} and {b.shape}")
  return estimate(a - b, den)
