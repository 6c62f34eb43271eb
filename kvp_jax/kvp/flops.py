"""Analytic FLOPs of KV Prediction's TTFT path (`inference.kvp_prefill`): the part of the aux it runs, the
predictor, and the base's step on the last prompt token (2 FLOPs per multiply-add, as kvp_jax/models/flops.py).

Shape legend: see kvp_jax/models/config.py.
"""

from __future__ import annotations

from kvp_jax.models.config import ModelConfig
from kvp_jax.models.flops import (attention_flops, decode_flops, decode_read_bytes, layer_matmul_flops_per_token,
                                  prefill_flops, weight_bytes)


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


def kvp_read_bytes(base: ModelConfig, aux: ModelConfig, prompt_len: int, *, in_width: int | None = None,
                   kind: str = "kv", batch: int = 1, itemsize: int = 4) -> int:
  """Bytes `kvp.kvp_prefill` must read (kvp_jax/models/flops.py): the aux weights it multiplies by, the
  predictor's, and the base's last-token step (its weights and the T - 1 predicted slots it attends to)."""
  in_width = (aux.kv_width if kind == "kv" else aux.hidden_size) if in_width is None else in_width
  f1 = aux_prediction_flops(aux, 1, kind=kind, attention=False) + predictor_flops(base, in_width, 1)
  return weight_bytes(f1, itemsize) + decode_read_bytes(base, prompt_len - 1, batch=batch, itemsize=itemsize)


def ideal_kvp_speedup(base: ModelConfig, aux: ModelConfig, prompt_len: int, *, in_width: int | None = None,
                      kind: str = "kv", attention: bool = True) -> float:
  """The base's prefill FLOPs over KV Prediction's: the TTFT speed-up if time were proportional to FLOPs."""
  return prefill_flops(base, prompt_len, attention=attention) / kvp_flops(
      base, aux, prompt_len, in_width=in_width, kind=kind, attention=attention)
