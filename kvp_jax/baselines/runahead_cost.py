"""KV-Runahead on paper: the critical path of the chain for given chunks, chunk balancing, and tensor-parallel
prefill for comparison, from per-chunk compute times and a link model.

Compute: `ChunkCost` says how long one layer takes on one device for a chunk of n tokens whose queries attend
ctx keys (its prefix plus itself): a + b * n + c * n * ctx, fitted (`fit`) to times measured on the real
per-device layer (kvp_jax/benchmark/runahead.py). Communication: `Link` (bandwidth, per-message latency).

The chain, per layer l and device i (kvp_jax/baselines/runahead.py's order): project Q/K/V (a fraction
`qkv_share` of the layer's linear time), wait for the prefix K/V from device i-1, forward prefix + own K/V to
device i+1, then attention and the rest of the layer. Devices do not wait for one another between layers, so
early devices run ahead (hence the name); the prompt's first token comes out when the last device finishes.

Tensor parallelism over p devices: every device runs every token through 1/p of the heads and MLP width
(compute taken as the single-device layer time / p: ideal, which flatters tensor parallelism), then two
all-reduces of the [T, D] activations per layer (ring: 2 (p-1)/p of the bytes over each link, 2 (p-1) latencies).
Times are in whatever unit the costs were measured in; only ratios are reported.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from kvp_jax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class ChunkCost:
  """Seconds of one layer on one device: a + b * n + c * n * ctx (n own tokens, ctx keys attended)."""
  a: float
  b: float
  c: float

  def __call__(self, n, ctx):
    return self.a + self.b * n + self.c * n * ctx

  def linear(self, n):
    return self.a + self.b * n


def fit(points: Sequence[tuple[int, int, float]]) -> ChunkCost:
  """Least-squares ChunkCost through measured (n, ctx, seconds), relative error weighted, coefficients >= 0."""
  n, ctx, t = (np.asarray(v, np.float64) for v in zip(*points))
  A = np.stack([np.ones_like(n), n, n * ctx], 1) / t[:, None]  # relative residuals: small chunks count too
  coef, *_ = np.linalg.lstsq(A, np.ones_like(t), rcond=None)
  if (coef < 0).any():  # refit without the offending terms (a negative overhead or slope is noise)
    keep = coef >= 0
    sub, *_ = np.linalg.lstsq(A[:, keep], np.ones_like(t), rcond=None)
    coef = np.zeros(3)
    coef[keep] = np.maximum(sub, 0)
  return ChunkCost(*map(float, coef))


@dataclasses.dataclass(frozen=True)
class Link:
  bandwidth: float  # bytes per time unit
  latency: float = 0.0  # time units per message

  def send(self, nbytes: float) -> float:
    return self.latency + nbytes / self.bandwidth

  def all_reduce(self, nbytes: float, p: int) -> float:
    return 0.0 if p == 1 else 2 * (p - 1) * self.latency + 2 * (p - 1) / p * nbytes / self.bandwidth


def qkv_share(cfg: ModelConfig) -> float:
  """The Q/K/V projections' share of a layer's matmul FLOPs (what runs before a device can forward its K/V)."""
  D, F, N, K, H = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  qkv = D * (N + 2 * K) * H
  return qkv / (qkv + N * H * D + 3 * D * F)


def kv_bytes_per_token(cfg: ModelConfig, itemsize: int) -> int:
  return 2 * cfg.num_kv_heads * cfg.head_dim * itemsize


def runahead_time(chunks: Sequence[int], layers: int, cost: ChunkCost, link: Link, kv_bytes: float,
                  share: float) -> float:
  """Time until the last device finishes the last layer (see the module doc for the schedule)."""
  chunks = [int(c) for c in chunks]
  offs = np.concatenate([[0], np.cumsum(chunks)])
  free = np.zeros(len(chunks))  # when each device finished its previous layer
  for _ in range(layers):
    arrive = 0.0  # when device i's prefix arrives from device i-1
    for i, n in enumerate(chunks):
      lin = cost.linear(n)
      projected = free[i] + share * lin
      ready = max(projected, arrive) if i else projected
      if i + 1 < len(chunks):
        arrive = ready + link.send(kv_bytes * offs[i + 1])
      free[i] = ready + (1 - share) * lin + cost.c * n * offs[i + 1]
  return float(free[-1])


def tensor_parallel_time(T: int, p: int, layers: int, single_layer_time: float, link: Link,
                         act_bytes_per_token: float) -> float:
  """Tensor-parallel prefill of T tokens on p devices: ideal 1/p compute + two all-reduces per layer."""
  return layers * (single_layer_time / p + 2 * link.all_reduce(act_bytes_per_token * T, p))


def equal_work_chunks(T: int, p: int, cost: ChunkCost) -> list[int]:
  """Chunks whose per-layer work cost(n_j, end_j) is (as nearly as whole tokens allow) equal: later chunks,
  which attend to more keys, are shorter. With the chain pipelined across layers the slowest device sets the
  pace, so this is the natural starting point of the search."""
  def cut(target):  # greedy from the front: each chunk as long as its work stays <= target
    out, start = [], 0
    for _ in range(p - 1):
      n = 1
      while start + n + 1 < T and cost(n + 1, start + n + 1) <= target:
        n += 1
      out.append(n)
      start += n
    return out + [T - start]
  lo, hi = 0.0, cost(T, T)
  for _ in range(60):  # the smallest target at which the last chunk's work fits under it
    mid = (lo + hi) / 2
    if cost(cut(mid)[-1], T) > mid:
      lo = mid
    else:
      hi = mid
  c = cut(hi)
  return c if min(c) >= 1 else [T // p + (i < T % p) for i in range(p)]


def balanced_chunks(T: int, p: int, time_of: Callable[[Sequence[int]], float],
                    start: Sequence[int] | None = None) -> tuple[list[int], float]:
  """Chunk lengths minimising time_of(chunks): from `start` (default even), tokens move between pairs of
  chunks while that shortens the critical path, in steps halving from T/(4p) to 1 token."""
  chunks = list(start) if start is not None else [T // p + (i < T % p) for i in range(p)]
  best = time_of(chunks)
  step = max(1, T // (4 * p))
  while step >= 1:
    improved = True
    while improved:
      improved = False
      for i in range(p):
        for j in range(p):
          if i == j or chunks[i] - step < 1:
            continue
          c = list(chunks)
          c[i] -= step
          c[j] += step
          t = time_of(c)
          if t < best * (1 - 1e-12):
            chunks, best, improved = c, t, True
    step //= 2
  return chunks, best


def plan_table(cfg: ModelConfig, cost: ChunkCost, T: int, ps: Sequence[int], link: Link, itemsize: int = 2):
  """Rows {p, tp, runahead_even, runahead_balanced, chunks, speedup_even, speedup_balanced} for prompt length T."""
  L, share, kvb = cfg.num_layers, qkv_share(cfg), kv_bytes_per_token(cfg, itemsize)
  single_layer = cost(T, T) - cost.c * T * T / 2  # causal: the single device computes half the square
  rows = []
  for p in ps:
    time_of = lambda c: runahead_time(c, L, cost, link, kvb, share)
    even = [T // p + (i < T % p) for i in range(p)]
    t_even = time_of(even)
    start = min((even, equal_work_chunks(T, p, cost)), key=time_of)
    chunks, t_bal = balanced_chunks(T, p, time_of, start)
    t_tp = tensor_parallel_time(T, p, L, single_layer, link, cfg.hidden_size * itemsize)
    rows.append({"p": p, "tp": t_tp, "runahead_even": t_even, "runahead_balanced": t_bal, "chunks": chunks,
                 "speedup_even": t_tp / t_even, "speedup_balanced": t_tp / t_bal})
  return rows
