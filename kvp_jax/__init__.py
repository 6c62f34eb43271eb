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
    "load_smollm2": ("kvp_jax.models.zoo", "load_smollm2"),
    "smollm2_dir": ("kvp_jax.models.zoo", "smollm2_dir"),
    "convert_gguf": ("kvp_jax.models.pretrained", "convert_gguf"),
    "save_pretrained": ("kvp_jax.models.hf_checkpoint", "save_pretrained"),
    "CheckpointError": ("kvp_jax.models.hf_checkpoint", "CheckpointError"),
    "logits": ("kvp_jax.models.decoder", "logits"),
    "prefill": ("kvp_jax.models.decoder", "prefill"),
    "prefill_flops": ("kvp_jax.models.flops", "prefill_flops"),
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
    "predicted_and_true_cache": ("kvp_jax.kvp.inference", "predicted_and_true_cache"),
    "layer_errors": ("kvp_jax.kvp.inference", "layer_errors"),
    "kvp_flops": ("kvp_jax.kvp.flops", "kvp_flops"),
    # training (the library behind `python -m kvp_jax.train`)
    "train_kvp": ("kvp_jax.training.stages", "kvp"),
    "DataConfig": ("kvp_jax.training.stages", "DataConfig"),
    "OptimConfig": ("kvp_jax.training.loop", "OptimConfig"),
    "KVPLossConfig": ("kvp_jax.kvp.losses", "KVPLossConfig"),
    "make_mesh": ("kvp_jax.training.sharding", "make_mesh"),
    # evaluation (behind `python -m kvp_jax.eval`)
    "evaluate": ("kvp_jax.evaluation.runner", "evaluate"),
    "EvalConfig": ("kvp_jax.evaluation.tasks", "EvalConfig"),
    "MethodSpec": ("kvp_jax.evaluation.registry", "MethodSpec"),
    "report_markdown": ("kvp_jax.evaluation.report", "markdown"),
    # timing (behind `python -m kvp_jax.bench`)
    "aot_compile": ("kvp_jax.benchmark.timing", "aot_compile"),
    "time_interleaved": ("kvp_jax.benchmark.timing", "time_interleaved"),
    "matmul_call": ("kvp_jax.benchmark.timing", "matmul_call"),
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
