"""Rotary position embeddings (Hugging Face "rotate half" convention), computed in float32.

Shape legend: see kvp_jax/models/config.py.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from kvp_jax.models.config import ModelConfig


def inv_frequencies(cfg: ModelConfig) -> np.ndarray:
  """[H/2] inverse frequencies, with Llama-3 scaling where the config asks for it (a static numpy constant)."""
  H = cfg.head_dim
  inv = 1.0 / (cfg.rope_theta ** (np.arange(0, H, 2, dtype=np.float64) / H))
  sc = cfg.rope_scaling
  if sc is None:
    return inv.astype(np.float32)
  low_wavelen = sc.original_max_position_embeddings / sc.low_freq_factor
  high_wavelen = sc.original_max_position_embeddings / sc.high_freq_factor
  wavelen = 2 * math.pi / inv
  scaled = np.where(wavelen > low_wavelen, inv / sc.factor, inv)
  smooth = (sc.original_max_position_embeddings / wavelen - sc.low_freq_factor) / (
      sc.high_freq_factor - sc.low_freq_factor)
  smoothed = (1 - smooth) * scaled / sc.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x_BTnH, positions_BT, cfg: ModelConfig):
  """Rotates x ([B, T, n, H], n any head count) by its absolute positions [B, T]; returns x's dtype."""
  inv = jnp.asarray(inv_frequencies(cfg))
  angles_BTh = positions_BT.astype(jnp.float32)[..., None] * inv  # [B, T, H/2]
  cos = jnp.cos(angles_BTh)[:, :, None, :]
  sin = jnp.sin(angles_BTh)[:, :, None, :]
  x = x_BTnH.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTnH.dtype)
