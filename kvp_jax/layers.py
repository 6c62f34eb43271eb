"""Small free functions the decoder is made of: RMSNorm, projections, SwiGLU.

Shape legend: see kvp_jax/config.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm(x, weight, eps: float):
  """RMSNorm computed in float32, as Hugging Face Llama/Qwen do, then cast back to x's dtype."""
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (weight * x32.astype(x.dtype)).astype(x.dtype)


def swiglu(x_BTD, w_gate_DF, w_up_DF, w_down_FD):
  gate = jnp.einsum("BTD,DF->BTF", x_BTD, w_gate_DF)
  up = jnp.einsum("BTD,DF->BTF", x_BTD, w_up_DF)
  return jnp.einsum("BTF,FD->BTD", jax.nn.silu(gate) * up, w_down_FD)
