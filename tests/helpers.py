"""Shared test helpers."""

import jax.numpy as jnp
import numpy as np

from kvp_jax.models import params as params_lib
from kvp_jax.models.config import ModelConfig


def random_params(cfg: ModelConfig, seed: int = 0) -> params_lib.Params:
  """Random weights, with norms and biases off 1 and 0 so that a dropped or misplaced one shows.

  Drawn with numpy: eager jax.random would compile one small program per parameter shape.
  """
  rng = np.random.default_rng(seed)

  def make(spec: params_lib.ParamSpec):
    noise = rng.standard_normal(spec.shape).astype(np.float32)
    if spec.init in ("ones", "zeros"):
      return jnp.asarray((spec.init == "ones") + 0.1 * noise)
    return jnp.asarray(noise / np.sqrt(cfg.hidden_size if spec.init == "embed" else spec.fan_in))

  return params_lib.map_specs(make, params_lib.param_specs(cfg))
