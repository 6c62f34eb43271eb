"""Latency benchmark of prefill, KV Prediction and decode on XLA, against FLOPs and PyTorch (kvp_jax/bench.py).

Protocol, per (prompt length T, batch B): every JAX method is compiled ahead of time (`lower().compile()`,
timed on its own), then called `warmup` times, then `runs` times with `block_until_ready`, all methods
interleaved run by run together with a float32 matmul (the roofline) and transformers' PyTorch prefill, so
that load from other processes hits every figure alike. Reported: median, min and max seconds.

Methods: `base` (the base's prefill), per pairing `aux_only` and `kvp`, the peers `hf_torch` (transformers +
PyTorch), `onnxruntime` (transformers' model exported to ONNX, prefill, when asked and installed) and
`llama_cpp` (the original GGUF, B=1, when llama-cpp-python is installed); and, when the spec asks,
`kvp_recompute` (KV Prediction + selective recomputation, recompute.py) for one pairing at a few budgets
(num_intervals x interval_size), `lazyllm`, `random_prune` and `static_prune` (baselines/pruning.py) on the base,
and the rivals `swiftkv` (per cutoff, with TPOT of its own decode step), `specprefill` (per keep fraction, a
pairing's aux as the draft) and `gemfilter` (per topk). Those rows carry `settings` (the method's configuration),
the FLOP-ideal and measured speed-ups over the base, and (kvp_recompute) TPOT of the base from the recomputed
cache.

Roofline, per row: `roofline_s` = FLOPs / the matmul peak + bytes that must be read (kvp_jax/models/flops.py)
/ the read bandwidth, both measured in the same rounds as the row (a 2048^3 matmul and a [1, 1024] x [1024, n]
product over `read_probe_mb`); `ttft_over_roofline` = median TTFT / roofline_s (torch rows: torch's own peak).
TPOT, after the TTFT rounds: the base's `decode_step` from each cache, the base's step on the last prompt token
as KV Prediction compiles it (`kvp_base_step_s_median`), and the peers' decode steps, all interleaved.

Timing and memory figures: timing.py; the methods: methods.py; peers: peers.py; figures, table, plot: report.py.
With `BenchSpec.partial` set, every finished (B, T) group is appended to that file; a rerun of an interrupted
benchmark with the same spec reuses those groups (and says so; their timings come from the interrupted
process), one with another spec starts over.
Shape legend: see kvp_jax/models/config.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from kvp_jax import partial_results
from kvp_jax.benchmark import methods as bm
from kvp_jax.benchmark import peers, timing
from kvp_jax.benchmark.methods import Pairing
from kvp_jax.benchmark.report import figures
from kvp_jax.models import flops
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
  onnxruntime: bool = False  # ONNX Runtime prefill rows, on transformers' model exported to ONNX (needs torch)
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
  read_probe_mb: int = 256  # size of the read-bandwidth probe (far above the CPU's caches)
  gguf: str | None = None  # the base's original GGUF file: llama.cpp rows (B=1) when llama-cpp-python imports
  hf_dir: str | None = None  # Hugging Face directory of the base's weights for the torch peer (else written)

  # Rivals (baselines/; none by default).
  swiftkv_cutoffs: tuple = ()  # fractions of the base's layers every prompt token runs: one swiftkv row each
  specprefill_keep: tuple = ()  # kept chunk fractions: one specprefill row each
  specprefill_draft: str | None = None  # the pairing whose aux drafts; None: the "c" pairing (else the first)
  gemfilter_topk: tuple = ()  # tokens kept: one gemfilter row each
  gemfilter_layer: int | None = None  # selection layer; None: their Llama-3.1-8B setting scaled
  partial: str | None = None  # JSON lines of finished (B, T) groups, to resume an interrupted run from


def _fingerprint(spec: BenchSpec) -> dict:
  """What a finished group's figures depend on; a partial file from another spec is not reused."""
  h = hashlib.sha1()
  for leaf in jax.tree.leaves((spec.base, [p.kp for p in spec.pairings])):  # a sample of every weight
    a = np.asarray(leaf)
    h.update(str((a.shape, a.dtype)).encode() + a.ravel()[:4096].tobytes())
  keep = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)
          if f.name not in ("base", "pairings", "log", "partial", "base_cfg")}
  return json.loads(json.dumps({
      "spec": keep, "base_cfg": spec.base_cfg.to_dict(), "weights": h.hexdigest(), "jax": jax.__version__,
      "pairings": [[p.name, p.kcfg.to_dict()] for p in spec.pairings]}, default=str))


def _done_groups(spec: BenchSpec) -> dict[tuple[int, int], dict]:
  """(B, T) -> {"rows", "mm_times", "rb_times"} of the groups an interrupted run with this spec finished."""
  if spec.partial is None:
    return {}
  key = lambda o: tuple(o["group"]) if "group" in o else None
  groups = partial_results.load(spec.partial, _fingerprint(spec), key, "a benchmark with another spec", spec.log)
  if groups:
    spec.log(f"resuming: {len(groups)} (B, T) groups already timed in {spec.partial} (by the interrupted run)")
  return groups


@dataclasses.dataclass
class _Rooflines:
  """The roofline calls, timed in every group's rounds; their times accumulate over the run."""
  mm_call: Callable[[], Any]
  mm_flops: int
  rb_call: Callable[[], Any]
  rb_bytes: int
  mm_times: list = dataclasses.field(default_factory=list)
  rb_times: list = dataclasses.field(default_factory=list)


def recompute_pairing(spec: BenchSpec) -> Pairing | None:
  """The pairing the kvp_recompute rows use (None when there are no budgets or no pairings)."""
  if not spec.recompute_budgets or not spec.pairings:
    return None
  if spec.recompute_pairing:
    for p in spec.pairings:
      if p.name == spec.recompute_pairing:
        return p
    raise ValueError(f"recompute pairing {spec.recompute_pairing!r} not among {[p.name for p in spec.pairings]}; "
                     "name one of them (--recompute_aux)")
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
    raise ValueError(f"specprefill draft pairing {name!r} not among {[p.name for p in spec.pairings]}; name one "
                     "of them (--specprefill_draft)")
  return spec.pairings[0]


def check(spec: BenchSpec):
  """Refuses, one line each, what would otherwise fail only in the first group (after the roofline is timed and
  the partial file begun): an unknown recompute or draft pairing, a SwiftKV cutoff or GemFilter layer outside the
  base's layers, a topk below 1."""
  recompute_pairing(spec)
  draft_pairing(spec)
  from kvp_jax.baselines import gemfilter, swiftkv
  L = spec.base_cfg.num_layers
  for c in spec.swiftkv_cutoffs:
    swiftkv.cutoff_layers(L, c)
  if spec.gemfilter_topk:
    if min(spec.gemfilter_topk) < 1:
      raise ValueError(f"gemfilter topk must be >= 1, got {list(spec.gemfilter_topk)}")
    layer = gemfilter.default_layer(L) if spec.gemfilter_layer is None else spec.gemfilter_layer
    if not 0 <= layer < L:
      raise ValueError(f"GemFilter's selection layer {layer} is not a layer of this {L}-layer base; pass "
                       f"--gemfilter_layer in [0, {L - 1}]")


def _tokens(cfg: ModelConfig, B: int, T: int, seed: int):
  r = np.random.default_rng(seed)
  return r.integers(0, cfg.vocab_size, (B, T), dtype=np.int32)


def run(spec: BenchSpec) -> dict[str, Any]:
  """Runs every (T, B) group and returns the bench.json object (env, matmul peak, rows, figures)."""
  check(spec)
  env = timing.env_record()
  torch_ok = spec.torch and env.get("torch") is not None
  log = spec.log
  mm_call, mm_flops, mm_cs = timing.matmul_call(spec.matmul_n)
  roof = _Rooflines(mm_call, mm_flops, *timing.read_bandwidth_call(spec.read_probe_mb << 20))
  peer_status = {"hf_torch": None if torch_ok else "not measured (--torch=false or torch not installed)",
                 "llama_cpp": peers.llama_cpp_status() if spec.gguf else "no GGUF file of this base (random weights)",
                 "onnxruntime": _onnxruntime_status(spec, torch_ok)}
  rows = []
  done = _done_groups(spec)
  with tempfile.TemporaryDirectory() as tmp:
    torch_peer = None
    if torch_ok:
      from kvp_jax.models import hf_checkpoint
      hf_dir = spec.hf_dir or hf_checkpoint.save_pretrained(spec.base_cfg, spec.base, os.path.join(tmp, "base_hf"))
      torch_peer = peers.Torch(hf_dir)
    ort_peer = None
    if peer_status["onnxruntime"] is None:
      log("exporting transformers' model to ONNX for the onnxruntime rows")
      ort_peer = peers.OnnxRuntime(torch_peer, os.path.join(tmp, "base_prefill.onnx"))
    for B in spec.batch_sizes:
      for T in spec.prompt_lens:
        if B * T > spec.max_tokens_per_batch:
          log(f"skip B={B} T={T}: {B * T} tokens > max_tokens_per_batch={spec.max_tokens_per_batch}")
          continue
        if (B, T) in spec.skip_groups:
          log(f"skip B={B} T={T}: in skip_groups")
          continue
        if (B, T) in done:
          rows += done[(B, T)]["rows"]
          roof.mm_times += done[(B, T)]["mm_times"]
          roof.rb_times += done[(B, T)].get("rb_times", [])
          continue
        n_mm, n_rb = len(roof.mm_times), len(roof.rb_times)
        group = _run_group(spec, B, T, torch_peer, peer_status["llama_cpp"] is None, roof, ort_peer)
        rows += group
        if spec.partial is not None:
          partial_results.append(spec.partial, {"group": [B, T], "rows": group, "mm_times": roof.mm_times[n_mm:],
                                                "rb_times": roof.rb_times[n_rb:]})
  try:
    env["loadavg_end"] = list(os.getloadavg())
  except OSError:
    pass
  peak = mm_flops / float(np.median(roof.mm_times))
  out = {"matmul_peak_flops_per_s": peak, "matmul_peak_flops_per_s_best": mm_flops / float(np.min(roof.mm_times)),
         "matmul_n": spec.matmul_n, "matmul_compile_s": mm_cs,
         "read_bandwidth_bytes_per_s": roof.rb_bytes / float(np.median(roof.rb_times)),
         "read_bandwidth_bytes_per_s_best": roof.rb_bytes / float(np.min(roof.rb_times)),
         "read_probe_bytes": roof.rb_bytes, "peers": peer_status, "env": env,
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


def _onnxruntime_status(spec: BenchSpec, torch_ok: bool) -> str | None:
  """None when the ONNX Runtime rows are to be timed, else why not."""
  if not spec.onnxruntime:
    return "not measured (--onnxruntime=false)"
  if not torch_ok:
    return "not measured (it exports transformers' model: needs --torch)"
  return peers.onnxruntime_status()


def _run_group(spec: BenchSpec, B: int, T: int, torch_peer, llama_ok: bool, roof: _Rooflines,
               ort_peer=None) -> list[dict]:
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
  if torch_peer is not None:
    methods.append(torch_peer.prefill_method(np.asarray(tokens), spec.base_cfg))
  if ort_peer is not None:
    methods.append(ort_peer.prefill_method(np.asarray(tokens), spec.base_cfg))
  llama = None
  if llama_ok and B == 1:  # llama-cpp-python's Llama runs one sequence
    llama = peers.LlamaCpp(spec.gguf, n_ctx=max_len + 1)
    methods.append(bm.Method("llama_cpp", None, llama.prefill_call(np.asarray(tokens)), None,
                             flops.prefill_flops(spec.base_cfg, T), flops.prefill_flops(spec.base_cfg, T, attention=False),
                             extra={"weights": "the GGUF file's own (quantized) tensors", "llama_cpp": llama.version}))
  keys = [m.key for m in methods]
  assert len(set(keys)) == len(keys), keys
  rss, outs = {}, {}
  for k, m in zip(keys, methods):  # first call: the resident-set figure, and outputs for the TPOT caches
    outs[k], rss[k] = timing.rss_peak_delta(m.call)
  calls = dict(zip(keys, (m.call for m in methods)))
  calls["matmul"] = roof.mm_call
  calls["read_bandwidth"] = roof.rb_call
  if torch_peer is not None:
    calls["torch_matmul"] = peers.torch_matmul_call(spec.matmul_n)
  log(f"B={B} T={T}: timing {len(methods)} methods x {spec.runs} runs")
  times = timing.time_interleaved(calls, spec.runs, max(0, spec.warmup - 1))
  roof.mm_times += times["matmul"]
  roof.rb_times += times["read_bandwidth"]
  peak_here = roof.mm_flops / float(np.median(times["matmul"]))
  read_bw_here = roof.rb_bytes / float(np.median(times["read_bandwidth"]))
  torch_peak_here = (roof.mm_flops / float(np.median(times["torch_matmul"]))) if "torch_matmul" in times else None
  # TPOT: the base decoding from its own cache and from each predicted (and each recomputed) cache.
  caches = {"base:None": outs["base:None"][1]}
  caches.update({f"kvp:{p.name}": outs[f"kvp:{p.name}"][1] for p in spec.pairings})
  caches.update({k: outs[k][1] for k, m in zip(keys, methods) if m.method == "kvp_recompute"})
  # SwiftKV decodes with its own step (later layers read SwiftKV K/V): timed in the same rounds.
  own = {k: (m.decode, outs[k][1]) for k, m in zip(keys, methods) if m.decode is not None}
  others = {}
  if spec.pairings:
    others["kvp_base_step"] = bm.kvp_base_step_call(spec.base_cfg, spec.base, caches["base:None"], tokens[:, -1:])
  if torch_peer is not None:
    others["hf_torch:None"] = torch_peer.decode_call(np.asarray(tokens))
  if llama is not None:
    others["llama_cpp:None"] = llama.decode_call(np.asarray(tokens))
  log(f"B={B} T={T}: timing decode steps x {spec.tpot_steps}")
  tp, tp_cs = bm.tpot(spec.base_cfg, spec.base, caches, spec.tpot_steps, spec.warmup, own, others)
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
    if "read_bytes" in m.extra:  # the roofline of this row's FLOPs and reads, measured in the same rounds
      row_peak = torch_peak_here if m.method in ("hf_torch", "onnxruntime") else peak_here
      if row_peak:
        row["roofline_s"] = m.flops / row_peak + m.extra["read_bytes"] / read_bw_here
        row["ttft_over_roofline"] = s["median"] / row["roofline_s"]
    if k in tp:
      row["tpot_s_median"] = float(np.median(tp[k]))
      row["tpot_s_min"] = float(np.min(tp[k]))
      row["tpot_from"] = {"base": "own cache", "kvp_recompute": "recomputed cache", "hf_torch": "dynamic cache",
                          "llama_cpp": "its own cache", "swiftkv": "own cache and own step"}.get(m.method,
                                                                                                "predicted cache")
      if m.method not in ("hf_torch", "llama_cpp"):
        row["tpot_compile_s"] = m.extra.get("decode_compile_s", tp_cs)
        # Step i from this cache ran in the same round as step i from the base's own cache, so the per-step
        # ratio cancels most of the machine's drift; its median is the comparison the issue asks for.
        row["tpot_over_own_paired_median"] = float(np.median(np.asarray(tp[k]) / np.asarray(tp["base:None"])))
    if m.method == "kvp" and "kvp_base_step" in tp:
      row["kvp_base_step_s_median"] = float(np.median(tp["kvp_base_step"]))
    if "ideal_speedup" in m.extra:  # kvp, and the recomputation / pruning methods
      row["measured_speedup"] = base_med / s["median"]
      row["speedup_over_ideal"] = row["measured_speedup"] / m.extra["ideal_speedup"]
    if m.method == "hf_torch":
      row["jax_over_torch_ttft"] = base_med / s["median"]
    if m.method == "onnxruntime":
      row["jax_over_onnxruntime_ttft"] = base_med / s["median"]
    rows.append(row)
  rows.append({"method": "matmul", "aux": None, "prompt_len": T, "batch": B, "matmul_n": spec.matmul_n,
               "flops": roof.mm_flops, **{f"ttft_s_{k}": v for k, v in timing.stats(times["matmul"]).items()},
               "achieved_flops_per_s": peak_here, "read_bandwidth_bytes_per_s": read_bw_here,
               **({"torch_matmul_flops_per_s": torch_peak_here} if torch_peak_here else {})})
  return rows
