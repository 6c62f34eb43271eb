"""The decoder (Llama / Qwen2 / Qwen3 family) as pure functions over `Params` and `KVCache` pytrees.

Entry points
- `forward(cfg, params, tokens, positions, cache=None)`: no cache -> all logits [B, T, V] (training, parity);
  with a cache -> the tokens are appended at `cache.end` and attend to the whole cache (decode / extend).
- `prefill(cfg, params, tokens, starts, max_len)`: a fresh cache from left-padded prompts, block-causal
  attention, and the LM head only at the last position unless `all_logits`.
- `forward_layers(...)`: the training path, which can replace each layer's K/V by predicted ones and collect
  each layer's pre-RoPE K/V and normalised inputs (what KV predictors read and are trained against).
Shape legend: see kvp_jax/models/config.py.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

from kvp_jax.models import attention, compile_options
from kvp_jax.models import cache as kv_cache
from kvp_jax.models import rope
from kvp_jax.models.cache import KVCache
from kvp_jax.models.config import ModelConfig
from kvp_jax.models.layers import dense, rms_norm, swiglu
from kvp_jax.models.params import LayerParams, Params, lm_head_weight

ATTENTION_MODES = ("causal", "corenet", "aligned")
# What a layer keeps for the backward pass under `forward_layers(remat=...)` (None: everything, no checkpoint).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class LayerKV(NamedTuple):
  """One layer's keys before key norm and RoPE, and values: what KV Prediction predicts."""
  k: jax.Array  # [B, T, K, H]
  v: jax.Array  # [B, T, K, H]


class ForwardOut(NamedTuple):
  logits: jax.Array  # [B, T, V] float32 (or [B, V] with last_only)
  kv: tuple | None  # L x LayerKV of the layer's own projections, if collected
  inputs: tuple | None  # L x [B, T, D]: normalised residual entering each layer's q/k/v, if collected
  hidden: jax.Array | None = None  # [B, T, D] final hidden state before the final norm
  qk: tuple | None = None  # L x (q [B, T, N, H] after RoPE, k [B, K, T, H] cache-ready), if collected


def default_positions(tokens_BT):
  B, T = tokens_BT.shape
  return jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))


def project_qkv(cfg: ModelConfig, lp: LayerParams, h_BTD):
  """q [B,T,N,H], k [B,T,K,H] (before key norm and RoPE), v [B,T,K,H] from the normalised input."""
  q = dense(h_BTD, lp.wq)
  k = dense(h_BTD, lp.wk)
  v = dense(h_BTD, lp.wv)
  if lp.bq is not None:
    q, k, v = q + lp.bq, k + lp.bk, v + lp.bv
  return q, k, v


def rotate_queries(cfg: ModelConfig, lp: LayerParams, q_BTNH, positions_BT):
  if lp.q_norm is not None:
    q_BTNH = rms_norm(q_BTNH, lp.q_norm, cfg.rms_norm_eps)
  return rope.apply_rope(q_BTNH, positions_BT, cfg)


def attn_out_and_mlp(cfg: ModelConfig, lp: LayerParams, x_BTD, o_BTNH):
  x = x_BTD + dense(o_BTNH, lp.wo, n_in=2)
  return x + swiglu(rms_norm(x, lp.mlp_norm, cfg.rms_norm_eps), lp.w_gate, lp.w_up, lp.w_down)


def _bkth(x_BTKH):
  return jnp.swapaxes(x_BTKH, 1, 2)


def lm_logits(cfg: ModelConfig, params: Params, x_BTD):
  h = rms_norm(x_BTD, params.final_norm, cfg.rms_norm_eps)
  return dense(h, lm_head_weight(params), preferred_element_type=jnp.float32)


def forward_layers(cfg: ModelConfig, params: Params, tokens_BT, positions_BT=None, *,
                   kv_override: Sequence[LayerKV] | None = None, attention_mode: str = "causal",
                   collect_kv: bool = False, collect_inputs: bool = False, compute_logits: bool = True,
                   chunk: int | None = attention.DEFAULT_CHUNK, collect_qk: bool = False,
                   remat: str = "none") -> ForwardOut:
  """Full causal forward pass without a cache.

  kv_override: per layer, predicted LayerKV (pre-RoPE keys) replacing the layer's own K/V in attention:
    attention_mode="corenet": queries attend causally to predicted K/V at every position, their own included;
    attention_mode="aligned": predicted K/V strictly before, the layer's own K/V at the query itself.
  collect_qk: per layer, the rotated queries and cache-ready own keys (attention maps for token importance,
    kvp_jax/baselines/recompute.py).
  remat: activation rematerialisation per layer under differentiation (REMAT_POLICIES): "none" keeps every
    intermediate for the backward pass; "full" keeps only each layer's input and recomputes the rest; "dots"
    keeps matmul outputs; "dots_no_batch" keeps only the weight matmuls' outputs (attention is recomputed).
  """
  if attention_mode not in ATTENTION_MODES:
    raise ValueError(f"attention_mode must be one of {ATTENTION_MODES}, got {attention_mode!r}")
  if (kv_override is None) != (attention_mode == "causal"):
    raise ValueError("kv_override is required exactly when attention_mode is 'corenet' or 'aligned'")
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat must be one of {tuple(REMAT_POLICIES)}, got {remat!r}")
  pos = default_positions(tokens_BT) if positions_BT is None else positions_BT

  def layer(x, lp, kv_pred):
    h = rms_norm(x, lp.attn_norm, cfg.rms_norm_eps)
    q, k, v = project_qkv(cfg, lp, h)
    q_rot = rotate_queries(cfg, lp, q, pos)
    k_own = _bkth(kv_cache.keys_to_cache(cfg, lp.k_norm, k, pos))
    if attention_mode == "causal":
      o = attention.causal_self_attention(q_rot, k_own, _bkth(v), pos, chunk)
    else:
      k_pred = _bkth(kv_cache.keys_to_cache(cfg, lp.k_norm, kv_pred.k, pos))
      v_pred = _bkth(kv_pred.v)
      if attention_mode == "corenet":
        o = attention.causal_self_attention(q_rot, k_pred, v_pred, pos, chunk)
      else:
        o = attention.aligned_attention(q_rot, k_pred, v_pred, k_own, _bkth(v), pos)
    return attn_out_and_mlp(cfg, lp, x, o), LayerKV(k, v), h, (q_rot, k_own)

  if remat != "none":
    layer = jax.checkpoint(layer, policy=REMAT_POLICIES[remat])
  x = params.embed[tokens_BT]
  kvs, inputs, qks = [], [], []
  for i, lp in enumerate(params.layers):
    x, kv, h, qk = layer(x, lp, None if kv_override is None else kv_override[i])
    kvs.append(kv)
    inputs.append(h)
    qks.append(qk)
  logits = lm_logits(cfg, params, x) if compute_logits else None
  return ForwardOut(logits, tuple(kvs) if collect_kv else None, tuple(inputs) if collect_inputs else None, x,
                    tuple(qks) if collect_qk else None)


def logits(cfg: ModelConfig, params: Params, tokens_BT, positions_BT=None):
  """[B, T, V] float32 logits of the full forward pass (no cache)."""
  if not isinstance(tokens_BT, jax.core.Tracer):  # concrete ids: out-of-range ones would be clamped silently
    lo, hi = int(jnp.min(tokens_BT)), int(jnp.max(tokens_BT))
    if lo < 0 or hi >= cfg.vocab_size:
      raise ValueError(f"token ids must be in [0, vocab_size={cfg.vocab_size}), got ids from {lo} to {hi}")
  return forward_layers(cfg, params, tokens_BT, positions_BT).logits


def _cached_layers(cfg: ModelConfig, params: Params, tokens_BT, pos_BT, cache: KVCache, slot, attend):
  """Every layer: project, write this layer's K/V at `slot`, then `attend(i, q, k, v, cache)`."""
  x = params.embed[tokens_BT]
  for i, lp in enumerate(params.layers):
    h = rms_norm(x, lp.attn_norm, cfg.rms_norm_eps)
    q, k, v = project_qkv(cfg, lp, h)
    q = rotate_queries(cfg, lp, q, pos_BT)
    k = kv_cache.keys_to_cache(cfg, lp.k_norm, k, pos_BT)
    cache = kv_cache.write_layer(cache, i, k, v, slot)
    x = attn_out_and_mlp(cfg, lp, x, attend(i, q, k, v, cache))
  return x, cache


def prefill(cfg: ModelConfig, params: Params, tokens_BT, starts_B=None, max_len: int | None = None, *,
            all_logits: bool = False, chunk: int | None = attention.DEFAULT_CHUNK):
  """Processes left-padded prompts [B, T] into a fresh cache of max_len slots.

  Returns (logits, cache): logits [B, V] of the last position (all rows end in the last column), or
  [B, T, V] with all_logits.
  """
  B, T = tokens_BT.shape
  max_len = T if max_len is None else max_len
  if T > max_len:
    raise ValueError(f"prompt of {T} tokens does not fit a cache of max_len={max_len}; raise max_len")
  starts = jnp.zeros((B,), jnp.int32) if starts_B is None else jnp.asarray(starts_B, jnp.int32)
  pos = jnp.arange(T, dtype=jnp.int32)[None, :] - starts[:, None]
  c = kv_cache.empty(cfg, B, max_len, params.embed.dtype, starts)
  # A fresh cache holds nothing before these tokens: attend block-causally to the new K/V alone.
  attend = lambda i, q, k, v, c: attention.causal_self_attention(q, _bkth(k), _bkth(v), pos, chunk)
  x, c = _cached_layers(cfg, params, tokens_BT, pos, c, 0, attend)
  c = c.replace(end=jnp.asarray(T, jnp.int32))
  out = lm_logits(cfg, params, x if all_logits else x[:, -1])
  return out, c


def forward(cfg: ModelConfig, params: Params, tokens_BT, positions_BT=None, cache: KVCache | None = None, *,
            all_logits: bool = True):
  """Without a cache: (logits [B, T, V], None). With one: tokens are written at slots [end, end + T) and
  attend to every real slot up to their own; returns (logits, new cache). Positions default to
  slot - start for each row."""
  if cache is None:
    return logits(cfg, params, tokens_BT, positions_BT), None
  B, T = tokens_BT.shape
  slots = cache.end + jnp.arange(T, dtype=jnp.int32)
  pos = slots[None, :] - cache.starts[:, None] if positions_BT is None else positions_BT
  mask_BTS = attention.causal_mask(pos, cache.slot_positions()) & (
      jnp.arange(cache.max_len)[None, None, :] < cache.end + T)
  attend = lambda i, q, k, v, c: attention.masked_attention(q, c.k[i], c.v[i], mask_BTS)
  x, cache = _cached_layers(cfg, params, tokens_BT, pos, cache, cache.end, attend)
  cache = cache.replace(end=cache.end + T)
  out = lm_logits(cfg, params, x if all_logits else x[:, -1])
  return out, cache


@compile_options.decode_jit(static_argnums=0, donate_argnums=3)
def decode_step(cfg: ModelConfig, params: Params, tokens_B1, cache: KVCache):
  """One cached decode step, jitted with the cache donated and compile_options.decode_options(B): (logits [B, V],
  cache)."""
  return forward(cfg, params, tokens_B1, None, cache, all_logits=False)
