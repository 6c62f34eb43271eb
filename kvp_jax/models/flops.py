"""Analytic FLOPs of a decoder's prefill and decode for a ModelConfig (2 FLOPs per multiply-add).

Counted: every matmul the code runs (q/k/v/o projections, SwiGLU, the LM head where logits are computed) and,
separately, the attention products QK^T and PV. Not counted: norms, RoPE, softmax, the
embedding gather (memory-bound and small next to the matmuls).

Attention of a query at context c (it sees c keys) costs 4 * L * c * d_attn (QK^T and PV, d_attn = N * H).
A causal prefill of T tokens therefore costs sum_{c=1..T} 4 L c d_attn = 2 L d_attn T (T + 1): per token that
is the 2 * n_layer * d_attn * N_ctx of METHOD.md with the causal context averaging (T + 1) / 2.
`paper_ttft_flops` is the KV Prediction paper's own TTFT count, T * cost_aux(1), which leaves out the
attention term, the predictor and the base's step.

Bytes that must be read (the memory half of a roofline): every weight a call multiplies by, once, and the KV
cache a cached step attends to. A weight element costs 2 FLOPs per token, so a call's weight bytes are its
matmul FLOPs for one token / 2 x itemsize; the embedding gather (B*T rows) and norms are left out, and so are
K/V a prefill writes and re-reads (they could stay in cache; the bound is a lower one).
Shape legend: see kvp_jax/models/config.py.
"""

from __future__ import annotations

from kvp_jax.models.config import ModelConfig


def layer_matmul_flops_per_token(cfg: ModelConfig) -> int:
  """q/k/v/o projections and the SwiGLU MLP of one layer, for one token."""
  D, F, N, K, H = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  return 2 * (D * (N + 2 * K) * H + N * H * D + 3 * D * F)


def lm_head_flops_per_token(cfg: ModelConfig) -> int:
  return 2 * cfg.hidden_size * cfg.vocab_size


def attention_flops(cfg: ModelConfig, num_queries: int, context_before: int = 0) -> int:
  """QK^T + PV of `num_queries` consecutive causal queries that follow `context_before` cached tokens."""
  T, c0 = num_queries, context_before
  keys_seen = T * c0 + T * (T + 1) // 2
  return 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * keys_seen


def forward_flops(cfg: ModelConfig, num_tokens: int, *, context_before: int = 0, logits_positions: int = 1,
                  batch: int = 1, attention: bool = True) -> int:
  """One forward call over `num_tokens` new tokens per row (prefill, extend or decode)."""
  f = num_tokens * cfg.num_layers * layer_matmul_flops_per_token(cfg)
  f += logits_positions * lm_head_flops_per_token(cfg)
  if attention:
    f += attention_flops(cfg, num_tokens, context_before)
  return batch * f


def prefill_flops(cfg: ModelConfig, prompt_len: int, *, batch: int = 1, attention: bool = True) -> int:
  """`model.prefill`: T causal tokens, LM head at the last position only."""
  return forward_flops(cfg, prompt_len, batch=batch, attention=attention)


def decode_flops(cfg: ModelConfig, context_len: int, *, batch: int = 1, attention: bool = True) -> int:
  """One generated token after `context_len` cached ones (it attends to context_len + 1 keys)."""
  return forward_flops(cfg, 1, context_before=context_len, batch=batch, attention=attention)


def weight_bytes(flops_one_token: int, itemsize: int = 4) -> int:
  """Bytes of the weights behind `flops_one_token` matmul FLOPs for one token (2 FLOPs per weight element)."""
  return flops_one_token // 2 * itemsize


def kv_cache_bytes(cfg: ModelConfig, context_len: int, *, batch: int = 1, itemsize: int = 4) -> int:
  """K and V of `context_len` slots in every layer."""
  return 2 * cfg.num_layers * batch * context_len * cfg.kv_width * itemsize


def prefill_read_bytes(cfg: ModelConfig, *, itemsize: int = 4) -> int:
  """`prefill`: every layer's weights and the LM head, once (whatever T and B)."""
  return weight_bytes(forward_flops(cfg, 1, attention=False), itemsize)


def decode_read_bytes(cfg: ModelConfig, context_len: int, *, batch: int = 1, itemsize: int = 4) -> int:
  """One cached step after `context_len` slots: the weights once, and the K/V it attends to."""
  return prefill_read_bytes(cfg, itemsize=itemsize) + kv_cache_bytes(cfg, context_len + 1, batch=batch,
                                                                     itemsize=itemsize)


def paper_ttft_flops(aux: ModelConfig, prompt_len: int, *, batch: int = 1) -> int:
  """The paper's count: T * cost_aux(1), cost_aux(1) = the aux's matmul FLOPs for one token with its LM head."""
  per_token = aux.num_layers * layer_matmul_flops_per_token(aux) + lm_head_flops_per_token(aux)
  return batch * prompt_len * per_token
