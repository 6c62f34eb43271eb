"""Latency benchmark of prefill, KV Prediction and decode on XLA, against FLOPs and PyTorch (kvp_jax/bench.py).

Protocol, per (prompt length T, batch B): every JAX method is compiled ahead of time (`lower().compile()`,
timed on its own), then called `warmup` times, then `runs` times with `block_until_ready`, all methods
interleaved run by run together with a float32 matmul (the roofline) and transformers' PyTorch prefill, so
that load from other processes hits every figure alike. Reported: median, min and max seconds.

Methods: `base` (the base's prefill), per pairing `aux_only` and `kvp`, `hf_torch`; and, when the spec asks,
`kvp_recompute` (KV Prediction + selective recomputation, recompute.py) for one pairing at a few budgets
(num_intervals x interval_size), `lazyllm`, `random_prune` and `static_prune` (baselines/pruning.py) on the base,
and the rivals `swiftkv` (per cutoff, with TPOT of its own decode step), `specprefill` (per keep fraction, a
pairing's aux as the draft) and `gemfilter` (per topk). Those rows carry `settings` (the method's configuration),
the FLOP-ideal and measured speed-ups over the base, and (kvp_recompute) TPOT of the base from the recomputed
cache.

Timing and memory figures: timing.py; the methods: methods.py; peers: peers.py; figures, table, plot: report.py.
Shape legend: see kvp_jax/models/config.py.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from kvp_jax.benchmark import methods as bm
from kvp_jax.benchmark import peers, timing
from kvp_jax.benchmark.methods import Pairing
from kvp_jax.benchmark.report import figures
from kvp_jax.models import params as P
from kvp_jax.models.config import ModelConfig


@dataclasses.dataclass
class BenchSpec:
  base_cfg: ModelConfig
  base: P.Params
  pairings: list[Pairing]
  prompt_lens: list[int]
  batch_sizes: list[int]
  max_tokens_per_batch: int = 1 << 30
  skip_groups: tuple[tuple[int, int], ...] = ()  # (B, T) pairs not run
  runs: int = 5
  warmup: int = 1
  tpot_steps: int = 5
  matmul_n: int = 2048
  torch: bool = True
  seed: int = 0
  log: Callable[[str], None] = print
  # Recomputation / pruning rows (none by default).
  recompute_budgets: tuple = ()  # ((num_intervals, interval_size), ...): one kvp_recompute row each
  recompute_pairing: str | None = None  # the pairing's name; None: the first LP pairing (else the first)
  recompute_edge_fraction: float = 0.1
  recompute_importance: str = "column"
  lazyllm_schedule: tuple = ()  # ((layer, keep fraction), ...); empty: no lazyllm row
  prune_keep: tuple = ()  # keep fractions: one random_prune and one static_prune row each
  static_probe_fraction: float = 0.25
  # Rivals (baselines/; none by default).
  swiftkv_cutoffs: tuple = ()  # fractions of the base's layers every prompt token runs: one swiftkv row each
  specprefill_keep: tuple = ()  # kept chunk fractions: one specprefill row each
  specprefill_draft: str | None = None  # the pairing whose aux drafts; None: the "c" pairing (else the first)
  gemfilter_topk: tuple = ()  # tokens kept: one gemfilter row each
  gemfilter_layer: int | None = None  # selection layer; None: their Llama-3.1-8B setting scaled


def recompute_pairing(spec: BenchSpec) -> Pairing | None:
  """The pairing the kvp_recompute rows use (None when there are no budgets or no pairings)."""
  if not spec.recompute_budgets or not spec.pairings:
    return None
  if spec.recompute_pairing:
    for p in spec.pairings:
      if p.name == spec.recompute_pairing:
        return p
    raise ValueError(f"recompute pairing {spec.recompute_pairing!r} not among {[p.name for p in spec.pairings]}")
  return next((p for p in spec.pairings if p.name.startswith("lp")), spec.pairings[0])


def draft_pairing(spec: BenchSpec) -> Pairing | None:
  """The pairing whose aux model is SpecPrefill's draft (None when there are no keep fractions or pairings)."""
  if not spec.specprefill_keep or not spec.pairings:
    return None
  name = spec.specprefill_draft or "c"
  for p in spec.pairings:
    if p.name == name:
      return p
  if spec.specprefill_draft:
    raise ValueError(f"specprefill draft pairing {name!r} not among {[p.name for p in spec.pairings]}")
  return spec.pairings[0]


def _tokens(cfg: ModelConfig, B: int, T: int, seed: int):
  r = np.random.default_rng(seed)
  return r.integers(0, cfg.vocab_size, (B, T), dtype=np.int32)


def run(spec: BenchSpec) -> dict[str, Any]:
  """Runs every (T, B) group and returns the bench.json object (env, matmul peak, rows, figures)."""
  env = timing.env_record()
  torch_ok = spec.torch and env.get("torch") is not None
  log = spec.log
  mm_call, mm_flops, mm_cs = timing.matmul_call(spec.matmul_n)
  rows, mm_times = [], []
  with tempfile.TemporaryDirectory() as tmp:
    hf_dir = None
    if torch_ok:
      from kvp_jax.models import hf_checkpoint
      hf_dir = hf_checkpoint.save_pretrained(spec.base_cfg, spec.base, os.path.join(tmp, "base_hf"))
    for B in spec.batch_sizes:
      for T in spec.prompt_lens:
        if B * T > spec.max_tokens_per_batch:
          log(f"skip B={B} T={T}: {B * T} tokens > max_tokens_per_batch={spec.max_tokens_per_batch}")
          continue
        if (B, T) in spec.skip_groups:
          log(f"skip B={B} T={T}: in skip_groups")
          continue
        rows += _run_group(spec, B, T, hf_dir, mm_call, mm_flops, mm_times)
  try:
    env["loadavg_end"] = list(os.getloadavg())
  except OSError:
    pass
  peak = mm_flops / float(np.median(mm_times))
  out = {"matmul_peak_flops_per_s": peak, "matmul_peak_flops_per_s_best": mm_flops / float(np.min(mm_times)),
         "matmul_n": spec.matmul_n, "matmul_compile_s": mm_cs, "env": env,
         "base_config": spec.base_cfg.to_dict(), "base_params": P.count(spec.base),
         "aux": {p.name: {"config": p.kcfg.aux.to_dict(), "params": P.count(p.kp.aux),
                          "layer_map": list(p.kcfg.layer_map)} for p in spec.pairings},
         "protocol": {"runs": spec.runs, "warmup": spec.warmup, "tpot_steps": spec.tpot_steps,
                      "interleaved": True, "torch": torch_ok},
         "rows": rows}
  torch_peaks = [r["torch_matmul_flops_per_s"] for r in rows if "torch_matmul_flops_per_s" in r]
  if torch_peaks:  # how much faster the peer's GEMM kernels are bounds how fast our prefill can be against it
    out["torch_matmul_peak_flops_per_s"] = float(np.median(torch_peaks))
  out["figures"] = figures(out)
  return out


def _run_group(spec: BenchSpec, B: int, T: int, hf_dir, mm_call, mm_flops, mm_times) -> list[dict]:
  log = spec.log
  max_len = T + spec.tpot_steps + spec.warmup
  tokens = jnp.asarray(_tokens(spec.base_cfg, B, T, spec.seed + T + B))
  starts = jnp.zeros((B,), jnp.int32)
  log(f"B={B} T={T}: compiling")
  methods = [bm.base_prefill_method(spec.base_cfg, spec.base, tokens, starts, max_len)]
  for p in spec.pairings:
    methods.append(bm.aux_only_method(p, tokens, starts, max_len))
    methods.append(bm.kvp_method(p, spec.base, tokens, starts, max_len))
  rp = recompute_pairing(spec)
  for ni, isz in spec.recompute_budgets if rp is not None else ():
    methods.append(bm.recompute_bench_method(rp, spec.base, tokens, starts, max_len, ni, isz,
                                             spec.recompute_edge_fraction, spec.recompute_importance))
  if spec.lazyllm_schedule:
    methods.append(bm.lazyllm_bench_method(spec.base_cfg, spec.base, tokens, starts, max_len, spec.lazyllm_schedule))
  for keep in spec.prune_keep:
    methods.append(bm.random_prune_bench_method(spec.base_cfg, spec.base, tokens, starts, max_len, keep, spec.seed))
    methods.append(bm.static_prune_bench_method(spec.base_cfg, spec.base, tokens, starts, max_len, keep,
                                                spec.static_probe_fraction))
  for c in spec.swiftkv_cutoffs:
    methods.append(bm.swiftkv_bench_method(spec.base_cfg, spec.base, tokens, starts, max_len, c))
  dp = draft_pairing(spec)
  for keep in spec.specprefill_keep if dp is not None else ():
    methods.append(bm.specprefill_bench_method(spec.base_cfg, spec.base, dp.name, dp.kcfg.aux, dp.kp.aux, tokens,
                                               starts, max_len, keep))
  for topk in spec.gemfilter_topk:
    methods.append(bm.gemfilter_bench_method(spec.base_cfg, spec.base, tokens, starts, max_len, topk,
                                             spec.gemfilter_layer))
  if hf_dir is not None:
    methods.append(peers.torch_prefill_method(hf_dir, np.asarray(tokens), spec.base_cfg))
  keys = [m.key for m in methods]
  assert len(set(keys)) == len(keys), keys
  rss, outs = {}, {}
  for k, m in zip(keys, methods):  # first call: the resident-set figure, and outputs for the TPOT caches
    outs[k], rss[k] = timing.rss_peak_delta(m.call)
  calls = dict(zip(keys, (m.call for m in methods)))
  calls["matmul"] = mm_call
  if hf_dir is not None:
    calls["torch_matmul"] = peers.torch_matmul_call(spec.matmul_n)
  log(f"B={B} T={T}: timing {len(methods)} methods x {spec.runs} runs")
  times = timing.time_interleaved(calls, spec.runs, max(0, spec.warmup - 1))
  mm_times += times["matmul"]
  peak_here = mm_flops / float(np.median(times["matmul"]))
  # TPOT: the base decoding from its own cache and from each predicted (and each recomputed) cache.
  caches = {"base:None": outs["base:None"][1]}
  caches.update({f"kvp:{p.name}": outs[f"kvp:{p.name}"][1] for p in spec.pairings})
  caches.update({k: outs[k][1] for k, m in zip(keys, methods) if m.method == "kvp_recompute"})
  # SwiftKV decodes with its own step (later layers read SwiftKV K/V): timed in the same rounds.
  own = {k: (m.decode, outs[k][1]) for k, m in zip(keys, methods) if m.decode is not None}
  tp, tp_cs = bm.tpot(spec.base_cfg, spec.base, caches, spec.tpot_steps, spec.warmup, own)
  rows = []
  base_med = float(np.median(times["base:None"]))
  for k, m in zip(keys, methods):
    s = timing.stats(times[k])
    row = {"method": m.method, "aux": m.aux, **({} if m.settings is None else {"settings": m.settings}),
           "prompt_len": T, "batch": B, "ttft_s_median": s["median"],
           "ttft_s_min": s["min"], "ttft_s_max": s["max"], "ttft_s_runs": times[k], "compile_s": m.compile_s,
           "flops": m.flops, "flops_no_attn": m.flops_no_attn,
           "achieved_flops_per_s": m.flops / s["median"], "fraction_of_matmul_peak": m.flops / s["median"] / peak_here,
           "peak_mem_bytes": m.peak_mem_bytes, "rss_peak_delta_bytes": rss[k], **m.extra}
    if k in tp:
      row["tpot_s_median"] = float(np.median(tp[k]))
      row["tpot_s_min"] = float(np.min(tp[k]))
      row["tpot_compile_s"] = m.extra.get("decode_compile_s", tp_cs)
      row["tpot_from"] = {"base": "own cache", "kvp_recompute": "recomputed cache",
                          "swiftkv": "own cache and own step"}.get(m.method, "predicted cache")
      # Step i from this cache ran in the same round as step i from the base's own cache, so the per-step
      # ratio cancels most of the machine's drift; its median is the comparison the issue asks for.
      row["tpot_over_own_paired_median"] = float(np.median(np.asarray(tp[k]) / np.asarray(tp["base:None"])))
    if "ideal_speedup" in m.extra:  # kvp, and the recomputation / pruning methods
      row["measured_speedup"] = base_med / s["median"]
      row["speedup_over_ideal"] = row["measured_speedup"] / m.extra["ideal_speedup"]
    if m.method == "hf_torch":
      row["jax_over_torch_ttft"] = base_med / s["median"]
    rows.append(row)
  rows.append({"method": "matmul", "aux": None, "prompt_len": T, "batch": B, "matmul_n": spec.matmul_n,
               "flops": mm_flops, **{f"ttft_s_{k}": v for k, v in timing.stats(times["matmul"]).items()},
               "achieved_flops_per_s": peak_here,
               **({"torch_matmul_flops_per_s": mm_flops / float(np.median(times["torch_matmul"]))}
                  if "torch_matmul" in times else {})})
  return rows
