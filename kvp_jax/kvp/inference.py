"""KV Prediction inference: the aux model reads the prompt, the predictor fills the base's cache, the base
emits the first token from it and generates alone afterwards (METHOD.md, "Inference").

Prompts are left-padded [B, T] with per-row `starts` (kvp_jax/models/cache.py), so every row's last prompt token sits
in the last column: the aux reads columns [0, T-1), the base reads column T-1.
Shape legend: see kvp_jax/models/config.py.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from kvp_jax.kvp import aux_models, predictor
from kvp_jax.kvp.flops import kvp_flops
from kvp_jax.kvp.predictor import KVPConfig, PredictorParams
from kvp_jax.models import cache as kv_cache
from kvp_jax.models import compile_options, decoder
from kvp_jax.models.cache import KVCache
from kvp_jax.models.params import Params
from kvp_jax.ttft import method as ttft


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVPParams:
  """The trained half of KV Prediction: the auxiliary model and the predictor (the base stays frozen)."""
  aux: Params
  pred: PredictorParams

  def replace(self, **kw) -> "KVPParams":
    return dataclasses.replace(self, **kw)


def build(base_cfg, base: Params, aux_spec=None, *, kind: str = "kv", init: str = "identity",
          layer_map=None, seed: int = 0, tokenizers=(None, None)) -> tuple[KVPConfig, KVPParams]:
  """An untrained aux model + predictor for a base: aux_spec is an aux_models.AuxSpec (default KVP-LP 0.5).
  tokenizers: (base's, aux's), when known; a KVP-C aux is then checked against the base's tokenizer too."""
  aux_spec = aux_spec or aux_models.AuxSpec()
  aux_model = None
  if aux_spec.kind == "c" and aux_spec.checkpoint:
    from kvp_jax.models import checkpoints  # orbax/grain only when a checkpoint is read
    aux_model = checkpoints.load_model(aux_spec.checkpoint)
  aux_cfg, aux, default_map = aux_models.build_aux(aux_spec, base_cfg, base, seed, aux_model, tokenizers)
  lm = aux_models.check_layer_map(layer_map or default_map, base_cfg.num_layers, aux_cfg.num_layers)
  kcfg = KVPConfig(base=base_cfg, aux=aux_cfg, kind=kind, layer_map=lm)
  return kcfg, KVPParams(aux, predictor.init(kcfg, jax.random.PRNGKey(seed + 2), how=init))


def positions(tokens_BT, starts_B):
  T = tokens_BT.shape[1]
  return jnp.arange(T, dtype=jnp.int32)[None, :] - jnp.asarray(starts_B, jnp.int32)[:, None]


def predict_layers(kcfg: KVPConfig, kp: KVPParams, tokens_BT, positions_BT):
  """Runs the aux model and the predictor: L_B x LayerKV of pre-RoPE keys and values, [B, T, K, H] each."""
  aux_out = decoder.forward_layers(kcfg.aux, kp.aux, tokens_BT, positions_BT, compute_logits=False,
                                   **predictor.collect_flags(kcfg.kind))
  return predictor.predict(kcfg, kp.pred, aux_out)


def cache_from_layers(kcfg: KVPConfig, base: Params, kv, starts_B, positions_BT, max_len: int) -> KVCache:
  """Predicted pre-RoPE K/V -> a base KVCache: the base's key norm and RoPE at the true positions."""
  ks = jnp.stack([kv_cache.keys_to_cache(kcfg.base, lp.k_norm, l.k, positions_BT)
                  for lp, l in zip(base.layers, kv)])
  vs = jnp.stack([l.v for l in kv])
  return kv_cache.from_layers(ks, vs, starts_B, max_len, dtype=base.embed.dtype)


def predict_cache(kcfg: KVPConfig, base: Params, kp: KVPParams, tokens_BT, starts_B, max_len: int) -> KVCache:
  """The base cache KV Prediction builds for all T columns of `tokens` (no base compute but key norm/RoPE)."""
  pos = positions(tokens_BT, starts_B)
  return cache_from_layers(kcfg, base, predict_layers(kcfg, kp, tokens_BT, pos), starts_B, pos, max_len)


@functools.partial(jax.jit, static_argnames=("kcfg", "max_len"), compiler_options=compile_options.CACHE_WRITE)
def kvp_prefill(kcfg: KVPConfig, base: Params, kp: KVPParams, tokens_BT, starts_B, max_len: int):
  """TTFT path: aux + predictor on the first T-1 columns, then the base's step on the last column.

  Returns (logits [B, V] for the first generated token, the base cache holding T prompt slots).
  """
  T = tokens_BT.shape[1]
  if T < 2:
    raise ValueError("KV Prediction needs prompts of at least 2 tokens (the aux reads all but the last)")
  if T > max_len:
    raise ValueError(f"prompt of {T} tokens does not fit a cache of max_len={max_len}; raise max_len")
  c = predict_cache(kcfg, base, kp, tokens_BT[:, :-1], starts_B, max_len)
  return decoder.forward(kcfg.base, base, tokens_BT[:, -1:], None, c, all_logits=False)


@functools.partial(jax.jit, static_argnames=("kcfg", "max_len"))
def predicted_and_true_cache(kcfg: KVPConfig, base: Params, kp: KVPParams, tokens_BT, starts_B, max_len: int):
  """Both caches for the same T prompt slots, to compare like with like: (predicted, base's own)."""
  pred = predict_cache(kcfg, base, kp, tokens_BT, starts_B, max_len)
  _, true = decoder.prefill(kcfg.base, base, tokens_BT, starts_B, max_len)
  return pred, true


def layer_errors(pred: KVCache, true: KVCache) -> dict[str, Any]:
  """Mean |pred - true| of K and of V per layer over real (non-padding) slots: {'k': [L], 'v': [L]}."""
  valid = (true.slot_positions() >= 0) & (jnp.arange(true.max_len)[None] < true.end)  # [B, S]
  w = valid[None, :, None, :, None].astype(jnp.float32)
  denom = jnp.maximum(w.sum((1, 2, 3, 4)), 1.0) * true.k.shape[2] * true.k.shape[4]
  err = lambda a, b: (jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)) * w).sum((1, 2, 3, 4)) / denom
  return {"k": err(pred.k, true.k), "v": err(pred.v, true.v)}


def generate(kcfg: KVPConfig, base: Params, kp: KVPParams, prompt_ids, max_new_tokens: int, *,
             pad_id: int = 0, stop_tokens=(), max_len: int | None = None, **sampling):
  """KV-Prediction generation: ids [B, T + n] for an array of prompts (as `generation.generate` returns).

  The aux model and predictor build the base's cache (`kvp_prefill`); every later token is the base's alone.
  `sampling` takes generation.decode_from's greedy/temperature/top_k/top_p/key.
  """
  import numpy as np

  from kvp_jax.models import generation
  rows = generation._as_rows(prompt_ids)
  longest = max(len(r) for r in rows)
  generation.check_request(kcfg.base, rows, max_new_tokens, max_len)
  bucket = generation.bucket_length(longest, max_len=None if max_len is None else max_len - max_new_tokens)
  cache_len = max_len or bucket + max_new_tokens
  tokens, starts = generation.pad_prompts(rows, pad_id, bucket)
  first, cache = kvp_prefill(kcfg, base, kp, jnp.asarray(tokens), jnp.asarray(starts), cache_len)
  new = generation.decode_from(kcfg.base, base, first, cache, max_new_tokens, stop_tokens=stop_tokens,
                               pad_id=pad_id, **sampling).tokens
  return np.concatenate([np.stack(rows), np.asarray(new)], axis=1) if len(set(map(len, rows))) == 1 else (
      [r.tolist() + g for r, g in zip(rows, np.asarray(new).tolist())])


def kvp_method(kcfg: KVPConfig, base: Params, kp: KVPParams, aux: str) -> ttft.Method:
  """KV Prediction behind the one TTFT-method interface: prefill is `kvp_prefill`, decode is the base's."""
  return ttft.Method(
      name="kvp", aux=aux,
      prefill=lambda tokens, starts, max_len: kvp_prefill(kcfg, base, kp, tokens, starts, max_len),
      step=ttft.decoder_step(kcfg.base, base),
      ttft_flops=lambda n: float(kvp_flops(kcfg.base, kcfg.aux, n, in_width=kcfg.in_width, kind=kcfg.kind)),
      ttft_flops_paper=lambda n: ttft.paper_flops(kcfg.aux, n))
