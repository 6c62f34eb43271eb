"""KV-Runahead's cost model fed by measurement: per-chunk compute times of one device's layer, timed here, then
the predicted prefill times of KV-Runahead (even and balanced chunks) and of tensor parallelism for p devices
(kvp_jax/baselines/runahead_cost.py).

What is measured: `runahead.device_layer`, one layer of one device's work for a chunk of n tokens whose queries
attend ctx = S + n keys (S received), jitted, ahead-of-time compiled, timed with `time_interleaved`; a ChunkCost
a + b n + c n ctx is fitted through the medians. The times are this machine's (a CPU): what transfers to an
accelerator is their shape (overhead, per-token and per-key-pair terms), not their scale. So each target system
is given as its peak FLOP/s and link bandwidth, and the link is scaled by this machine's measured matmul FLOP/s
over the target's: the ratio of communication to compute, which is what decides the comparison, is the target's.
If several accelerators are at hand, `measure_prefills` times the real thing on them: one device's prefill,
tensor-parallel prefill (the weights split over a p-way model axis by the training rules table, XLA inserting
the all-reduces) and the chain (runahead.runahead_prefill) with each given chunking.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from kvp_jax.baselines import runahead, runahead_cost
from kvp_jax.benchmark import timing
from kvp_jax.models import decoder
from kvp_jax.models import params as P
from kvp_jax.models.config import ModelConfig
from kvp_jax.training import sharding


@dataclasses.dataclass(frozen=True)
class System:
  """A target machine: per-device dense FLOP/s and the point-to-point link (bytes/s, seconds per message)."""
  name: str
  peak_flops: float
  link_bandwidth: float
  link_latency: float = 10e-6


SYSTEMS = {
    "a100-nvlink": System("8x A100, NVLink 3 (300 GB/s per direction)", 312e12, 300e9),
    "a100-pcie": System("8x A100, PCIe 4 x16 (25 GB/s)", 312e12, 25e9),
    "h100-nvlink": System("8x H100, NVLink 4 (450 GB/s per direction)", 989e12, 450e9),
}


def default_grid(T: int) -> list[tuple[int, int]]:
  """(n, ctx) points spanning the chunk lengths and key counts a T-token chain meets."""
  ns = sorted({max(1, T // d) for d in (16, 8, 4, 2)})
  return [(n, ctx) for n in ns for ctx in sorted({n, T // 2 + n // 2, T}) if ctx >= n]


def measure_chunk_costs(cfg: ModelConfig, grid, *, runs: int = 3, warmup: int = 1, dtype=jnp.float32, seed: int = 0):
  """[(n, ctx, median seconds)] of one device's layer (batch 1) at each grid point."""
  layer_cfg = cfg.replace(num_layers=1)
  lp = jax.jit(P.init, static_argnums=(0, 2))(layer_cfg, jax.random.PRNGKey(seed), dtype).layers[0]
  fn = jax.jit(functools.partial(runahead.device_layer, layer_cfg))
  calls = {}
  for n, ctx in grid:
    x = jax.random.normal(jax.random.PRNGKey(1), (1, n, cfg.hidden_size), dtype)
    kv = jax.random.normal(jax.random.PRNGKey(2), (1, cfg.num_kv_heads, ctx - n, cfg.head_dim), dtype)
    compiled, _ = timing.aot_compile(fn, lp, x, kv, kv)
    calls[(n, ctx)] = functools.partial(compiled, lp, x, kv, kv)
  times = timing.time_interleaved(calls, runs=runs, warmup=warmup)
  return [(n, ctx, float(np.median(times[(n, ctx)]))) for n, ctx in grid]


def measure_prefills(cfg: ModelConfig, params, T: int, p: int, chunkings: dict[str, tuple[int, ...]], *,
                     devices=None, runs: int = 3, warmup: int = 1) -> dict[str, float]:
  """Median seconds of a batch-1, T-token prefill: "one device", "tensor parallel" over p devices, and the
  KV-Runahead chain over p devices for each named chunking. Meaningful on p real accelerators; on simulated
  CPU devices (which share the host's cores) it only shows that every variant runs."""
  devices = list(jax.devices() if devices is None else devices)
  if len(devices) < p:
    raise ValueError(f"timing a {p}-device prefill needs {p} devices; JAX sees {len(devices)}")
  toks = jax.random.randint(jax.random.PRNGKey(3), (1, T), 0, cfg.vocab_size, jnp.int32)
  starts = jnp.zeros((1,), jnp.int32)
  one_dev = jax.device_put(params, devices[0])
  prefill = jax.jit(decoder.prefill, static_argnums=(0, 4))
  calls = {}
  compiled, _ = timing.aot_compile(prefill, cfg, one_dev, toks, starts, T)
  calls["one device"] = functools.partial(compiled, one_dev, toks, starts)
  tp_mesh = sharding.make_mesh(data=1, model=p, devices=devices)
  tp_params = jax.device_put(params, sharding.param_shardings(params, P.logical_axes(cfg), tp_mesh))
  compiled, _ = timing.aot_compile(prefill, cfg, tp_params, toks, starts, T)
  calls["tensor parallel"] = functools.partial(compiled, tp_params, toks, starts)
  seq_mesh = sharding.make_mesh(data=1, seq=p, devices=devices)
  for name, chunks in chunkings.items():
    compiled, _ = timing.aot_compile(runahead.runahead_prefill, cfg, params, toks, starts, T, mesh=seq_mesh,
                                     chunks=tuple(chunks))
    calls[f"runahead, {name}"] = functools.partial(compiled, params, toks, starts)
  times = timing.time_interleaved(calls, runs=runs, warmup=warmup)
  return {k: float(np.median(v)) for k, v in times.items()}


def machine_flops(n: int = 2048, runs: int = 3) -> float:
  """This machine's float32 matmul FLOP/s (the scale the measured times are in)."""
  call, flops, _ = timing.matmul_call(n)
  return flops / float(np.median(timing.time_interleaved({"mm": call}, runs=runs, warmup=1)["mm"]))


def link_for(system: System, local_flops: float) -> runahead_cost.Link:
  """The target's link expressed in this machine's time: compute here is local/peak times slower."""
  slow = system.peak_flops / local_flops
  return runahead_cost.Link(bandwidth=system.link_bandwidth / slow, latency=system.link_latency * slow)


def runahead_tables(cfg: ModelConfig, T: int, ps, systems, *, runs: int = 3, grid=None):
  """Measures, fits, and returns {"points", "cost", "local_flops", "tables": {system: rows}}."""
  points = measure_chunk_costs(cfg, grid or default_grid(T), runs=runs)
  cost = runahead_cost.fit(points)
  local = machine_flops()
  tables = {name: runahead_cost.plan_table(cfg, cost, T, ps, link_for(SYSTEMS[name], local))
            for name in systems}
  return {"points": points, "cost": cost, "local_flops": local, "tables": tables}


def format_tables(cfg_name: str, T: int, result) -> str:
  c = result["cost"]
  lines = [f"KV-Runahead vs tensor-parallel prefill, {cfg_name}, T={T} (cost model fitted to this machine's "
           f"per-chunk times: a={c.a:.3g} s, b={c.b:.3g} s/token, c={c.c:.3g} s/token/key; "
           f"matmul {result['local_flops'] / 1e9:.0f} GFLOP/s)",
           "measured (n, ctx, s): " + ", ".join(f"({n}, {x}, {t:.3g})" for n, x, t in result["points"])]
  for name, rows in result["tables"].items():
    lines += ["", f"{SYSTEMS[name].name}:",
              "| p | speed-up, even chunks | speed-up, balanced chunks | balanced chunks |", "|---|---|---|---|"]
    for r in rows:
      lines.append(f"| {r['p']} | {r['speedup_even']:.2f}x | {r['speedup_balanced']:.2f}x | "
                   f"{', '.join(map(str, r['chunks']))} |")
  return "\n".join(lines)
