"""kvp_jax: KV Prediction for faster time to first token, in pure JAX.

The names below are imported on first use (PEP 562), so `import kvp_jax` loads neither JAX nor any model code.
"""

from __future__ import annotations

import importlib

# public name -> (module, attribute)
_EXPORTS = {
    "load_pretrained": ("kvp_jax.hf_checkpoint", "load_pretrained"),
    "save_pretrained": ("kvp_jax.hf_checkpoint", "save_pretrained"),
    "CheckpointError": ("kvp_jax.hf_checkpoint", "CheckpointError"),
    "logits": ("kvp_jax.model", "logits"),
    "generate": ("kvp_jax.generation", "generate"),
    "decode_from": ("kvp_jax.generation", "decode_from"),
    "ModelConfig": ("kvp_jax.config", "ModelConfig"),
    "init_params": ("kvp_jax.params", "init"),
    "KVCache": ("kvp_jax.cache", "KVCache"),
    # KV Prediction
    "AuxSpec": ("kvp_jax.aux_models", "AuxSpec"),
    "build_kvp": ("kvp_jax.kvp", "build"),
    "load_model": ("kvp_jax.checkpointing", "load_model"),
    "load_kvp": ("kvp_jax.checkpointing", "load_kvp"),
    "predict_cache": ("kvp_jax.kvp", "predict_cache"),
    "kvp_prefill": ("kvp_jax.kvp", "kvp_prefill"),
    "kvp_generate": ("kvp_jax.kvp", "generate"),
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
