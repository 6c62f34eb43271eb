"""Analytic FLOPs of prefill, decode and KV Prediction for a ModelConfig (2 FLOPs per multiply-add).

Counted: every matmul the code runs (q/k/v/o projections, SwiGLU, the LM head where logits are computed, the
KV predictor) and, separately, the attention products QK^T and PV. Not counted: norms, RoPE, softmax, the
embedding gather (memory-bound and small next to the matmuls).

Attention of a query at context c (it sees c keys) costs 4 * L * c * d_attn (QK^T and PV, d_attn = N * H).
A causal prefill of T tokens therefore costs sum_{c=1..T} 4 L c d_attn = 2 L d_attn T (T + 1): per token that
is the 2 * n_layer * d_attn * N_ctx of METHOD.md with the causal context averaging (T + 1) / 2.
`paper_ttft_flops` is the KV Prediction paper's own TTFT count, T * cost_aux(1), which leaves out the
attention term, the predictor and the base's step.
Shape legend: see kvp_jax/config.py.
"""

from __future__ import annotations

from kvp_jax.config import ModelConfig


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


def predictor_flops(base: ModelConfig, in_width: int, num_tokens: int, *, batch: int = 1) -> int:
  """Per base layer, one [in_width -> K_b * H_b] map for K and one for V, over every token."""
  return batch * num_tokens * base.num_layers * 2 * (2 * in_width * base.kv_width)


def aux_prediction_flops(aux: ModelConfig, num_tokens: int, *, kind: str = "kv", batch: int = 1,
                         attention: bool = True) -> int:
  """The part of the aux's forward pass KV Prediction uses: every layer but the last in full; of the last, its
  K/V projections (kind "kv") or nothing but its input (kind "activation"). The rest of the last layer feeds
  nothing, and XLA drops it from the compiled program (measured: a 12-layer forward that returns only K/V
  runs in 11/12 of the time), so it is not counted."""
  if kind not in ("kv", "activation"):
    raise ValueError(f"kind must be 'kv' or 'activation', got {kind!r}")
  n, L = num_tokens, aux.num_layers
  f = n * (L - 1) * layer_matmul_flops_per_token(aux)
  if kind == "kv":
    f += n * 2 * aux.hidden_size * 2 * aux.kv_width
  if attention:
    f += attention_flops(aux, n) // L * (L - 1)
  return batch * f


def kvp_flops(base: ModelConfig, aux: ModelConfig, prompt_len: int, *, in_width: int | None = None,
              kind: str = "kv", batch: int = 1, attention: bool = True) -> int:
  """`kvp.kvp_prefill`: aux forward on T - 1 tokens (what of it the predictor needs), predictor, the base's
  step on token T."""
  T = prompt_len
  in_width = (aux.kv_width if kind == "kv" else aux.hidden_size) if in_width is None else in_width
  f = aux_prediction_flops(aux, T - 1, kind=kind, batch=batch, attention=attention)
  f += predictor_flops(base, in_width, T - 1, batch=batch)
  f += decode_flops(base, T - 1, batch=batch, attention=attention)
  return f


def paper_ttft_flops(aux: ModelConfig, prompt_len: int, *, batch: int = 1) -> int:
  """The paper's count: T * cost_aux(1), cost_aux(1) = the aux's matmul FLOPs for one token with its LM head."""
  per_token = aux.num_layers * layer_matmul_flops_per_token(aux) + lm_head_flops_per_token(aux)
  return batch * prompt_len * per_token


def ideal_kvp_speedup(base: ModelConfig, aux: ModelConfig, prompt_len: int, *, in_width: int | None = None,
                      kind: str = "kv", attention: bool = True) -> float:
  """The base's prefill FLOPs over KV Prediction's: the TTFT speed-up if time were proportional to FLOPs."""
  return prefill_flops(base, prompt_len, attention=attention) / kvp_flops(
      base, aux, prompt_len, in_width=in_width, kind=kind, attention=attention)
