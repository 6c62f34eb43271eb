"""kvp_jax: KV Prediction for faster time to first token, in pure JAX.

Folders by concern, each floor importing only the ones below it: models/ (the decoder), ttft/ (the one
TTFT-method interface), kvp/ (KV Prediction), baselines/ (the other methods), training/, evaluation/, benchmark/,
data/; the absl mains (train, eval, bench, quickstart, demo) at the top.

The names below are imported on first use (PEP 562), so `import kvp_jax` loads neither JAX nor any model code.
"""

from __future__ import annotations

import importlib

# public name -> (module, attribute)
_EXPORTS = {
    "load_pretrained": ("kvp_jax.models.pretrained", "load_pretrained"),
    "convert_gguf": ("kvp_jax.models.pretrained", "convert_gguf"),
    "save_pretrained": ("kvp_jax.models.hf_checkpoint", "save_pretrained"),
    "CheckpointError": ("kvp_jax.models.hf_checkpoint", "CheckpointError"),
    "logits": ("kvp_jax.models.decoder", "logits"),
    "generate": ("kvp_jax.models.generation", "generate"),
    "decode_from": ("kvp_jax.models.generation", "decode_from"),
    "ModelConfig": ("kvp_jax.models.config", "ModelConfig"),
    "init_params": ("kvp_jax.models.params", "init"),
    "KVCache": ("kvp_jax.models.cache", "KVCache"),
    # KV Prediction
    "AuxSpec": ("kvp_jax.kvp.aux_models", "AuxSpec"),
    "build_kvp": ("kvp_jax.kvp.inference", "build"),
    "load_model": ("kvp_jax.models.checkpoints", "load_model"),
    "load_kvp": ("kvp_jax.kvp.checkpoints", "load_kvp"),
    "predict_cache": ("kvp_jax.kvp.inference", "predict_cache"),
    "kvp_prefill": ("kvp_jax.kvp.inference", "kvp_prefill"),
    "kvp_generate": ("kvp_jax.kvp.inference", "generate"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name not in _EXPORTS:
    raise AttributeError(f"module 'kvp_jax' has no attribute {name!r}")
  module, attr = _EXPORTS[name]
  value = getattr(importlib.import_module(module), attr)
  globals()[name] = value  # later look-ups skip this function
  return value


def __dir__():
  return sorted(set(globals()) | set(_EXPORTS))
