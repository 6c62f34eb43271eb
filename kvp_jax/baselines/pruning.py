"""Token-pruning TTFT baselines (the KV Prediction paper's set): LazyLLM, random pruning, static pruning.

LazyLLM (Fu et al., 2024; METHOD.md)
- prefill: every prompt token enters layer 0. Before each schedule layer l the tokens still kept are ranked by
  the attention the last token paid them at layer l - 1 (averaged over heads), and the top `fraction` of them
  (ceil, per row) go on; the last token always does. Static shapes: the kept tokens are gathered into a
  compact, left-padded block of C_s = ceil(fraction * C_{s-1}) columns fixed at trace time (C_0 = T); a row
  with fewer real tokens fills the block's front with dummies (position -1, masked like padding).
- decode (`lazyllm_step`): every step re-selects from all tokens with the same schedule, led by the new
  token's attention. A token pruned at layer l and selected again is revived: its K/V at l come from its
  hidden state entering l, held in the Aux Cache, and it runs layer l (and the next ones while it stays
  selected). So the layers a token was computed at always form a prefix 0..depth-1, one hidden state per
  token (the one entering layer `depth`) is the whole Aux Cache, and no (token, layer) K/V is ever computed
  twice: `LazyState.kv_count` counts every K/V computation, so tests can check it.
- where the static version departs from the paper: (1) revivals are capped per step (`max_revive`, static),
  so a decode step computes 1 + max_revive tokens per layer; past the cap the next most important tokens
  already computed are kept instead; (2) a stage keeps ceil(fraction * kept) tokens per row (a rank, not an
  importance percentile: the same up to ties); (3) decode attention reads the whole cache under a mask,
  so pruning saves no decode attention FLOPs (the prefill, which sets TTFT, is genuinely smaller).
Random pruning keeps ceil(keep * n) prompt tokens per row at random (seeded, drawn per (position, token id), so
a prompt keeps the same tokens whatever its padding), always the last; the base runs on them at their true
positions. Static pruning runs the first `probe_fraction` of layers on every token, ranks tokens once by the
last token's attention averaged over those layers and heads, and runs the other layers on the kept ones only
(reusing the probe layers' K/V of the kept tokens). Both leave a compact cache of the kept tokens (keys rotated
at their true positions) from which the plain base decodes, positions passed explicitly.
Shape legend: see kvp_jax/models/config.py; here also C kept (compact) columns, W tokens computed per decode layer.
"""

from __future__ import annotations

import dataclasses
import fractions
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from kvp_jax.models import attention
from kvp_jax.models import cache as kv_cache
from kvp_jax.models import compile_options, decoder, flops
from kvp_jax.models.cache import KVCache
from kvp_jax.models.config import ModelConfig
from kvp_jax.models.layers import rms_norm
from kvp_jax.models.params import Params
from kvp_jax.ttft import method as ttft

_MASKED = -1e30  # finite, as in attention.py


def ceil_fraction(n, frac: float):
  """ceil(frac * n) in exact integer arithmetic (ints or int arrays): 0.7 * 10 is 7, not 8."""
  if not 0.0 <= frac <= 1.0:
    raise ValueError(f"fraction must be in [0, 1], got {frac}")
  f = fractions.Fraction(frac).limit_denominator(1000)
  return (n * f.numerator + f.denominator - 1) // f.denominator


def check_schedule(schedule, num_layers: int) -> tuple[tuple[int, float], ...]:
  """((layer, keep fraction), ...) with 1 <= layer < L increasing and 0 < fraction <= 1."""
  schedule = tuple((int(l), float(f)) for l, f in schedule)
  layers = [l for l, _ in schedule]
  if layers != sorted(set(layers)) or any(not 1 <= l < num_layers for l in layers):
    raise ValueError(f"schedule layers {layers} must increase strictly within [1, {num_layers - 1}] "
                     "(layer 0 has no previous layer's attention to rank by)")
  if any(not 0.0 < f <= 1.0 for _, f in schedule):
    raise ValueError(f"schedule keep fractions must be in (0, 1], got {[f for _, f in schedule]}")
  return schedule


def parse_schedule(text: str) -> tuple[tuple[int, float], ...]:
  """'4:0.7,8:0.5' -> ((4, 0.7), (8, 0.5)) (the flag form)."""
  return tuple((int(l), float(f)) for l, f in (item.split(":") for item in text.split(",") if item.strip()))


# ----------------------------------------------------------------------------------------------- shared parts


def _take(x_BC, idx_BK):
  """Gathers columns along axis 1 of a [B, C, ...] array."""
  return jnp.take_along_axis(x_BC, idx_BK.reshape(idx_BK.shape + (1,) * (x_BC.ndim - 2)), axis=1)


def _last_query_probs(q_B1NH, k_BKSH, key_mask_BS):
  """[B, S] one query's attention per row, averaged over heads, in float32."""
  s_BKGS = attention.scores(q_B1NH, k_BKSH)[:, :, :, 0]
  return jax.nn.softmax(jnp.where(key_mask_BS[:, None, None], s_BKGS, _MASKED), axis=-1).mean((1, 2))


def _select(score_BC, n_B, k: int):
  """The n_B highest scores per row (n_B <= k, static k) as compact indices [B, k], left-padded: dummies first,
  then the chosen in ascending column order (so positions increase, as block-causal attention needs)."""
  _, idx_Bk = jax.lax.top_k(score_BC, k)
  valid_Bk = jnp.arange(k)[None] < n_B[:, None]
  order_Bk = jnp.argsort(jnp.where(valid_Bk, idx_Bk, -1), axis=-1, stable=True)
  return jnp.take_along_axis(idx_Bk, order_Bk, axis=-1), jnp.take_along_axis(valid_Bk, order_Bk, axis=-1)


def _layer_qkv(cfg: ModelConfig, lp, x_BCD, pos_BC):
  q, k, v = decoder.project_qkv(cfg, lp, rms_norm(x_BCD, lp.attn_norm, cfg.rms_norm_eps))
  return decoder.rotate_queries(cfg, lp, q, pos_BC), kv_cache.keys_to_cache(cfg, lp.k_norm, k, pos_BC), v


def _run_layers(cfg: ModelConfig, params: Params, lo: int, hi: int, x_BCD, pos_BC, valid_BC, probe_from: int):
  """Base layers [lo, hi) over C causal columns (positions increasing; -1 = dummy or padding).

  Returns (x, ks, vs, probs): ks/vs per layer [B, C, K, H] (cache-ready keys), probs [B, C] the last column's
  attention summed over layers >= probe_from (None if there are none).
  """
  ks, vs, probs = [], [], None
  for i in range(lo, hi):
    lp = params.layers[i]
    q, k, v = _layer_qkv(cfg, lp, x_BCD, pos_BC)
    ks.append(k)
    vs.append(v)
    k_BKCH, v_BKCH = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    if i >= probe_from:
      p = _last_query_probs(q[:, -1:], k_BKCH, valid_BC)
      probs = p if probs is None else probs + p
    x_BCD = decoder.attn_out_and_mlp(cfg, lp, x_BCD, attention.causal_self_attention(q, k_BKCH, v_BKCH, pos_BC))
  return x_BCD, ks, vs, probs


def _prompt_layout(tokens_BT, starts_B):
  B, T = tokens_BT.shape
  col_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  valid_BT = col_BT >= starts_B[:, None]
  return col_BT, valid_BT, jnp.where(valid_BT, col_BT - starts_B[:, None], -1)


# ----------------------------------------------------------------------------------------------------- LazyLLM


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LazyState:
  cache: KVCache  # K/V [L, B, K, S, H]; slot (l, s) holds data only where kv_count[l, :, s] > 0
  hidden: Any  # [B, S, D] the Aux Cache: each token's hidden state entering layer depth = #computed layers
  kv_count: Any  # [L, B, S] int32: how many times each (layer, token) K/V was computed (never more than 1)

  def replace(self, **kw) -> "LazyState":
    return dataclasses.replace(self, **kw)

  def depth(self):
    """[B, S] number of layers each token has been computed at (a prefix 0..depth-1)."""
    return jnp.sum(self.kv_count > 0, axis=0, dtype=jnp.int32)


def _write(state: LazyState, layer: int, slot_BC, k_BCKH, v_BCKH) -> LazyState:
  """Scatters K/V at cache slots (slot == S: dropped) and counts each write."""
  B, C = slot_BC.shape
  b_BC = jnp.broadcast_to(jnp.arange(B)[:, None], (B, C))
  c = state.cache
  c = c.replace(k=c.k.at[layer, b_BC, :, slot_BC].set(k_BCKH.astype(c.k.dtype), mode="drop"),
                v=c.v.at[layer, b_BC, :, slot_BC].set(v_BCKH.astype(c.v.dtype), mode="drop"))
  return state.replace(cache=c, kv_count=state.kv_count.at[layer, b_BC, slot_BC].add(1, mode="drop"))


def _keep_hidden(state: LazyState, slot_BC, x_BCD) -> LazyState:
  B, C = slot_BC.shape
  b_BC = jnp.broadcast_to(jnp.arange(B)[:, None], (B, C))
  return state.replace(hidden=state.hidden.at[b_BC, slot_BC].set(x_BCD.astype(state.hidden.dtype), mode="drop"))


@functools.partial(jax.jit, static_argnames=("cfg", "max_len", "schedule"))
def lazyllm_prefill(cfg: ModelConfig, params: Params, tokens_BT, starts_B, max_len: int, *, schedule):
  """LazyLLM's progressively pruned prefill: (logits [B, V] of the first new token, LazyState)."""
  B, T = tokens_BT.shape
  if T > max_len:
    raise ValueError(f"prompt of {T} tokens does not fit a cache of max_len={max_len}; raise max_len")
  schedule = check_schedule(schedule, cfg.num_layers)
  starts_B = jnp.asarray(starts_B, jnp.int32)
  dtype = params.embed.dtype
  state = LazyState(kv_cache.empty(cfg, B, max_len, dtype, starts_B), jnp.zeros((B, max_len, cfg.hidden_size), dtype),
                    jnp.zeros((cfg.num_layers, B, max_len), jnp.int32))
  slot_BC, valid_BC, pos_BC = _prompt_layout(tokens_BT, starts_B)
  x_BCD = params.embed[tokens_BT]
  n_B = T - starts_B
  bounds = [0] + [l for l, _ in schedule] + [cfg.num_layers]
  fractions_ = [None] + [f for _, f in schedule]
  for lo, hi, frac in zip(bounds[:-1], bounds[1:], fractions_):
    if frac is not None:  # a stage: rank the kept tokens by the last token's attention at layer lo - 1
      state = _keep_hidden(state, jnp.where(valid_BC, slot_BC, max_len), x_BCD)
      score_BC = jnp.where(valid_BC, probs_BC, -jnp.inf).at[:, -1].set(jnp.inf)
      n_B = ceil_fraction(n_B, frac)
      idx_BC, valid_BC = _select(score_BC, n_B, ceil_fraction(slot_BC.shape[1], frac))
      slot_BC, x_BCD = _take(slot_BC, idx_BC), _take(x_BCD, idx_BC)
      pos_BC = jnp.where(valid_BC, _take(pos_BC, idx_BC), -1)
    probe_from = hi - 1 if hi < cfg.num_layers else hi  # the next stage ranks by this segment's last layer
    x_BCD, ks, vs, probs_BC = _run_layers(cfg, params, lo, hi, x_BCD, pos_BC, valid_BC, probe_from)
    write_BC = jnp.where(valid_BC, slot_BC, max_len)
    for i, (k, v) in enumerate(zip(ks, vs)):
      state = _write(state, lo + i, write_BC, k, v)
  state = _keep_hidden(state, jnp.where(valid_BC, slot_BC, max_len), x_BCD)
  state = state.replace(cache=state.cache.replace(end=jnp.asarray(T, jnp.int32)))
  return decoder.lm_logits(cfg, params, x_BCD[:, -1]), state


def _rank(score_BS):
  """[B, S] each entry's rank in its row, highest score first."""
  order = jnp.argsort(-score_BS, axis=-1, stable=True)
  return jnp.argsort(order, axis=-1).astype(jnp.int32)


@compile_options.decode_jit(static_argnames=("cfg", "schedule", "max_revive"), donate_argnums=3)
def lazyllm_step(cfg: ModelConfig, params: Params, tokens_B1, state: LazyState, *, schedule, max_revive: int = 16):
  """One LazyLLM decode step with re-selection and the Aux Cache: (logits [B, V], state)."""
  stages = dict(check_schedule(schedule, cfg.num_layers))
  c = state.cache
  B, S = c.batch, c.max_len
  W = min(1 + max_revive, S)
  new = c.end
  slot_1S = jnp.arange(S, dtype=jnp.int32)[None]
  pos_BS = c.slot_positions()
  is_new = slot_1S == new
  sel_BS = (pos_BS >= 0) & (slot_1S <= new)
  state = state.replace(hidden=state.hidden.at[:, new].set(params.embed[tokens_B1[:, 0]]))
  depth_BS = state.depth()
  n_B = jnp.sum(sel_BS, axis=-1, dtype=jnp.int32)
  revived_B = jnp.zeros((B,), jnp.int32)
  b_BW = jnp.broadcast_to(jnp.arange(B)[:, None], (B, W))
  for l, lp in enumerate(params.layers):
    if l in stages:
      imp_BS = jnp.where(is_new, jnp.inf, jnp.where(sel_BS, probs_BS, -jnp.inf))
      # Selected tokens entering layer l uncomputed are revivals; only the most important few are allowed.
      revive = sel_BS & (depth_BS == l) & ~is_new
      allowed = ~revive | (_rank(jnp.where(revive, imp_BS, -jnp.inf)) < (max_revive - revived_B)[:, None])
      score_BS = jnp.where(allowed, imp_BS, -jnp.inf)
      n_B = ceil_fraction(n_B, stages[l])
      sel_BS = (_rank(score_BS) < n_B[:, None]) & (score_BS > -jnp.inf)
      n_B = jnp.sum(sel_BS, axis=-1, dtype=jnp.int32)
      revived_B += jnp.sum(sel_BS & revive, axis=-1, dtype=jnp.int32)
    # Every selected token has depth >= l; those at exactly l (the new token, revivals) run layer l now.
    run_BS = sel_BS & (depth_BS == l)
    idx_BW = jnp.argsort(~run_BS, axis=-1, stable=True)[:, :W].astype(jnp.int32)
    ok_BW = jnp.take_along_axis(run_BS, idx_BW, axis=-1)
    qpos_BW = jnp.where(ok_BW, jnp.take_along_axis(pos_BS, idx_BW, axis=-1), -1)
    slot_BW = jnp.where(ok_BW, idx_BW, S)
    x_BWD = _take(state.hidden, idx_BW)
    q, k, v = _layer_qkv(cfg, lp, x_BWD, qpos_BW)
    state = _write(state, l, slot_BW, k, v)
    ck, cv = state.cache.k[l], state.cache.v[l]
    o = attention.masked_attention(q, ck, cv, attention.causal_mask(qpos_BW, jnp.where(sel_BS, pos_BS, -1)))
    if l + 1 in stages:  # the new token is the last run column (it has the highest slot)
      j_B = jnp.sum(ok_BW, axis=-1) - 1
      probs_BS = _last_query_probs(_take(q, j_B[:, None]), ck, sel_BS)
    x_BWD = decoder.attn_out_and_mlp(cfg, lp, x_BWD, o)
    state = state.replace(hidden=state.hidden.at[b_BW, slot_BW].set(x_BWD, mode="drop"))
    depth_BS = depth_BS + run_BS
  logits = decoder.lm_logits(cfg, params, state.hidden[:, new])
  return logits, state.replace(cache=state.cache.replace(end=new + 1))


def stage_counts(num_layers: int, prompt_len: int, schedule) -> list[tuple[int, int, int]]:
  """[(first layer, end layer, tokens)] of each LazyLLM prefill segment for a prompt of n tokens."""
  out, n, lo = [], prompt_len, 0
  for l, f in schedule:
    out.append((lo, l, n))
    lo, n = l, ceil_fraction(n, f)
  return out + [(lo, num_layers, n)]


def lazyllm_flops(cfg: ModelConfig, prompt_len: int, schedule, *, attention: bool = True) -> int:
  """LazyLLM prefill: each segment's layers over its kept tokens (causal), the ranking queries, the LM head."""
  segs = stage_counts(cfg.num_layers, prompt_len, check_schedule(schedule, cfg.num_layers))
  one = cfg.replace(num_layers=1)
  f = flops.lm_head_flops_per_token(cfg)
  for lo, hi, n in segs:
    f += (hi - lo) * flops.forward_flops(one, n, logits_positions=0, attention=attention)
  if attention:  # the last token's scores against the kept tokens at each stage's previous layer
    f += sum(2 * cfg.num_heads * cfg.head_dim * n for _, _, n in segs[:-1])
  return f


# ---------------------------------------------------------------------------------------- random / static


def _finish_compact(cfg, params, x_BCD, ks, vs, valid_BC, n_B, T: int, starts_B, max_len: int):
  """(logits, (compact cache, next positions [B])) from the kept tokens' K/V and final hidden states."""
  C = valid_BC.shape[1]
  cache = kv_cache.from_layers(jnp.stack(ks), jnp.stack(vs), C - n_B, C + max_len - T, dtype=params.embed.dtype)
  return decoder.lm_logits(cfg, params, x_BCD[:, -1]), (cache, T - starts_B)


def _random_scores(seed: int, pos_BT, tokens_BT):
  key = jax.random.PRNGKey(seed)
  draw = lambda p, t: jax.random.uniform(jax.random.fold_in(jax.random.fold_in(key, p), t))
  return jax.vmap(jax.vmap(draw))(jnp.maximum(pos_BT, 0), tokens_BT)


def _prune_inputs(tokens_BT, starts_B, max_len: int):
  T = tokens_BT.shape[1]
  if T > max_len:
    raise ValueError(f"prompt of {T} tokens does not fit a cache of max_len={max_len}; raise max_len")
  starts_B = jnp.asarray(starts_B, jnp.int32)
  return starts_B, T - starts_B


def _keep_top(score_BT, valid_BT, pos_BT, n_B, keep: float):
  """The ceil(keep * n) best-scoring real tokens of each row, the last token always among them.

  Returns (m_B kept per row, idx_BC, valid_BC, pos_BC) with C = ceil(keep * T) columns (padding has pos -1).
  """
  T = score_BT.shape[1]
  score_BT = jnp.where(valid_BT, score_BT, -jnp.inf).at[:, -1].set(jnp.inf)
  m_B = jnp.maximum(ceil_fraction(n_B, keep), 1)
  idx_BC, valid_BC = _select(score_BT, m_B, max(1, ceil_fraction(T, keep)))
  return m_B, idx_BC, valid_BC, jnp.where(valid_BC, _take(pos_BT, idx_BC), -1)


@functools.partial(jax.jit, static_argnames=("cfg", "max_len", "keep", "seed"))
def random_prune_prefill(cfg: ModelConfig, params: Params, tokens_BT, starts_B, max_len: int, *, keep: float,
                         seed: int = 0):
  """The base on a random ceil(keep * n) of each prompt (the last token always kept): (logits, state)."""
  T = tokens_BT.shape[1]
  starts_B, n_B = _prune_inputs(tokens_BT, starts_B, max_len)
  _, valid_BT, pos_BT = _prompt_layout(tokens_BT, starts_B)
  m_B, idx_BC, valid_BC, pos_BC = _keep_top(_random_scores(seed, pos_BT, tokens_BT), valid_BT, pos_BT, n_B, keep)
  x_BCD, ks, vs, _ = _run_layers(cfg, params, 0, cfg.num_layers, params.embed[_take(tokens_BT, idx_BC)], pos_BC,
                                 valid_BC, probe_from=cfg.num_layers)
  return _finish_compact(cfg, params, x_BCD, ks, vs, valid_BC, m_B, T, starts_B, max_len)


def probe_layers(num_layers: int, probe_fraction: float) -> int:
  return min(num_layers, max(1, math.ceil(probe_fraction * num_layers - 1e-9)))


@functools.partial(jax.jit, static_argnames=("cfg", "max_len", "keep", "probe_fraction"))
def static_prune_prefill(cfg: ModelConfig, params: Params, tokens_BT, starts_B, max_len: int, *, keep: float,
                         probe_fraction: float = 0.25):
  """Prune once from the first layers' attention, run the rest on the kept tokens: (logits, state)."""
  T = tokens_BT.shape[1]
  starts_B, n_B = _prune_inputs(tokens_BT, starts_B, max_len)
  _, valid_BT, pos_BT = _prompt_layout(tokens_BT, starts_B)
  P = probe_layers(cfg.num_layers, probe_fraction)
  x_BTD, ks, vs, probs_BT = _run_layers(cfg, params, 0, P, params.embed[tokens_BT], pos_BT, valid_BT, probe_from=0)
  m_B, idx_BC, valid_BC, pos_BC = _keep_top(probs_BT, valid_BT, pos_BT, n_B, keep)
  x_BCD, ks2, vs2, _ = _run_layers(cfg, params, P, cfg.num_layers, _take(x_BTD, idx_BC), pos_BC, valid_BC,
                                   probe_from=cfg.num_layers)
  ks = [_take(k, idx_BC) for k in ks] + ks2
  vs = [_take(v, idx_BC) for v in vs] + vs2
  return _finish_compact(cfg, params, x_BCD, ks, vs, valid_BC, m_B, T, starts_B, max_len)


@compile_options.decode_jit(static_argnums=0, donate_argnums=3)
def positioned_step(cfg: ModelConfig, params: Params, tokens_B1, state):
  """Base decode from a compact cache: the new token at its true position, state (cache, next positions [B])."""
  cache, pos_B = state
  logits, cache = decoder.forward(cfg, params, tokens_B1, pos_B[:, None], cache, all_logits=False)
  return logits, (cache, pos_B + 1)


def random_prune_flops(cfg: ModelConfig, prompt_len: int, keep: float, *, attention: bool = True) -> int:
  return flops.prefill_flops(cfg, max(1, ceil_fraction(prompt_len, keep)), attention=attention)


def static_prune_flops(cfg: ModelConfig, prompt_len: int, keep: float, probe_fraction: float = 0.25, *,
                       attention: bool = True) -> int:
  """Probe layers over all n tokens (+ the last token's scores there), the rest over the kept ones, LM head."""
  P, n, m = probe_layers(cfg.num_layers, probe_fraction), prompt_len, max(1, ceil_fraction(prompt_len, keep))
  one = cfg.replace(num_layers=1)
  f = P * flops.forward_flops(one, n, logits_positions=0, attention=attention)
  f += (cfg.num_layers - P) * flops.forward_flops(one, m, logits_positions=0, attention=attention)
  f += flops.lm_head_flops_per_token(cfg)
  if attention:
    f += P * 2 * cfg.num_heads * cfg.head_dim * n
  return f


# ------------------------------------------------------------------------------------------------ methods


def lazyllm_method(cfg: ModelConfig, params: Params, schedule, max_revive: int = 16) -> ttft.Method:
  schedule = check_schedule(schedule, cfg.num_layers)
  return ttft.Method(
      name="lazyllm", aux=None,
      prefill=lambda tokens, starts, max_len: lazyllm_prefill(cfg, params, tokens, starts, max_len,
                                                              schedule=schedule),
      step=lambda tokens, state: lazyllm_step(cfg, params, tokens, state, schedule=schedule,
                                              max_revive=max_revive),
      ttft_flops=lambda n: float(lazyllm_flops(cfg, n, schedule)),
      ttft_flops_paper=lambda n: float(lazyllm_flops(cfg, n, schedule, attention=False)),
      settings={"schedule": ",".join(f"{l}:{f:g}" for l, f in schedule), "max_revive": max_revive})


def random_prune_method(cfg: ModelConfig, params: Params, keep: float, seed: int = 0) -> ttft.Method:
  return ttft.Method(
      name="random_prune", aux=None,
      prefill=lambda tokens, starts, max_len: random_prune_prefill(cfg, params, tokens, starts, max_len,
                                                                   keep=keep, seed=seed),
      step=lambda tokens, state: positioned_step(cfg, params, tokens, state),
      ttft_flops=lambda n: float(random_prune_flops(cfg, n, keep)),
      ttft_flops_paper=lambda n: float(random_prune_flops(cfg, n, keep, attention=False)),
      settings={"keep": keep, "seed": seed})


def static_prune_method(cfg: ModelConfig, params: Params, keep: float, probe_fraction: float = 0.25
                        ) -> ttft.Method:
  return ttft.Method(
      name="static_prune", aux=None,
      prefill=lambda tokens, starts, max_len: static_prune_prefill(cfg, params, tokens, starts, max_len,
                                                                   keep=keep, probe_fraction=probe_fraction),
      step=lambda tokens, state: positioned_step(cfg, params, tokens, state),
      ttft_flops=lambda n: float(static_prune_flops(cfg, n, keep, probe_fraction)),
      ttft_flops_paper=lambda n: float(static_prune_flops(cfg, n, keep, probe_fraction, attention=False)),
      settings={"keep": keep, "probe_fraction": probe_fraction})
