"""Grouped-query attention as free functions; scores and softmax in float32.

Queries are regrouped to [B, K, G*T, H] so every score and value product is a plain batched matmul over
(B, K), the layout XLA's CPU backend runs fastest. Masks are built from positions (slot - row start), so
left padding (negative positions) and causality are one comparison.

What makes this fast on XLA:CPU (measured on a Llama-shaped 125M, 12 layers, 2048 tokens, see kvp_jax/benchmark/):
- block-causal query chunks: chunk c only reads keys [0, end of c), so the blocks above the diagonal are never
  computed (0.53 of the full square at 16 chunks instead of 1.0);
- the mask enters as an additive float bias (0 or -1e30): XLA:CPU then fuses the QK^T dot, the bias, the
  row max and the exp into one YNNPACK kernel, where a boolean `where` costs a separate pass over the
  [B, K, G, T, S] scores;
- the softmax is left unnormalised through the value product and divided once per output row ([.., H]
  instead of [.., S] divisions and one fewer pass over the scores).
An online-softmax (flash) loop over key blocks was measured too: slower here (unrolled rescaling) and
4-10x slower to compile, so it is not used.
Shape legend: see kvp_jax/models/config.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Finite, so a fully masked row (a padding query) gives a uniform average instead of NaN. Added to a float32
# score of magnitude < 1e22 it rounds to exactly -1e30, so an additive bias equals a `where` mask.
_MASKED = -1e30
# Query-chunk length of block-causal self-attention; None picks `auto_chunk(T)`.
DEFAULT_CHUNK = None
_MIN_CHUNK, _MAX_CHUNKS = 128, 16


def auto_chunk(T: int) -> int:
  """128-token chunks, widened past 2048 tokens so no prompt unrolls more than 16 chunks (compile time)."""
  c = max(_MIN_CHUNK, -(-T // _MAX_CHUNKS))
  return min(T, -(-c // _MIN_CHUNK) * _MIN_CHUNK)


def _group_queries(q_BTNH, num_kv_heads: int):
  B, T, N, H = q_BTNH.shape
  G = N // num_kv_heads
  return q_BTNH.reshape(B, T, num_kv_heads, G, H).transpose(0, 2, 3, 1, 4).reshape(B, num_kv_heads, G * T, H)


def _ungroup(o_BKQH, T: int):
  B, K, GT, H = o_BKQH.shape
  G = GT // T
  return o_BKQH.reshape(B, K, G, T, H).transpose(0, 3, 1, 2, 4).reshape(B, T, K * G, H)


def scores(q_BTNH, k_BKSH):
  """Scaled logits [B, K, G, T, S] in float32."""
  B, T, N, H = q_BTNH.shape
  K = k_BKSH.shape[1]
  q = _group_queries(q_BTNH, K)
  s_BKQS = jnp.einsum("BKQH,BKSH->BKQS", q, k_BKSH, preferred_element_type=jnp.float32)
  return (s_BKQS * (H ** -0.5)).reshape(B, K, N // K, T, -1)


def _weighted_values(p_BKGTS, v_BKSH, dtype):
  B, K, G, T, S = p_BKGTS.shape
  o = jnp.einsum("BKQS,BKSH->BKQH", p_BKGTS.reshape(B, K, G * T, S).astype(v_BKSH.dtype), v_BKSH,
                 preferred_element_type=jnp.float32)
  return _ungroup(o, T).astype(dtype)


def mask_bias(mask_BTS):
  """Boolean mask [B, T, S] -> additive float32 bias [B, 1, 1, T, S] (0 where visible, -1e30 where not)."""
  return jnp.where(mask_BTS, 0.0, _MASKED).astype(jnp.float32)[:, None, None]


def _attend_grouped(q_BKGTH, k_BKSH, v_BKSH, bias_B11TS):
  """Softmax attention of grouped, pre-scaled queries; returns float32 [B, K, G, T, H]."""
  B, K, G, T, H = q_BKGTH.shape
  S = k_BKSH.shape[2]
  s = jnp.einsum("BKQH,BKSH->BKQS", q_BKGTH.reshape(B, K, G * T, H), k_BKSH, preferred_element_type=jnp.float32)
  s_BKGTS = s.reshape(B, K, G, T, S) + bias_B11TS
  p = jnp.exp(s_BKGTS - jnp.max(s_BKGTS, axis=-1, keepdims=True))
  denom_BKGT = jnp.sum(p, axis=-1)
  o = jnp.einsum("BKQS,BKSH->BKQH", p.reshape(B, K, G * T, S).astype(v_BKSH.dtype), v_BKSH,
                 preferred_element_type=jnp.float32)
  return o.reshape(B, K, G, T, H) / denom_BKGT[..., None]


def _scaled_grouped_queries(q_BTNH, num_kv_heads: int):
  """[B, K, G, T, H] queries times H^-0.5 (folded into q: T*N*H multiplies instead of T*N*S)."""
  B, T, N, H = q_BTNH.shape
  q = (q_BTNH.astype(jnp.float32) * (H ** -0.5)).astype(q_BTNH.dtype)
  return _group_queries(q, num_kv_heads).reshape(B, num_kv_heads, N // num_kv_heads, T, H)


def _to_BTNH(o_BKGTH, dtype):
  B, K, G, T, H = o_BKGTH.shape
  return o_BKGTH.transpose(0, 3, 1, 2, 4).reshape(B, T, K * G, H).astype(dtype)


def masked_attention(q_BTNH, k_BKSH, v_BKSH, mask_BTS):
  """Attention of queries against all S keys under a boolean mask [B, T, S]; returns [B, T, N, H]."""
  q = _scaled_grouped_queries(q_BTNH, k_BKSH.shape[1])
  return _to_BTNH(_attend_grouped(q, k_BKSH, v_BKSH, mask_bias(mask_BTS)), q_BTNH.dtype)


def causal_mask(q_pos_BT, k_pos_BS, include_self: bool = True):
  """Key j is visible to query i iff it is a real token (position >= 0) and not in i's future."""
  k = k_pos_BS[:, None, :]
  q = q_pos_BT[:, :, None]
  return (k >= 0) & ((k <= q) if include_self else (k < q))


def causal_self_attention(q_BTNH, k_BKTH, v_BKTH, pos_BT, chunk: int | None = DEFAULT_CHUNK):
  """Causal attention of T tokens over themselves (prefill / training), block by block.

  Query chunk c only reads keys [0, end of c): the blocks above the diagonal are never computed. Positions
  must increase along T (left padding has negative positions). Rows of padding queries are finite and
  otherwise unspecified (a uniform average of the keys their chunk reads).
  """
  T = q_BTNH.shape[1]
  chunk = auto_chunk(T) if chunk is None else chunk
  q = _scaled_grouped_queries(q_BTNH, k_BKTH.shape[1])
  outs = []
  for c0 in range(0, T, chunk):
    c1 = min(T, c0 + chunk)
    bias = mask_bias(causal_mask(pos_BT[:, c0:c1], pos_BT[:, :c1]))
    outs.append(_attend_grouped(q[:, :, :, c0:c1], k_BKTH[:, :, :c1], v_BKTH[:, :, :c1], bias))
  o = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
  return _to_BTNH(o, q_BTNH.dtype)


def aligned_attention(q_BTNH, k_pred_BKTH, v_pred_BKTH, k_own_BKTH, v_own_BKTH, pos_BT):
  """Each query attends to *predicted* K/V strictly before it and to its *own* K/V at itself.

  This is what KV-Prediction inference does for the last prompt token (predicted cache + own KV), applied to
  every position at once for training (`--attention_mode=aligned`).
  """
  s_pred = scores(q_BTNH, k_pred_BKTH)  # [B, K, G, T, S=T]
  mask = causal_mask(pos_BT, pos_BT, include_self=False)
  s_pred = jnp.where(mask[:, None, None], s_pred, _MASKED)
  B, T, N, H = q_BTNH.shape
  K = k_own_BKTH.shape[1]
  q = q_BTNH.reshape(B, T, K, N // K, H)
  s_self = jnp.einsum("BTKGH,BKTH->BKGT", q, k_own_BKTH, preferred_element_type=jnp.float32) * (H ** -0.5)
  s_all = jnp.concatenate([s_pred, s_self[..., None]], axis=-1)
  p = jax.nn.softmax(s_all, axis=-1)
  o_pred = _weighted_values(p[..., :-1], v_pred_BKTH, jnp.float32)
  o_self = jnp.einsum("BKGT,BKTH->BTKGH", p[..., -1], v_own_BKTH.astype(jnp.float32)).reshape(B, T, N, H)
  return (o_pred + o_self).astype(q_BTNH.dtype)
