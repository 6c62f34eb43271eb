"""GemFilter (Shi et al., arXiv 2409.17422; SalesforceAIResearch/GemFilter): the base's own early layers choose
the tokens, and the whole model reads only those, as a fresh, shorter prompt.

As their code does it (my_baseline/GemFilter/gem_filter_utils.py, my_utils/my_generation.py)
- Pass 1: layers 0..r on the whole prompt. At layer r the last token's query (after RoPE) scores every key
  (after RoPE, GQA keys repeated): the raw q.k (no 1/sqrt(H), no softmax), summed over heads, average-pooled over
  positions (kernel 5, padding 2, zeros counted at the edges); the top min(k, n) tokens, sorted by position.
  Nothing is force-kept. Pass 1's K/V are discarded.
- Pass 2: the kept tokens as a new prompt (positions 0..m-1) through the full model; decoding continues from
  that cache (positions m, m + 1, ...).
- r = 13 of Llama-3.1-8B's 32 layers (pass 1 runs 14), k = 1024.
What differs: batches of left-padded rows (theirs asserts batch 1); pass 1 computes of layer r only what the
score needs (its keys, the last token's query) where theirs also runs layer r's attention and MLP and the LM
head; the default r scales their Llama setting (pass 1 runs round(14/32 * L) layers).
Shape legend: see kvp_jax/models/config.py; here also C kept (compact) columns.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kvp_jax.baselines import pruning
from kvp_jax.models import attention, decoder, flops
from kvp_jax.models import cache as kv_cache
from kvp_jax.models.config import ModelConfig
from kvp_jax.models.layers import dense, rms_norm
from kvp_jax.models.params import Params
from kvp_jax.ttft import method as ttft


def default_layer(num_layers: int) -> int:
  """Their Llama-3.1-8B choice scaled: pass 1 runs round(14/32 * L) layers, so r is one less."""
  return max(1, round(14 / 32 * num_layers)) - 1


def _avg_pool(x_BT, kernel: int):
  """torch avg_pool1d(kernel, padding=kernel // 2, stride 1, count_include_pad=True) along the last axis."""
  s = jax.lax.reduce_window(x_BT, 0.0, jax.lax.add, (1, kernel), (1, 1), ((0, 0), (kernel // 2, kernel // 2)))
  return s / kernel


def token_scores(cfg: ModelConfig, params: Params, tokens_BT, starts_B, layer: int, pool_kernel: int = 5):
  """[B, T] pooled scores of pass 1 (-inf at padding)."""
  B, T = tokens_BT.shape
  _, real_BT, pos_BT = pruning._prompt_layout(tokens_BT, starts_B)
  x = params.embed[tokens_BT]
  for i in range(layer):
    lp = params.layers[i]
    q, k, v = decoder.project_qkv(cfg, lp, rms_norm(x, lp.attn_norm, cfg.rms_norm_eps))
    q = decoder.rotate_queries(cfg, lp, q, pos_BT)
    k = kv_cache.keys_to_cache(cfg, lp.k_norm, k, pos_BT)
    o = attention.causal_self_attention(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), pos_BT)
    x = decoder.attn_out_and_mlp(cfg, lp, x, o)
  lp = params.layers[layer]
  h = rms_norm(x, lp.attn_norm, cfg.rms_norm_eps)
  k = dense(h, lp.wk)  # every key, but only the last token's query
  q = dense(h[:, -1:], lp.wq)
  if lp.bq is not None:
    q, k = q + lp.bq, k + lp.bk
  k = kv_cache.keys_to_cache(cfg, lp.k_norm, k, pos_BT)  # [B, T, K, H]
  q = decoder.rotate_queries(cfg, lp, q, pos_BT[:, -1:])[:, 0]  # [B, N, H]
  K = cfg.num_kv_heads
  q = q.reshape(B, K, cfg.num_heads // K, cfg.head_dim)
  s = jnp.einsum("BKGH,BTKH->BT", q, k, preferred_element_type=jnp.float32)
  # Padding scores 0 before pooling, as torch's zero padding at the left edge of their unpadded prompt.
  s = _avg_pool(jnp.where(real_BT, s, 0.0), pool_kernel)
  return jnp.where(real_BT, s, -jnp.inf)


@functools.partial(jax.jit, static_argnames=("cfg", "max_len", "topk", "layer", "pool_kernel"))
def gemfilter_prefill(cfg: ModelConfig, params: Params, tokens_BT, starts_B, max_len: int, *, topk: int,
                      layer: int, pool_kernel: int = 5):
  """Pass 1 picks min(topk, n) tokens per row, pass 2 prefills them as a new prompt: (logits [B, V], cache)."""
  T = tokens_BT.shape[1]
  if not 0 <= layer < cfg.num_layers:
    raise ValueError(f"GemFilter's selection layer {layer} is not a layer of this {cfg.num_layers}-layer model")
  starts_B, n_B = pruning._prune_inputs(tokens_BT, starts_B, max_len)
  score = token_scores(cfg, params, tokens_BT, starts_B, layer, pool_kernel)
  C = min(topk, T)
  m_B = jnp.minimum(n_B, topk)
  idx_BC, _ = pruning._select(score, m_B, C)
  return decoder.prefill(cfg, params, pruning._take(tokens_BT, idx_BC), C - m_B, C + max_len - T)


def gemfilter_flops(cfg: ModelConfig, prompt_len: int, topk: int, layer: int, *, attention: bool = True) -> int:
  """Pass 1: layers 0..r-1 over n tokens, layer r's key projection over n and query for the last token, the
  scores; pass 2: a prefill of min(topk, n) tokens."""
  D, N, K, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  n = prompt_len
  f = layer * flops.forward_flops(cfg.replace(num_layers=1), n, logits_positions=0, attention=attention)
  f += n * 2 * D * K * H + 2 * D * N * H
  if attention:
    f += 2 * N * H * n
  return f + flops.prefill_flops(cfg, min(topk, n), attention=attention)


def gemfilter_method(cfg: ModelConfig, params: Params, topk: int, layer: int | None = None,
                     pool_kernel: int = 5) -> ttft.Method:
  layer = default_layer(cfg.num_layers) if layer is None else int(layer)
  if not 0 <= layer < cfg.num_layers:
    raise ValueError(f"GemFilter's selection layer {layer} is not a layer of this {cfg.num_layers}-layer model")
  return ttft.Method(
      name="gemfilter", aux=None,
      prefill=lambda tokens, starts, max_len: gemfilter_prefill(cfg, params, tokens, starts, max_len, topk=topk,
                                                                layer=layer, pool_kernel=pool_kernel),
      step=ttft.decoder_step(cfg, params),
      ttft_flops=lambda n: float(gemfilter_flops(cfg, n, topk, layer)),
      ttft_flops_paper=lambda n: float(gemfilter_flops(cfg, n, topk, layer, attention=False)),
      settings={"topk": topk, "layer": layer})
