"""Selective recomputation (kvfun's hybrid, done right): KV Prediction fills the base's cache, then the base
recomputes the K/V of the prompt positions that matter most, in one pass, before it emits the first token.

`recompute_prefill`, for left-padded prompts [B, T] whose last column is the base's own step (kvp/inference.py):
1. aux + predictor on columns [0, T-1) give the predicted base cache; the aux's attention maps give each
   token's importance: "column" (kvfun) the attention it receives, summed over queries and averaged over
   layers and heads; "last_row" the attention the last aux token pays it, averaged over layers and heads.
2. `chosen_mask`: the first and last `edge_fraction` of each row's prompt (ceil, per row) always; then windows
   of `interval_size` tokens centred on the `num_intervals` most important tokens outside the edges, clipped
   to the row. Their union merges windows that overlap or touch. Padding is never chosen.
3. one base pass over the chosen tokens gathered into R = `budget(...)` columns (static; the bound rounded up
   to a multiple of `multiple`; unused columns are dummies whose writes are dropped): per layer their K/V are
   computed at their true positions and scattered over the predicted ones, then their queries attend to the
   cache's prompt slots with key_pos <= query_pos, so each sees predicted K/V where nothing was recomputed
   and recomputed K/V where something was. The last layer needs only their K/V, so its attention and MLP are
   skipped.
4. the base's step on the last column, exactly as in KV Prediction.
Budget 0 (no edges, no windows) is plain `inference.kvp_prefill`; edges of 0.5 recompute every token, which is the
base's own prefill.
Shape legend: see kvp_jax/models/config.py; here also P = T - 1 aux columns, I windows, R the recompute budget.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kvp_jax.baselines.pruning import ceil_fraction
from kvp_jax.kvp import inference, predictor
from kvp_jax.kvp.flops import kvp_flops
from kvp_jax.kvp.predictor import KVPConfig
from kvp_jax.models import attention
from kvp_jax.models import cache as kv_cache
from kvp_jax.models import compile_options, decoder, flops
from kvp_jax.models.cache import KVCache
from kvp_jax.models.config import ModelConfig
from kvp_jax.models.layers import rms_norm
from kvp_jax.models.params import Params
from kvp_jax.ttft import method as ttft

IMPORTANCE = ("column", "last_row")
_MASKED = -1e30  # finite, as in attention.py: a fully masked row stays finite


def _probs(q_BTNH, k_BKSH, mask_BTS):
  """Attention probabilities [B, K, G, T, S] in float32."""
  s = jnp.where(mask_BTS[:, None, None], attention.scores(q_BTNH, k_BKSH), _MASKED)
  return jax.nn.softmax(s, axis=-1)


def token_importance(qk, pos_BP, how: str = "column"):
  """[B, P] importance of every aux column from the aux's per-layer (rotated q, cache-ready k)."""
  if how not in IMPORTANCE:
    raise ValueError(f"importance must be one of {IMPORTANCE}, got {how!r}")
  B, P = pos_BP.shape
  total_BP = jnp.zeros((B, P), jnp.float32)
  for q_BPNH, k_BKPH in qk:
    if how == "last_row":
      p = _probs(q_BPNH[:, -1:], k_BKPH, attention.causal_mask(pos_BP[:, -1:], pos_BP))
      total_BP += p.mean((1, 2))[:, 0]
      continue
    # Block-causal query chunks, as in attention.causal_self_attention, so no [P, P] map per layer is held.
    chunk = attention.auto_chunk(P)
    for c0 in range(0, P, chunk):
      c1 = min(P, c0 + chunk)
      p = _probs(q_BPNH[:, c0:c1], k_BKPH[:, :, :c1], attention.causal_mask(pos_BP[:, c0:c1], pos_BP[:, :c1]))
      real_q = (pos_BP[:, c0:c1] >= 0)[:, None, None, :, None]  # padding queries' uniform rows count for nothing
      total_BP = total_BP.at[:, :c1].add(jnp.where(real_q, p, 0.0).sum((1, 2, 3)) / q_BPNH.shape[2])
  return total_BP / len(qk)


def budget(prompt_len: int, num_intervals: int, interval_size: int, edge_fraction: float,
           multiple: int = 16) -> int:
  """Static number of recomputed columns for prompts bucketed to `prompt_len`: edges + windows, rounded up."""
  need = 2 * ceil_fraction(prompt_len, edge_fraction) + num_intervals * interval_size
  if need == 0:
    return 0
  return min(prompt_len - 1, -(-need // multiple) * multiple)


def chosen_mask(importance_BP, starts_B, *, num_intervals: int, interval_size: int, edge_fraction: float):
  """[B, P] bool: the aux columns the base recomputes (edges + windows around the most important tokens)."""
  B, P = importance_BP.shape
  col_1P = jnp.arange(P, dtype=jnp.int32)[None]
  starts_B1 = jnp.asarray(starts_B, jnp.int32)[:, None]
  pos_BP = col_1P - starts_B1
  n_B1 = P + 1 - starts_B1  # prompt length, the base's last token included
  real = pos_BP >= 0
  e_B1 = ceil_fraction(n_B1, edge_fraction)
  edge = real & ((pos_BP < e_B1) | (pos_BP >= n_B1 - e_B1))
  if num_intervals == 0 or interval_size == 0:
    return edge
  score = jnp.where(real & ~edge, importance_BP.astype(jnp.float32), -jnp.inf)
  top_BI, centre_BI = jax.lax.top_k(score, min(num_intervals, P))
  lo_BI1 = (centre_BI - interval_size // 2)[..., None]
  win_BIP = (top_BI > -jnp.inf)[..., None] & (col_1P[:, None] >= lo_BI1) & (col_1P[:, None] < lo_BI1 + interval_size)
  return edge | (real & win_BIP.any(1))


def intervals(mask_P) -> list[tuple[int, int]]:
  """Host-side: the merged windows [start, end) of one row's chosen mask (runs of True)."""
  m = np.concatenate([[False], np.asarray(mask_P, bool), [False]]).astype(np.int8)
  d = np.diff(m)
  return list(zip(np.flatnonzero(d == 1).tolist(), np.flatnonzero(d == -1).tolist()))


def gather_chosen(chosen_BP, R: int):
  """The first R chosen columns of each row in ascending order: (cols [B, R], valid [B, R])."""
  cols_BR = jnp.argsort(~chosen_BP, axis=-1, stable=True)[:, :R].astype(jnp.int32)
  return cols_BR, jnp.take_along_axis(chosen_BP, cols_BR, axis=-1)


def recompute_layers(cfg: ModelConfig, params: Params, cache: KVCache, tokens_BP, cols_BR, valid_BR) -> KVCache:
  """One base pass over the tokens at columns cols of tokens [B, P] (at their true positions), writing their K/V
  over the cache's. Only the P prompt slots are read: the cache's free tail never enters attention."""
  B, R = cols_BR.shape
  S, P = cache.max_len, tokens_BP.shape[1]
  pos_BR = jnp.where(valid_BR, cols_BR - cache.starts[:, None], -1)
  slot_BR = jnp.where(valid_BR, cols_BR, S)  # out of range: dummy columns' writes are dropped
  b_BR = jnp.broadcast_to(jnp.arange(B)[:, None], (B, R))
  mask_BRP = attention.causal_mask(pos_BR, cache.slot_positions()[:, :P])
  x = params.embed[jnp.take_along_axis(tokens_BP, cols_BR, axis=1)]
  ck, cv = cache.k, cache.v
  for i, lp in enumerate(params.layers):
    h = rms_norm(x, lp.attn_norm, cfg.rms_norm_eps)
    q, k, v = decoder.project_qkv(cfg, lp, h)
    k = kv_cache.keys_to_cache(cfg, lp.k_norm, k, pos_BR)
    ck = ck.at[i, b_BR, :, slot_BR].set(k.astype(ck.dtype), mode="drop")
    cv = cv.at[i, b_BR, :, slot_BR].set(v.astype(cv.dtype), mode="drop")
    if i + 1 < cfg.num_layers:
      q = decoder.rotate_queries(cfg, lp, q, pos_BR)
      o = attention.masked_attention(q, ck[i, :, :, :P], cv[i, :, :, :P], mask_BRP)
      x = decoder.attn_out_and_mlp(cfg, lp, x, o)
  return cache.replace(k=ck, v=cv)


_STATIC = ("kcfg", "max_len", "num_intervals", "interval_size", "edge_fraction", "importance", "multiple")


@functools.partial(jax.jit, static_argnames=_STATIC, compiler_options=compile_options.CACHE_WRITE)
def recompute_prefill(kcfg: KVPConfig, base: Params, kp: inference.KVPParams, tokens_BT, starts_B, max_len: int, *,
                      num_intervals: int, interval_size: int, edge_fraction: float = 0.1,
                      importance: str = "column", multiple: int = 16):
  """KV Prediction + selective recomputation: (logits [B, V] of the first new token, the base cache)."""
  T = tokens_BT.shape[1]
  if T < 2:
    raise ValueError("recomputation needs prompts of at least 2 tokens (the aux reads all but the last)")
  if T > max_len:
    raise ValueError(f"prompt of {T} tokens does not fit a cache of max_len={max_len}; raise max_len")
  if importance not in IMPORTANCE:
    raise ValueError(f"importance must be one of {IMPORTANCE}, got {importance!r}")
  R = budget(T, num_intervals, interval_size, edge_fraction, multiple)
  last_B1 = tokens_BT[:, -1:]
  if R == 0:  # exactly inference.kvp_prefill
    c = inference.predict_cache(kcfg, base, kp, tokens_BT[:, :-1], starts_B, max_len)
    return decoder.forward(kcfg.base, base, last_B1, None, c, all_logits=False)
  aux_BP = tokens_BT[:, :-1]
  pos_BP = inference.positions(aux_BP, starts_B)
  windows = num_intervals > 0 and interval_size > 0  # edges alone need no importance
  aux_out = decoder.forward_layers(kcfg.aux, kp.aux, aux_BP, pos_BP, compute_logits=False, collect_qk=windows,
                                   **predictor.collect_flags(kcfg.kind))
  c = inference.cache_from_layers(kcfg, base, predictor.predict(kcfg, kp.pred, aux_out), starts_B, pos_BP, max_len)
  imp_BP = token_importance(aux_out.qk, pos_BP, importance) if windows else jnp.zeros(pos_BP.shape, jnp.float32)
  chosen_BP = chosen_mask(imp_BP, starts_B, num_intervals=num_intervals, interval_size=interval_size,
                          edge_fraction=edge_fraction)
  cols_BR, valid_BR = gather_chosen(chosen_BP, R)
  c = recompute_layers(kcfg.base, base, c, aux_BP, cols_BR, valid_BR)
  return decoder.forward(kcfg.base, base, last_B1, None, c, all_logits=False)


def recompute_flops(kcfg: KVPConfig, prompt_len: int, *, num_intervals: int, interval_size: int,
                    edge_fraction: float = 0.1, importance: str = "column", multiple: int = 16,
                    attention: bool = True) -> int:
  """FLOPs of `recompute_prefill` for one prompt of n tokens: KV Prediction + importance + the R-token pass.

  The R computed columns (the bucketed budget, dummies included: the program runs them) cost q/k/v at every
  base layer and o-projection, MLP and attention at all but the last. Attention context: the first and last
  edges exactly, the other columns (windows, data-dependent) at the mid-prompt context n / 2.
  """
  n, P = prompt_len, prompt_len - 1
  f = kvp_flops(kcfg.base, kcfg.aux, n, in_width=kcfg.in_width, kind=kcfg.kind,
                attention=attention)
  R = budget(n, num_intervals, interval_size, edge_fraction, multiple)
  if R == 0:
    return f
  a, b = kcfg.aux, kcfg.base
  D, F, N, K, H, L = b.hidden_size, b.intermediate_size, b.num_heads, b.num_kv_heads, b.head_dim, b.num_layers
  qkv = 2 * D * (N + 2 * K) * H
  f += R * (L * qkv + (L - 1) * (flops.layer_matmul_flops_per_token(b) - qkv))
  if num_intervals and interval_size:  # importance reads the last aux layer's queries, which plain KVP skips
    f += P * 2 * a.hidden_size * a.num_heads * a.head_dim
  if attention:
    if num_intervals and interval_size:  # edges alone need no importance
      f += 2 * a.num_layers * a.num_heads * a.head_dim * (P * (P + 1) // 2 if importance == "column" else P)
    if R >= P:
      keys = P * (P + 1) // 2
    else:
      e = min(ceil_fraction(n, edge_fraction), P)
      head, tail = e * (e + 1) // 2, (e - 1) * (2 * n - e) // 2
      keys = head + tail + max(0, R - 2 * e + 1) * (n // 2)
    f += 4 * (L - 1) * N * H * keys
  return f


def recompute_method(kcfg: KVPConfig, base: Params, kp: inference.KVPParams, aux: str, num_intervals: int,
                     interval_size: int, edge_fraction: float = 0.1, importance: str = "column",
                     multiple: int = 16) -> ttft.Method:
  """`kvp_recompute` as a ttft.Method: one point per budget on the Pareto plot; decodes with the base."""
  kw = dict(num_intervals=num_intervals, interval_size=interval_size, edge_fraction=edge_fraction,
            importance=importance, multiple=multiple)
  paper = lambda n: float(flops.paper_ttft_flops(kcfg.aux, n)) + budget(
      n, num_intervals, interval_size, edge_fraction, multiple) * kcfg.base.num_layers * float(
          flops.layer_matmul_flops_per_token(kcfg.base))
  return ttft.Method(
      name="kvp_recompute", aux=aux,
      prefill=lambda tokens, starts, max_len: recompute_prefill(kcfg, base, kp, tokens, starts, max_len, **kw),
      step=ttft.decoder_step(kcfg.base, base),
      ttft_flops=lambda n: float(recompute_flops(kcfg, n, **kw)),
      ttft_flops_paper=paper,
      settings={k: v for k, v in kw.items() if k != "multiple"})
