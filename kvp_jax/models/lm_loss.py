"""The language-modelling objective of any decoder: token cross-entropy with z-loss, over a loss mask.

Shape legend: see kvp_jax/models/config.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kvp_jax.models import decoder
from kvp_jax.models.config import ModelConfig
from kvp_jax.models.params import Params


def cross_entropy(logits_BTV, targets_BT, z_loss: float = 0.0, weights_BT=None, denominator=None):
  """Mean token cross-entropy (float32) plus z_loss * mean(logsumexp^2); returns (total, ce).

  weights_BT: optional 0/1 mask (padding and document seams of packed batches are 0); means are over it.
  denominator: divide the weighted sums by this instead of this batch's weight (a micro-batch of gradient
    accumulation passes the whole batch's weight / k, so its k means add up to the whole batch's mean).
  """
  logits = logits_BTV.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets_BT[..., None], axis=-1)[..., 0]
  if weights_BT is None:
    weights_BT = jnp.ones(targets_BT.shape, jnp.float32)
  denominator = jnp.sum(weights_BT) if denominator is None else denominator
  mean = lambda x: jnp.sum(x * weights_BT) / jnp.maximum(denominator, 1.0)
  ce = mean(lse - target_logit)
  return ce + z_loss * mean(lse ** 2), ce


def lm_loss(cfg: ModelConfig, params: Params, batch, z_loss: float = 1e-4, remat: str = "none"):
  out = decoder.forward_layers(cfg, params, batch["inputs"], remat=remat)
  total, ce = cross_entropy(out.logits, batch["targets"], z_loss, batch.get("weights"),
                            batch.get("loss_denominator"))
  return total, {"loss": total, "ce": ce}
