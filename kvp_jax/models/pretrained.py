"""Pretrained weights in either format kvp_jax reads: a Hugging Face directory (safetensors) or a GGUF file.

`load_pretrained` picks the reader from the path; `convert_gguf` turns a GGUF into a Hugging Face directory
(float32 safetensors, tokenizer with its chat template, generation config) that transformers and
`load_pretrained` both load, so the slow dequantization is paid once.
Shape legend: see kvp_jax/models/config.py.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import jax.numpy as jnp

from kvp_jax.models import gguf_checkpoint, gguf_tokenizer, hf_checkpoint
from kvp_jax.models.config import ModelConfig
from kvp_jax.models.hf_checkpoint import CheckpointError
from kvp_jax.models.params import Params


def load_pretrained(path, dtype=jnp.float32, shardings_for=None) -> tuple[ModelConfig, Params]:
  """(cfg, params) from a .gguf file, a directory holding one .gguf, or a Hugging Face directory / hub name.

  shardings_for: cfg -> a Params pytree of shardings to place the weights in (hf_checkpoint.load_pretrained).
  """
  gguf_file = gguf_checkpoint.find_gguf(path)
  if gguf_file is not None:
    cfg, params = gguf_checkpoint.load_gguf(gguf_file, dtype)
    if shardings_for is not None:
      import jax
      params = jax.device_put(params, shardings_for(cfg))
    return cfg, params
  return hf_checkpoint.load_pretrained(path, dtype, shardings_for=shardings_for)


def generation_config(cfg: ModelConfig, pad_token_id: int | None) -> dict:
  """generation_config.json: the ids transformers' `generate` starts, stops and pads with."""
  eos = list(cfg.eos_token_id)
  return {"bos_token_id": cfg.bos_token_id, "eos_token_id": (eos[0] if len(eos) == 1 else eos) or None,
          "pad_token_id": pad_token_id}


def convert_gguf(path, out_dir) -> Path:
  """Writes the model in a .gguf file as a Hugging Face directory and returns its path.

  The directory appears complete or not at all (written beside it, then renamed), so an interrupted
  conversion never leaves something that looks loadable. An existing non-empty `out_dir` is an error.
  """
  out = Path(out_dir).expanduser()
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise CheckpointError(f"{out} already exists and is not an empty directory; pass a new one")
  gguf_file = gguf_checkpoint.find_gguf(path)
  if gguf_file is None:
    raise CheckpointError(f"no .gguf file at {path}")
  reader = gguf_checkpoint.open_gguf(gguf_file)
  cfg, params = gguf_checkpoint.load_gguf(gguf_file, reader=reader)
  tokenizer = gguf_tokenizer.tokenizer_from_gguf(gguf_file, reader=reader)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
  try:
    hf_checkpoint.save_pretrained(cfg, params, tmp)
    tokenizer.save_pretrained(str(tmp))
    (tmp / "generation_config.json").write_text(
        json.dumps(generation_config(cfg, tokenizer.pad_token_id), indent=1))
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would surprise whoever shares the directory
    os.replace(tmp, out)  # atomic; an empty directory in the way is replaced
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out


def default_cache_dir() -> Path:
  """$KVP_JAX_CACHE, else $XDG_CACHE_HOME/kvp_jax, else ~/.cache/kvp_jax."""
  if os.environ.get("KVP_JAX_CACHE"):
    return Path(os.environ["KVP_JAX_CACHE"]).expanduser()
  return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "kvp_jax"


def cached_conversion(path, cache_dir=None) -> Path:
  """The Hugging Face directory converted from a .gguf file, made on first use under `cache_dir`.

  Keyed by the file's content hash, so a changed file converts anew; concurrent first uses both convert and
  the first rename wins.
  """
  import hashlib
  gguf_file = gguf_checkpoint.find_gguf(path)
  if gguf_file is None:
    raise CheckpointError(f"no .gguf file at {path}")
  h = hashlib.sha256()
  with open(gguf_file, "rb") as f:
    for block in iter(lambda: f.read(1 << 24), b""):
      h.update(block)
  out = Path(cache_dir or default_cache_dir()).expanduser() / f"{gguf_file.stem}-{h.hexdigest()[:16]}"
  if not (out / "config.json").exists():
    try:
      convert_gguf(gguf_file, out)
    except (CheckpointError, OSError):
      if not (out / "config.json").exists():  # not a concurrent conversion that finished first
        raise
  return out
