"""Training checkpoints (orbax CheckpointManager) and loading trained models back for inference.

A workdir holds `checkpoints/<step>/` (orbax writes each step to a temporary directory and renames it when
complete, so a crash never leaves a half-written checkpoint that looks valid), plus a JSON description of the
model(s): `model_config.json` for a pretrain run, `kvp_config.json` for a kvp run.
Each checkpoint holds three items: `params`, `opt` (optimizer state and step) and `data` (the grain iterator's
state), so inference restores `params` alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from kvp_jax import hf_checkpoint
from kvp_jax import params as P
from kvp_jax.config import ModelConfig

MODEL_CONFIG = "model_config.json"
KVP_CONFIG = "kvp_config.json"


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


def load_model(path, dtype=None) -> tuple[ModelConfig, P.Params]:
  """(cfg, params) from a pretrain workdir (latest checkpoint) or a Hugging Face directory / hub name."""
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
    raise hf_checkpoint.CheckpointError(f"{p} is a kvp workdir; load it with kvp_jax.checkpointing.load_kvp")
  return hf_checkpoint.load_pretrained(path, dtype)


def load_kvp(workdir, base_params=None, dtype=None):
  """(kcfg, base_params, KVPParams) from a kvp workdir; the base is loaded from the path it recorded."""
  import jax.numpy as jnp
  from kvp_jax import kvp, predictor
  dtype = dtype or jnp.float32
  p = Path(workdir)
  if not (p / KVP_CONFIG).exists():
    raise hf_checkpoint.CheckpointError(f"no {KVP_CONFIG} in {p}; pass a workdir made by --stage=kvp")
  meta = json.loads((p / KVP_CONFIG).read_text())
  kcfg = predictor.KVPConfig.from_dict(meta["kvp"])
  if base_params is None:
    _, base_params = load_model(meta["base_checkpoint"], dtype)
  ck = Checkpointer(p, save_every=1)
  if ck.latest_step() is None:
    raise hf_checkpoint.CheckpointError(f"{p} has no finished checkpoint yet; train it first (or wait)")
  # shapes only: eval_shape allocates no predictor just to describe what to restore
  abstract = {"aux": P.abstract(kcfg.aux),
              "pred": jax.eval_shape(lambda k: predictor.init(kcfg, k, how="random"), jax.random.PRNGKey(0))}
  params = ck.restore_params(abstract)
  ck.close()
  kp = kvp.KVPParams(aux=P.cast(params["aux"], dtype), pred=P.cast(params["pred"], dtype))
  return kcfg, base_params, kp
