"""Workdir checkpoints (orbax CheckpointManager) and loading a decoder back from any checkpoint we read.

A workdir holds `checkpoints/<step>/` (orbax writes each step to a temporary directory and renames it when
complete, so a crash never leaves a half-written checkpoint that looks valid), plus a JSON description of the
model(s): `model_config.json` for a pretrain run, `kvp_config.json` for a kvp run.
Each checkpoint holds three items: `params`, `opt` (optimizer state and step) and `data` (the grain iterator's
state), so inference restores `params` alone. `load_model` reads a pretrain workdir or a Hugging Face directory;
a kvp workdir (aux + predictor) is read by kvp_jax/kvp/checkpoints.py, one floor up.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grain
import orbax.checkpoint as ocp

from kvp_jax.models import hf_checkpoint, pretrained
from kvp_jax.models import params as P
from kvp_jax.models.config import ModelConfig

MODEL_CONFIG = "model_config.json"
KVP_CONFIG = "kvp_config.json"
SWIFTKV_CONFIG = "swiftkv_config.json"


class Checkpointer:
  def __init__(self, workdir, save_every: int, max_to_keep: int = 2):
    self.dir = Path(workdir).absolute() / "checkpoints"
    self.manager = ocp.CheckpointManager(
        self.dir, item_names=("params", "opt", "data"),
        options=ocp.CheckpointManagerOptions(save_interval_steps=save_every, max_to_keep=max_to_keep,
                                             create=True, cleanup_tmp_directories=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, params, opt, data_iter, force: bool = False) -> bool:
    args = ocp.args.Composite(params=ocp.args.StandardSave(params), opt=ocp.args.StandardSave(opt),
                              data=grain.checkpoint.CheckpointSave(data_iter))
    return self.manager.save(step, args=args, force=force)

  def restore(self, abstract_params, abstract_opt, data_iter, step: int | None = None):
    """(params, opt) of `step` (default latest); `data_iter` is moved to the saved position in place."""
    step = self.manager.latest_step() if step is None else step
    args = ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params),
                              opt=ocp.args.StandardRestore(abstract_opt),
                              data=grain.checkpoint.CheckpointRestore(data_iter))
    out = self.manager.restore(step, args=args)
    return out.params, out.opt

  def restore_params(self, abstract_params, step: int | None = None):
    step = self.manager.latest_step() if step is None else step
    return self.manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params))).params

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def write_json(path: Path, obj: Any):
  """Write-then-rename, so a reader never sees half a file."""
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(json.dumps(obj, indent=1))
  tmp.replace(path)


def tokenizer_dir(checkpoint: str | Path) -> Path:
  """A pretrain workdir keeps its tokenizer in `tokenizer/`; a Hugging Face directory holds it itself."""
  p = Path(checkpoint)
  return p / "tokenizer" if (p / "tokenizer" / "tokenizer.json").exists() else p


def load_model(path, dtype=None) -> tuple[ModelConfig, P.Params]:
  """(cfg, params) from a pretrain workdir (latest checkpoint), a Hugging Face directory / hub name, or a GGUF
  file (or a directory holding one)."""
  import jax.numpy as jnp
  dtype = dtype or jnp.float32
  p = Path(path)
  if (p / MODEL_CONFIG).exists():
    cfg = ModelConfig.from_dict(json.loads((p / MODEL_CONFIG).read_text()))
    ck = Checkpointer(p, save_every=1)
    if ck.latest_step() is None:
      raise hf_checkpoint.CheckpointError(f"{p} has no finished checkpoint yet; train it first (or wait)")
    params = ck.restore_params(P.abstract(cfg, jnp.float32))
    ck.close()
    return cfg, P.cast(params, dtype)
  if (p / KVP_CONFIG).exists():
    raise hf_checkpoint.CheckpointError(f"{p} is a kvp workdir; load it with kvp_jax.load_kvp")
  if (p / SWIFTKV_CONFIG).exists():
    raise hf_checkpoint.CheckpointError(f"{p} is a swiftkv workdir; load it with baselines.swiftkv.load_swiftkv")
  return pretrained.load_pretrained(path, dtype)
