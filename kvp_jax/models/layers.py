"""Small free functions the decoder is made of: RMSNorm, projections, SwiGLU.

Every projection goes through `dense`, one 2-D matmul [B*T, in] x [in, out]. Written as an einsum with
batch dims ("BTD,DF->BTF"), XLA:CPU computes the weight gradient ("BTD,BTF->DF") behind a loop fusion that
transposes the activation gradient first: 2-4x slower training steps on this CPU (a 2-layer D=128 model,
B=32, T=112: SwiGLU's gradient 61 ms as einsums, 18 ms as 2-D matmuls). The forward pass is unchanged.

Shape legend: see kvp_jax/models/config.py.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def rms_norm(x, weight, eps: float):
  """RMSNorm computed in float32, as Hugging Face Llama/Qwen do, then cast back to x's dtype."""
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (weight * x32.astype(x.dtype)).astype(x.dtype)


def dense(x, w, n_in: int = 1, preferred_element_type=None):
  """Contracts the last `n_in` axes of x with the first `n_in` axes of w, as one 2-D matmul.

  x [..., *in], w [*in, *out] -> [..., *out]; e.g. [B, T, D] x [D, N, H] -> [B, T, N, H].
  """
  lead, fan_in, out = x.shape[:x.ndim - n_in], w.shape[:n_in], w.shape[n_in:]
  k = math.prod(fan_in)
  y = jnp.dot(x.reshape(-1, k), w.reshape(k, -1), preferred_element_type=preferred_element_type)
  return y.reshape(lead + out)


def swiglu(x_BTD, w_gate_DF, w_up_DF, w_down_FD):
  gate = dense(x_BTD, w_gate_DF)
  up = dense(x_BTD, w_up_DF)
  return dense(jax.nn.silu(gate) * up, w_down_FD)
