"""The KV cache: one pytree type for the base's own cache and for a cache predicted by KV Prediction.

Layout and conventions
- k, v: [L, B, K, S, H], preallocated to S = max_len. The [K, S, H] order makes attention a plain batched
  matmul over (B, K) on XLA's CPU backend.
- Keys are stored *after* the layer's key norm (Qwen3) and RoPE; values as projected. KV Prediction predicts
  keys before both; `keys_to_cache` turns such pre-RoPE keys at given positions into cache entries.
- Rows are left-padded: row b's first real token sits at slot `starts[b]`, so every row's next token goes to
  the same slot `end` and writes are a single dynamic_update_slice. The position of slot s in row b is
  s - starts[b] (negative means padding, which attention masks out).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from kvp_jax.models import rope
from kvp_jax.models.config import ModelConfig
from kvp_jax.models.layers import rms_norm


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  k: Any  # [L, B, K, S, H] keys after key norm and RoPE
  v: Any  # [L, B, K, S, H]
  starts: Any  # [B] int32: slot of each row's first real token (left padding before it)
  end: Any  # [] int32: next slot to write, shared by all rows

  @property
  def max_len(self) -> int:
    return self.k.shape[3]

  @property
  def batch(self) -> int:
    return self.k.shape[1]

  def lengths(self):
    """[B] number of real tokens held per row."""
    return self.end - self.starts

  def slot_positions(self):
    """[B, S] position of every slot in every row (negative for padding)."""
    return jnp.arange(self.max_len, dtype=jnp.int32)[None, :] - self.starts[:, None]

  def replace(self, **kw) -> "KVCache":
    return dataclasses.replace(self, **kw)


def empty(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32, starts=None) -> KVCache:
  shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim)
  starts = jnp.zeros((batch,), jnp.int32) if starts is None else jnp.asarray(starts, jnp.int32)
  return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), starts=starts, end=jnp.zeros((), jnp.int32))


def keys_to_cache(cfg: ModelConfig, k_norm_weight, k_pre_BTKH, positions_BT):
  """Pre-RoPE, pre-key-norm keys [B, T, K, H] at `positions` -> cache-ready keys [B, T, K, H]."""
  if k_norm_weight is not None:
    k_pre_BTKH = rms_norm(k_pre_BTKH, k_norm_weight, cfg.rms_norm_eps)
  return rope.apply_rope(k_pre_BTKH, positions_BT, cfg)


def write_layer(cache: KVCache, layer: int, k_BTKH, v_BTKH, slot) -> KVCache:
  """Writes one layer's K/V for T consecutive slots starting at `slot` (same for every row)."""
  k_BKTH = jnp.swapaxes(k_BTKH, 1, 2).astype(cache.k.dtype)[None]
  v_BKTH = jnp.swapaxes(v_BTKH, 1, 2).astype(cache.v.dtype)[None]
  zero = jnp.zeros((), jnp.int32)
  idx = (jnp.asarray(layer, jnp.int32), zero, zero, jnp.asarray(slot, jnp.int32), zero)
  return cache.replace(k=jax.lax.dynamic_update_slice(cache.k, k_BKTH, idx),
                       v=jax.lax.dynamic_update_slice(cache.v, v_BKTH, idx))


def from_layers(k_LBTKH, v_LBTKH, starts, max_len: int, dtype=None) -> KVCache:
  """Builds a cache from per-layer K/V of T prompt slots (already cache-ready keys), padded to max_len."""
  L, B, T, K, H = k_LBTKH.shape
  if T > max_len:
    raise ValueError(f"{T} prompt slots do not fit a cache of max_len={max_len}; raise max_len")
  dtype = dtype or k_LBTKH.dtype
  pad = ((0, 0), (0, 0), (0, 0), (0, max_len - T), (0, 0))
  k = jnp.pad(jnp.swapaxes(k_LBTKH, 2, 3).astype(dtype), pad)
  v = jnp.pad(jnp.swapaxes(v_LBTKH, 2, 3).astype(dtype), pad)
  return KVCache(k=k, v=v, starts=jnp.asarray(starts, jnp.int32), end=jnp.asarray(T, jnp.int32))
