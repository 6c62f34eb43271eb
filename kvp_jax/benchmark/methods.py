"""Every timed method as one compiled call with its FLOPs and memory: the base's prefill, an aux alone, KV
Prediction, selective recomputation, LazyLLM / random / static pruning, and TPOT of the base's decode step.

Rows carry `settings` (the method's configuration) where a method has them, and the FLOP-ideal speed-up over
the base's prefill. Pairings are an aux model + predictor for the base (random weights unless loaded).
Shape legend: see kvp_jax/models/config.py.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from kvp_jax.benchmark.timing import aot_compile, time_interleaved, xla_peak_bytes
from kvp_jax.kvp import inference, predictor
from kvp_jax.kvp.flops import ideal_kvp_speedup, kvp_flops
from kvp_jax.kvp.inference import KVPParams
from kvp_jax.kvp.predictor import KVPConfig
from kvp_jax.models import decoder, flops
from kvp_jax.models import params as P
from kvp_jax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Pairing:
  """One aux model + predictor for the base: `name` labels its rows (e.g. 'lp0.25', 'c')."""
  name: str
  kcfg: KVPConfig
  kp: KVPParams


@dataclasses.dataclass
class Method:
  """One measured call: `call()` runs it once and returns something to block on."""
  method: str
  aux: str | None
  call: Callable[[], Any]
  compile_s: float | None
  flops: int
  flops_no_attn: int
  peak_mem_bytes: int | None = None
  extra: dict = dataclasses.field(default_factory=dict)
  settings: dict | None = None  # recomputation / pruning configuration; None for the original methods
  # A method whose decode differs from the base's (SwiftKV): its compiled step (tokens [B, 1], state) ->
  # (logits, state), timed for TPOT from the state its prefill returns.
  decode: Callable | None = None

  @property
  def key(self) -> str:
    """Unique within a group: 'method:aux', plus the settings' short label where there are settings."""
    k = f"{self.method}:{self.aux}"
    return k if self.settings is None else f"{k}:{settings_label(self.method, self.settings)}"


def settings_label(method: str, settings: dict | None) -> str:
  """A short label of a row's settings for keys, the table and the plot ('' for none)."""
  if not settings:
    return ""
  if method == "kvp_recompute":
    return f"{settings['num_intervals']}x{settings['interval_size']}"
  if method == "lazyllm":
    return str(settings["schedule"])
  if method == "swiftkv":
    return f"cutoff={settings['cutoff']:g}"
  if method == "gemfilter":
    return f"topk={settings['topk']},layer={settings['layer']}"
  if "keep" in settings:
    return f"keep={settings['keep']:g}"
  return ",".join(f"{k}={v}" for k, v in settings.items())


# ---------------------------------------------------------------------------------------------- models


def lp_pairing(base_cfg: ModelConfig, base: P.Params, fraction: float, key) -> Pairing:
  """KVP-LP: the base with a `fraction` of its layers kept (METHOD.md rules) and a random K/V predictor."""
  from kvp_jax.kvp import aux_models
  keep = aux_models.lp_keep_layers(base_cfg.num_layers, fraction)
  aux_cfg, aux = aux_models.prune_layers(base_cfg, base, keep)
  kcfg = KVPConfig(base=base_cfg, aux=aux_cfg, kind="kv", layer_map=aux_models.lp_layer_map(base_cfg.num_layers, keep))
  return Pairing(f"lp{fraction:g}", kcfg, KVPParams(aux=aux, pred=predictor.init(kcfg, key, aux.embed.dtype, "random")))


def c_pairing(base_cfg: ModelConfig, aux_cfg: ModelConfig, key, dtype=jnp.float32, name: str = "c") -> Pairing:
  """KVP-C: a separate, randomly initialised smaller model of the base's vocabulary and a random predictor."""
  from kvp_jax.kvp import aux_models
  aux_models.check_compatible(base_cfg, aux_cfg)
  k1, k2 = jax.random.split(key)
  kcfg = KVPConfig(base=base_cfg, aux=aux_cfg, kind="kv",
                   layer_map=aux_models.c_layer_map(base_cfg.num_layers, aux_cfg.num_layers))
  return Pairing(name, kcfg, KVPParams(aux=P.init(aux_cfg, k1, dtype), pred=predictor.init(kcfg, k2, dtype, "random")))


# ---------------------------------------------------------------------------------------------- methods

_prefill_jit = jax.jit(decoder.prefill, static_argnums=0, static_argnames=("max_len",))


def base_prefill_method(cfg: ModelConfig, params: P.Params, tokens, starts, max_len: int) -> Method:
  """TTFT of the base model's own prefill (first-token logits and its cache)."""
  c, cs = aot_compile(_prefill_jit, cfg, params, tokens, starts, max_len=max_len)
  B, T = tokens.shape
  return Method("base", None, lambda: c(params, tokens, starts), cs, flops.prefill_flops(cfg, T, batch=B),
                flops.prefill_flops(cfg, T, batch=B, attention=False), xla_peak_bytes(c))


def aux_only_method(pair: Pairing, tokens, starts, max_len: int) -> Method:
  """TTFT of the auxiliary model alone: its own prefill and first token (the paper's baseline)."""
  m = base_prefill_method(pair.kcfg.aux, pair.kp.aux, tokens, starts, max_len)
  return dataclasses.replace(m, method="aux_only", aux=pair.name)


def kvp_method(pair: Pairing, base: P.Params, tokens, starts, max_len: int) -> Method:
  """TTFT of KV Prediction (`inference.kvp_prefill`): aux forward on tokens[:, :-1], predictor, predicted K/V into a
  base KVCache (the base's key norm and RoPE applied), then the base's step on the last token."""
  c, cs = aot_compile(inference.kvp_prefill, pair.kcfg, base, pair.kp, tokens, starts, max_len=max_len)
  B, T = tokens.shape
  kc = pair.kcfg
  f = kvp_flops(kc.base, kc.aux, T, in_width=kc.in_width, kind=kc.kind, batch=B)
  f0 = kvp_flops(kc.base, kc.aux, T, in_width=kc.in_width, kind=kc.kind, batch=B, attention=False)
  extra = {"paper_ttft_flops": flops.paper_ttft_flops(kc.aux, T, batch=B),
           "ideal_speedup": ideal_kvp_speedup(kc.base, kc.aux, T, in_width=kc.in_width, kind=kc.kind),
           "ideal_speedup_no_attn": ideal_kvp_speedup(kc.base, kc.aux, T, in_width=kc.in_width, kind=kc.kind,
                                                      attention=False)}
  return Method("kvp", pair.name, lambda: c(base, pair.kp, tokens, starts), cs, f, f0, xla_peak_bytes(c), extra)


def _speedup_extra(base_cfg: ModelConfig, B: int, T: int, f: int, f0: int) -> dict:
  """The base's prefill FLOPs over a method's: the TTFT speed-up if time were proportional to FLOPs."""
  return {"ideal_speedup": flops.prefill_flops(base_cfg, T, batch=B) / f,
          "ideal_speedup_no_attn": flops.prefill_flops(base_cfg, T, batch=B, attention=False) / f0}


def recompute_bench_method(pair: Pairing, base: P.Params, tokens, starts, max_len: int, num_intervals: int,
                           interval_size: int, edge_fraction: float = 0.1, importance: str = "column") -> Method:
  """TTFT of KV Prediction + selective recomputation (`recompute.recompute_prefill`) at one budget."""
  from kvp_jax.baselines import recompute
  rm = recompute.recompute_method(pair.kcfg, base, pair.kp, pair.name, num_intervals, interval_size,
                                  edge_fraction, importance)
  kw = dict(num_intervals=num_intervals, interval_size=interval_size, edge_fraction=edge_fraction,
            importance=importance)
  c, cs = aot_compile(recompute.recompute_prefill, pair.kcfg, base, pair.kp, tokens, starts, max_len=max_len, **kw)
  B, T = tokens.shape
  f = B * recompute.recompute_flops(pair.kcfg, T, **kw)
  f0 = B * recompute.recompute_flops(pair.kcfg, T, **kw, attention=False)
  extra = {"recompute_columns": recompute.budget(T, num_intervals, interval_size, edge_fraction),
           "paper_ttft_flops": B * rm.ttft_flops_paper(T), **_speedup_extra(pair.kcfg.base, B, T, f, f0)}
  return Method("kvp_recompute", pair.name, lambda: c(base, pair.kp, tokens, starts), cs, f, f0, xla_peak_bytes(c),
                extra, dict(rm.settings))


def _base_pruned_method(name: str, prefill, flops_fn, settings: dict, cfg: ModelConfig, params: P.Params, tokens,
                        starts, max_len: int, **static) -> Method:
  """A prefill of the base alone on part of the prompt: compiled with its static settings, FLOPs from
  flops_fn(T, attention=...) per row, and the FLOPs-ideal speed-up over the full prefill."""
  c, cs = aot_compile(prefill, cfg, params, tokens, starts, max_len=max_len, **static)
  B, T = tokens.shape
  f, f0 = B * flops_fn(T, attention=True), B * flops_fn(T, attention=False)
  return Method(name, None, lambda: c(params, tokens, starts), cs, f, f0, xla_peak_bytes(c),
                _speedup_extra(cfg, B, T, f, f0), settings)


def lazyllm_bench_method(cfg: ModelConfig, params: P.Params, tokens, starts, max_len: int, schedule) -> Method:
  """TTFT of LazyLLM's progressively pruned prefill (`pruning.lazyllm_prefill`; decode not measured)."""
  from kvp_jax.baselines import pruning
  schedule = pruning.check_schedule(schedule, cfg.num_layers)
  lm = pruning.lazyllm_method(cfg, params, schedule)
  return _base_pruned_method("lazyllm", pruning.lazyllm_prefill,
                             lambda T, attention: pruning.lazyllm_flops(cfg, T, schedule, attention=attention),
                             {"schedule": lm.settings["schedule"]}, cfg, params, tokens, starts, max_len,
                             schedule=schedule)


def random_prune_bench_method(cfg: ModelConfig, params: P.Params, tokens, starts, max_len: int, keep: float,
                              seed: int = 0) -> Method:
  """TTFT of the base on a random `keep` fraction of each prompt (`pruning.random_prune_prefill`)."""
  from kvp_jax.baselines import pruning
  pm = pruning.random_prune_method(cfg, params, keep, seed)
  return _base_pruned_method("random_prune", pruning.random_prune_prefill,
                             lambda T, attention: pruning.random_prune_flops(cfg, T, keep, attention=attention),
                             dict(pm.settings), cfg, params, tokens, starts, max_len, keep=keep, seed=seed)


def static_prune_bench_method(cfg: ModelConfig, params: P.Params, tokens, starts, max_len: int, keep: float,
                              probe_fraction: float = 0.25) -> Method:
  """TTFT of pruning once from the first layers' attention (`pruning.static_prune_prefill`)."""
  from kvp_jax.baselines import pruning
  pm = pruning.static_prune_method(cfg, params, keep, probe_fraction)
  return _base_pruned_method(
      "static_prune", pruning.static_prune_prefill,
      lambda T, attention: pruning.static_prune_flops(cfg, T, keep, probe_fraction, attention=attention),
      dict(pm.settings), cfg, params, tokens, starts, max_len, keep=keep, probe_fraction=probe_fraction)


def swiftkv_bench_method(cfg: ModelConfig, params: P.Params, tokens, starts, max_len: int, cutoff: float) -> Method:
  """TTFT of SwiftKV (`swiftkv.swiftkv_prefill`) with projections initialised from the base (training changes
  their values, not the time), and its own decode step for TPOT."""
  from kvp_jax.baselines import swiftkv
  skv = swiftkv.init_from_base(cfg, params, swiftkv.cutoff_layers(cfg.num_layers, cutoff))
  sm = swiftkv.swiftkv_method(cfg, params, skv)
  k = swiftkv.cutoff(cfg, skv)
  c, cs = aot_compile(swiftkv.swiftkv_prefill, cfg, params, skv, tokens, starts, max_len=max_len)
  B, T = tokens.shape
  f, f0 = B * swiftkv.swiftkv_flops(cfg, k, T), B * swiftkv.swiftkv_flops(cfg, k, T, attention=False)
  tok = jnp.zeros((B, 1), jnp.int32)
  step, step_cs = aot_compile(swiftkv.swiftkv_step, cfg, params, skv, tok, jax.eval_shape(
      lambda: swiftkv.swiftkv_prefill(cfg, params, skv, tokens, starts, max_len=max_len)[1]))
  extra = {**_speedup_extra(cfg, B, T, f, f0), "decode_compile_s": step_cs}
  return Method("swiftkv", None, lambda: c(params, skv, tokens, starts), cs, f, f0, xla_peak_bytes(c), extra,
                dict(sm.settings), decode=lambda tokens_B1, state: step(params, skv, tokens_B1, state))


def specprefill_bench_method(cfg: ModelConfig, params: P.Params, draft_name: str, draft_cfg: ModelConfig,
                             draft: P.Params, tokens, starts, max_len: int, keep: float) -> Method:
  """TTFT of SpecPrefill (`specprefill.specprefill_prefill`): the draft's prefill and look-ahead, the scores, the
  base's prefill of the kept chunks."""
  from kvp_jax.baselines import specprefill
  sm = specprefill.specprefill_method(cfg, params, draft_cfg, draft, keep, draft_name)
  c, cs = aot_compile(specprefill.specprefill_prefill, cfg, params, draft_cfg, draft, tokens, starts, max_len=max_len,
                      keep=keep)
  B, T = tokens.shape
  f = B * specprefill.specprefill_flops(cfg, draft_cfg, T, keep)
  f0 = B * specprefill.specprefill_flops(cfg, draft_cfg, T, keep, attention=False)
  return Method("specprefill", draft_name, lambda: c(params, draft, tokens, starts), cs, f, f0, xla_peak_bytes(c),
                _speedup_extra(cfg, B, T, f, f0), dict(sm.settings))


def gemfilter_bench_method(cfg: ModelConfig, params: P.Params, tokens, starts, max_len: int, topk: int,
                           layer: int | None = None) -> Method:
  """TTFT of GemFilter (`gemfilter.gemfilter_prefill`): pass 1 to the selection layer, pass 2 on topk tokens."""
  from kvp_jax.baselines import gemfilter
  gm = gemfilter.gemfilter_method(cfg, params, topk, layer)
  layer = gm.settings["layer"]
  return _base_pruned_method(
      "gemfilter", gemfilter.gemfilter_prefill,
      lambda T, attention: gemfilter.gemfilter_flops(cfg, T, topk, layer, attention=attention),
      dict(gm.settings), cfg, params, tokens, starts, max_len, topk=topk, layer=layer)


def tpot(cfg: ModelConfig, params: P.Params, caches: dict[str, Any], steps: int, warmup: int = 1,
         own_steps: dict[str, tuple[Callable, Any]] | None = None):
  """Seconds per `decoder.decode_step` from each named cache (same shapes, so one compiled step), interleaved
  with `own_steps` (name -> (compiled step, initial state)) of methods whose decode is their own.

  Each cache is advanced by its own chain of steps; the caches must have room for warmup + steps tokens.
  Returns ({name: [seconds]}, compile_s of the base's step).
  """
  first = next(iter(caches.values()))
  tok = jnp.zeros((first.batch, 1), jnp.int32)
  step, cs = aot_compile(decoder.decode_step, cfg, params, tok, first)
  state = {k: jax.tree.map(jnp.copy, c) for k, c in caches.items()}  # the step donates its cache
  steppers = {k: lambda t, c: step(params, t, c) for k in caches}
  for k, (fn, s0) in (own_steps or {}).items():
    state[k], steppers[k] = jax.tree.map(jnp.copy, s0), fn

  def advance(k):
    def call():
      _, state[k] = steppers[k](tok, state[k])
      return jax.tree.leaves(state[k])[0]
    return call

  return time_interleaved({k: advance(k) for k in state}, steps, warmup), cs
