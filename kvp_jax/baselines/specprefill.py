"""SpecPrefill (Liu et al., ICML 2025; Jingyu6/speculative_prefill, the `*_full_lah8` configs of its LongBench
runs): a small draft model chooses which prompt chunks the base prefills.

As their code does it (vllm_patch/worker/look_ahead_spec_worker.py)
- The draft prefills the prompt and greedily decodes look-ahead tokens; the queries (after RoPE) of the last
  prompt token and of the first `look_ahead - 1` generated tokens (8 queries in all) are scored against the
  prompt's keys only: softmax(q k^T / sqrt(H)) per layer, head and query (GQA keys repeated), average-pooled
  over positions (kernel 13, padding 6, zeros counted at the edges), max over layers x heads, mean over the
  queries up to the first end-of-sequence token: one importance per prompt token.
- 32-token chunks from the prompt's first token (the last one may be shorter), each scored by its mean; the
  top ceil(p * n_chunks) chunks are kept, in their original order.
- The base prefills only the kept tokens, at their original positions; the first token comes from the last
  kept token's logits, and decoding continues at the true prompt length (RoPE position n, n + 1, ...).
What we add: `keep_last` keeps the prompt's last chunk on top of the ceil(p * n_chunks) best of the others
(llama.cpp's port keeps "the top-p fraction of chunks plus BOS and prompt boundary tokens"; theirs forces
nothing, so their first token may be predicted from an earlier position); it is recorded in the row's settings,
and the FLOPs count the extra chunk. Per-row end-of-sequence ids come from the draft's config (theirs hard-code Llama-3's),
and every row uses its own last token (theirs indexes a flattened batch, right only for a batch of one).
Scores and softmax are float32 throughout (theirs cast the softmax back to bf16 before pooling).

The base's part is the pruning baselines' compact cache (baselines/pruning.py): the kept tokens gathered into C columns
left-padded with dummies, keys rotated at their true positions, decoded with `pruning.positioned_step`.
Shape legend: see kvp_jax/models/config.py; here also Q look-ahead queries, C kept (compact) columns, X chunks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kvp_jax.baselines import pruning
from kvp_jax.models import attention, decoder, flops
from kvp_jax.models import cache as kv_cache
from kvp_jax.models.config import ModelConfig
from kvp_jax.models.layers import rms_norm
from kvp_jax.models.params import Params
from kvp_jax.ttft import method as ttft

_MASKED = -1e30  # finite, as in attention.py


def _layer_step(cfg, lp, x_BTD, pos_BT, cache, i, slot, attend):
  q, k, v = decoder.project_qkv(cfg, lp, rms_norm(x_BTD, lp.attn_norm, cfg.rms_norm_eps))
  q = decoder.rotate_queries(cfg, lp, q, pos_BT)
  k = kv_cache.keys_to_cache(cfg, lp.k_norm, k, pos_BT)
  cache = kv_cache.write_layer(cache, i, k, v, slot)
  return decoder.attn_out_and_mlp(cfg, lp, x_BTD, attend(q, k, v, cache)), q, cache


@functools.partial(jax.jit, static_argnames=("cfg", "look_ahead"))
def draft_queries(cfg: ModelConfig, draft: Params, tokens_BT, starts_B, look_ahead: int):
  """The draft's prefill and greedy look-ahead: (queries [Q, L, B, N, H] after RoPE, valid [Q, B], keys of the
  prompt [L, B, K, T, H]). Query 0 is the last prompt token's; query s >= 1 is that of the s-th generated token,
  valid while no end-of-sequence token came before it (theirs: up to the step that generated one)."""
  B, T = tokens_BT.shape
  pos = jnp.arange(T, dtype=jnp.int32)[None, :] - starts_B[:, None]
  cache = kv_cache.empty(cfg, B, T + look_ahead - 1, draft.embed.dtype, starts_B)
  x, qs = draft.embed[tokens_BT], []
  attend = lambda q, k, v, c: attention.causal_self_attention(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), pos)
  for i, lp in enumerate(draft.layers):
    x, q, cache = _layer_step(cfg, lp, x, pos, cache, i, 0, attend)
    qs.append(q[:, -1])
  logits = decoder.lm_logits(cfg, draft, x[:, -1])
  cache = cache.replace(end=jnp.asarray(T, jnp.int32))
  eos = jnp.asarray(cfg.eos_token_id or (-1,), jnp.int32)

  def step(carry, _):
    cache, logits, alive = carry
    tok_B = jnp.argmax(logits, -1).astype(jnp.int32)
    alive = alive & ~jnp.isin(tok_B, eos)
    slot = cache.end
    p = (slot - cache.starts)[:, None]
    mask = attention.causal_mask(p, cache.slot_positions()) & (jnp.arange(cache.max_len)[None, None] <= slot)
    x, q_l = draft.embed[tok_B[:, None]], []
    for i, lp in enumerate(draft.layers):
      x, q, cache = _layer_step(cfg, lp, x, p, cache, i, slot,
                                lambda q, k, v, c, i=i: attention.masked_attention(q, c.k[i], c.v[i], mask))
      q_l.append(q[:, 0])
    logits = decoder.lm_logits(cfg, draft, x[:, 0])
    return (cache.replace(end=slot + 1), logits, alive), (jnp.stack(q_l), alive)

  alive0 = jnp.ones((B,), bool)
  (cache, _, _), (q_rest, alive) = jax.lax.scan(step, (cache, logits, alive0), None, length=look_ahead - 1)
  queries = jnp.concatenate([jnp.stack(qs)[None], q_rest], axis=0)
  valid = jnp.concatenate([alive0[None], alive], axis=0)
  return queries, valid, cache.k[:, :, :, :T]


def _avg_pool(x_BT, kernel: int):
  """torch avg_pool1d(kernel, padding=kernel // 2, stride 1, count_include_pad=True) along the last axis."""
  pad = [(0, 0)] * (x_BT.ndim - 1) + [(kernel // 2, kernel // 2)]
  s = jax.lax.reduce_window(x_BT, 0.0, jax.lax.add, (1,) * (x_BT.ndim - 1) + (kernel,), (1,) * x_BT.ndim, pad)
  return s / kernel


@functools.partial(jax.jit, static_argnames=("cfg", "look_ahead", "pool_kernel"))
def token_importance(cfg: ModelConfig, draft: Params, tokens_BT, starts_B, *, look_ahead: int = 8,
                     pool_kernel: int = 13):
  """[B, T] importance of every prompt token (0 at padding), as the released code computes it."""
  B, T = tokens_BT.shape
  starts = jnp.asarray(starts_B, jnp.int32)
  queries, valid_QB, keys = draft_queries(cfg, draft, tokens_BT, starts, look_ahead)
  Q, L, _, N, H = queries.shape
  K = cfg.num_kv_heads
  q = queries.reshape(Q, L, B, K, N // K, H)
  s = jnp.einsum("QLBKGH,LBKTH->QLBKGT", q, keys, preferred_element_type=jnp.float32) * (H ** -0.5)
  real_BT = jnp.arange(T)[None, :] >= starts[:, None]
  p = jax.nn.softmax(jnp.where(real_BT[None, None, :, None, None], s, _MASKED), axis=-1)
  # Padding is exactly 0 here, so pooling across the left edge counts zeros, as torch's zero padding does.
  p = _avg_pool(jnp.where(real_BT[None, None, :, None, None], p, 0.0), pool_kernel)
  per_query = jnp.max(p, axis=(1, 3, 4))  # [Q, B, T]: max over layers x heads
  w = valid_QB.astype(jnp.float32)[..., None]
  imp = jnp.sum(per_query * w, axis=0) / jnp.sum(w, axis=0)
  return jnp.where(real_BT, imp, 0.0)


def kept_chunks(num_chunks, keep: float, keep_last: bool):
  """ceil(keep * n) chunks, plus the last one with keep_last (ints or int arrays)."""
  k = pruning.ceil_fraction(num_chunks, keep)
  if not keep_last:
    return k
  return min(num_chunks, k + 1) if isinstance(num_chunks, int) else jnp.minimum(num_chunks, k + 1)


def kept_columns(T: int, keep: float, chunk: int, keep_last: bool) -> int:
  """Static compact width: every kept chunk a whole one of `chunk` tokens."""
  return min(T, chunk * kept_chunks(-(-T // chunk), keep, keep_last))


@functools.partial(jax.jit, static_argnames=("keep", "chunk", "keep_last"))
def select_chunks(imp_BT, starts_B, *, keep: float, chunk: int = 32, keep_last: bool = True):
  """[B, T] kept-token mask: the top ceil(keep * n_chunks) chunks by mean importance (and the last chunk on top
  with keep_last), chunks counted from each row's first real token."""
  B, T = imp_BT.shape
  X = -(-T // chunk)
  rel = jnp.arange(T, dtype=jnp.int32)[None, :] - starts_B[:, None]
  real = rel >= 0
  cid_BT = jnp.where(real, rel // chunk, X)
  onehot = (cid_BT[..., None] == jnp.arange(X)).astype(jnp.float32)  # [B, T, X]
  mean_BX = jnp.einsum("BT,BTX->BX", imp_BT, onehot) / jnp.maximum(onehot.sum(1), 1.0)
  n_chunks = -(-(T - starts_B) // chunk)
  score = jnp.where(jnp.arange(X)[None] < n_chunks[:, None], mean_BX, -jnp.inf)
  if keep_last:
    score = jnp.where(jnp.arange(X)[None] == n_chunks[:, None] - 1, jnp.inf, score)
  order = jnp.argsort(-score, axis=-1, stable=True)
  rank = jnp.argsort(order, axis=-1)
  chosen_BX = rank < kept_chunks(n_chunks, keep, keep_last)[:, None]
  return real & jnp.take_along_axis(chosen_BX, jnp.minimum(cid_BT, X - 1), axis=-1)


@functools.partial(jax.jit, static_argnames=("cfg", "draft_cfg", "max_len", "keep", "look_ahead", "chunk",
                                             "pool_kernel", "keep_last"))
def specprefill_prefill(cfg: ModelConfig, params: Params, draft_cfg: ModelConfig, draft: Params, tokens_BT,
                        starts_B, max_len: int, *, keep: float, look_ahead: int = 8, chunk: int = 32,
                        pool_kernel: int = 13, keep_last: bool = True):
  """The draft picks chunks, the base prefills them at their true positions: (logits [B, V], state)."""
  T = tokens_BT.shape[1]
  starts_B, n_B = pruning._prune_inputs(tokens_BT, starts_B, max_len)
  imp = token_importance(draft_cfg, draft, tokens_BT, starts_B, look_ahead=look_ahead, pool_kernel=pool_kernel)
  kept_BT = select_chunks(imp, starts_B, keep=keep, chunk=chunk, keep_last=keep_last)
  m_B = jnp.sum(kept_BT, axis=-1, dtype=jnp.int32)
  _, _, pos_BT = pruning._prompt_layout(tokens_BT, starts_B)
  idx_BC, valid_BC = pruning._select(jnp.where(kept_BT, 0.0, -jnp.inf), m_B, kept_columns(T, keep, chunk, keep_last))
  pos_BC = jnp.where(valid_BC, pruning._take(pos_BT, idx_BC), -1)
  x_BCD, ks, vs, _ = pruning._run_layers(cfg, params, 0, cfg.num_layers, params.embed[pruning._take(tokens_BT, idx_BC)],
                                         pos_BC, valid_BC, probe_from=cfg.num_layers)
  return pruning._finish_compact(cfg, params, x_BCD, ks, vs, valid_BC, m_B, T, starts_B, max_len)


def kept_tokens(prompt_len: int, keep: float, chunk: int = 32, keep_last: bool = True) -> int:
  """Tokens the base prefills for a prompt of n: exact with keep_last (the short last chunk is among them),
  else the most it can be (whole chunks)."""
  n = prompt_len
  X = -(-n // chunk)
  kc = kept_chunks(X, keep, keep_last)
  return min(n, chunk * (kc - 1) + (n - chunk * (X - 1))) if keep_last else min(n, chunk * kc)


def specprefill_flops(cfg: ModelConfig, draft_cfg: ModelConfig, prompt_len: int, keep: float, *,
                      look_ahead: int = 8, chunk: int = 32, keep_last: bool = True, attention: bool = True) -> int:
  """The draft's prefill and look_ahead - 1 decode steps (each with its LM head), the look-ahead queries'
  scores against the n prompt keys, and the base's prefill of the kept tokens."""
  n = prompt_len
  f = flops.prefill_flops(draft_cfg, n, attention=attention)
  f += sum(flops.decode_flops(draft_cfg, n + i, attention=attention) for i in range(look_ahead - 1))
  if attention:
    f += look_ahead * draft_cfg.num_layers * 2 * draft_cfg.num_heads * draft_cfg.head_dim * n
  return f + flops.prefill_flops(cfg, kept_tokens(n, keep, chunk, keep_last), attention=attention)


def specprefill_method(cfg: ModelConfig, params: Params, draft_cfg: ModelConfig, draft: Params, keep: float,
                       draft_name: str, look_ahead: int = 8, chunk: int = 32, pool_kernel: int = 13,
                       keep_last: bool = True) -> ttft.Method:
  if draft_cfg.vocab_size != cfg.vocab_size:
    raise ValueError(f"SpecPrefill's draft has vocab_size={draft_cfg.vocab_size}, the base {cfg.vocab_size}; "
                     "the draft must share the base's tokenizer")
  kw = dict(look_ahead=look_ahead, chunk=chunk, pool_kernel=pool_kernel, keep_last=keep_last)
  return ttft.Method(
      name="specprefill", aux=draft_name,
      prefill=lambda tokens, starts, max_len: specprefill_prefill(cfg, params, draft_cfg, draft, tokens, starts,
                                                                  max_len, keep=keep, **kw),
      step=lambda tokens, state: pruning.positioned_step(cfg, params, tokens, state),
      ttft_flops=lambda n: float(specprefill_flops(cfg, draft_cfg, n, keep, look_ahead=look_ahead, chunk=chunk,
                                                   keep_last=keep_last)),
      ttft_flops_paper=lambda n: float(specprefill_flops(cfg, draft_cfg, n, keep, look_ahead=look_ahead,
                                                         chunk=chunk, keep_last=keep_last, attention=False)),
      settings={"keep": keep, **kw})
