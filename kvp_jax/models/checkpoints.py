"""Workdir checkpoints (orbax CheckpointManager) and loading a decoder back from any checkpoint we read.

A workdir holds `checkpoints/<step>/` (orbax writes each step to a temporary directory and renames it when
complete, so a crash never leaves a half-written checkpoint that looks valid), plus a JSON description of the
model(s): `model_config.json` for a pretrain run, `kvp_config.json` for a kvp run, `swiftkv_config.json` for a
swiftkv run.
Each checkpoint holds three items: `params`, `opt` (optimizer state and step) and `data` (the grain iterator's
state), so inference restores `params` alone. `load_model` reads a pretrain workdir or a Hugging Face directory;
a kvp workdir (aux + predictor) is read by kvp_jax/kvp/checkpoints.py, a swiftkv one by
kvp_jax/baselines/swiftkv.py.

Every step also records, in orbax's per-step metadata, the versions that wrote it and the run's configuration
(`provenance`, `step_metadata`). Before a restore the saved arrays' shapes are compared with the ones asked
for, so a checkpoint of another configuration is a one-line CheckpointError naming the first tensor that
differs, not orbax's shape traceback.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from kvp_jax.models import hf_checkpoint, pretrained
from kvp_jax.models import params as P
from kvp_jax.models.config import ModelConfig

MODEL_CONFIG = "model_config.json"
KVP_CONFIG = "kvp_config.json"
SWIFTKV_CONFIG = "swiftkv_config.json"
# What each stage's workdir holds, so one stage never trains into another's workdir.
WORKDIR_KINDS = {MODEL_CONFIG: "a pretrain workdir", KVP_CONFIG: "a kvp workdir", SWIFTKV_CONFIG: "a swiftkv workdir"}
# Bumped when what a workdir's checkpoints hold changes incompatibly; a newer format is refused on load.
FORMAT = 1
_VERSIONED = ("kvp_jax", "jax", "jaxlib", "orbax-checkpoint", "grain", "optax")


def provenance() -> dict[str, Any]:
  """What wrote a checkpoint: the checkpoint format and the versions of the libraries that matter."""
  return {"format": FORMAT, "versions": dict(_versions())}


@functools.lru_cache(maxsize=None)
def _versions() -> dict[str, str | None]:
  versions = {}
  for dist in _VERSIONED:
    try:
      versions[dist] = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
      versions[dist] = None
  return versions


def _first_line(e: BaseException) -> str:
  lines = [l.strip() for l in str(e).strip().splitlines() if l.strip()]
  return lines[0] if lines else type(e).__name__


def _path_name(path) -> str:
  parts = []
  for k in path:
    parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
  return "/".join(parts)


def _shapes(tree) -> dict[str, tuple[int, ...]]:
  return {_path_name(path): tuple(x.shape) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


class Checkpointer:
  def __init__(self, workdir, save_every: int, max_to_keep: int = 2):
    self.dir = Path(workdir).absolute() / "checkpoints"
    self.manager = ocp.CheckpointManager(
        self.dir, item_names=("params", "opt", "data"),
        options=ocp.CheckpointManagerOptions(save_interval_steps=save_every, max_to_keep=max_to_keep,
                                             create=True, cleanup_tmp_directories=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def due(self, step: int) -> bool:
    """Whether `save(step)` would write a checkpoint (the interval, or orbax's first save)."""
    return self.manager.should_save(step)

  def save(self, step: int, params, opt, data_iter, force: bool = False, metadata: dict | None = None) -> bool:
    """Saves asynchronously; `metadata` (JSON-able) is recorded with the step beside `provenance()`."""
    args = ocp.args.Composite(params=ocp.args.StandardSave(params), opt=ocp.args.StandardSave(opt),
                              data=grain.checkpoint.CheckpointSave(data_iter))
    return self.manager.save(step, args=args, force=force,
                             custom_metadata={"kvp_jax": {**provenance(), **(metadata or {})}})

  def step_metadata(self, step: int) -> dict[str, Any]:
    """What `save` recorded with `step` ({} for a checkpoint written before kvp_jax recorded anything)."""
    return dict((self.manager.metadata(step).custom_metadata or {}).get("kvp_jax", {}))

  def check(self, step: int, items: dict[str, Any], hint: str):
    """Raises CheckpointError unless `step` holds every item, each with the shapes of `items[name]`.

    items: item name -> abstract pytree (None: only its presence is checked). hint: what to do on a mismatch.
    """
    where = self.dir / str(step)
    saved_format = self.step_metadata(step).get("format", FORMAT)
    if saved_format > FORMAT:
      raise hf_checkpoint.CheckpointError(
          f"{where} was written by a newer kvp_jax (checkpoint format {saved_format}, this one reads {FORMAT}); "
          "upgrade kvp_jax")
    for name, abstract in items.items():
      if not (where / name).is_dir():
        raise hf_checkpoint.CheckpointError(
            f"{where} has no {name!r} item: the checkpoint is incomplete or damaged; delete {where} to fall back "
            "to the previous step, or retrain")
      if abstract is None:
        continue
      try:
        saved = _shapes(ocp.StandardCheckpointHandler().metadata(where / name).tree)
      except Exception as e:  # orbax raises several types for unreadable metadata
        raise hf_checkpoint.CheckpointError(f"cannot read {where / name} ({_first_line(e)}); delete {where} to "
                                            "fall back to the previous step, or retrain") from None
      want = _shapes(abstract)
      for k in sorted(want.keys() | saved.keys()):
        if want.get(k) != saved.get(k):
          has = "no such tensor" if k not in saved else f"shape {list(saved[k])}"
          asked = "no such tensor" if k not in want else f"shape {list(want[k])}"
          raise hf_checkpoint.CheckpointError(
              f"{where} does not match: {name}/{k} has {has} there, {asked} here; {hint}")

  def _restore(self, step: int, args):
    try:
      return self.manager.restore(step, args=args)
    except (KeyError, ValueError, OSError) as e:
      where = self.dir / str(step)
      raise hf_checkpoint.CheckpointError(f"cannot restore {where} ({_first_line(e)}); delete it to fall back to "
                                          "the previous step, or retrain") from None

  def restore(self, abstract_params, abstract_opt, data_iter, step: int | None = None,
              hint: str = "resume with the flags that wrote it, or use a new --workdir"):
    """(params, opt) of `step` (default latest); `data_iter` is moved to the saved position in place."""
    step = self.manager.latest_step() if step is None else step
    # the params' shapes tell a checkpoint of another configuration; the optimizer state mirrors them
    self.check(step, {"params": abstract_params, "opt": None, "data": None}, hint)
    args = ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params),
                              opt=ocp.args.StandardRestore(abstract_opt),
                              data=grain.checkpoint.CheckpointRestore(data_iter))
    out = self._restore(step, args)
    return out.params, out.opt

  def restore_params(self, abstract_params, step: int | None = None,
                     hint: str = "its config file and its checkpoint disagree"):
    step = self.manager.latest_step() if step is None else step
    self.check(step, {"params": abstract_params}, hint)
    return self._restore(step, ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params))).params

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def write_json(path: Path, obj: Any):
  """Write-then-rename, so a reader never sees half a file."""
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(json.dumps(obj, indent=1))
  tmp.replace(path)


def read_json(path: Path) -> Any:
  """A JSON file we wrote; a damaged one is a CheckpointError naming it."""
  try:
    return json.loads(Path(path).read_text())
  except json.JSONDecodeError as e:
    raise hf_checkpoint.CheckpointError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); the file is "
                                        "damaged: restore it or retrain into a new directory") from None


def check_workdir(workdir, config_file: str, config: dict | None = None, compare: tuple[str, ...] | None = None):
  """Refuses a workdir made by the other stage, or one whose checkpoints belong to another configuration.

  config_file: one of WORKDIR_KINDS (MODEL_CONFIG for pretrain, ...); config: what this run is about to write there
  (None: check the kind only); compare: the keys that must match a config already there (None: all). Called
  before anything is written, so a wrong --workdir is never overwritten.
  """
  p = Path(workdir)
  if p.exists() and not p.is_dir():
    raise ValueError(f"--workdir {p} is a file; pass a directory")
  for other, kind in WORKDIR_KINDS.items():
    if other != config_file and (p / other).exists():
      raise hf_checkpoint.CheckpointError(f"{p} is {kind} (it holds {other}); pass a new --workdir for this stage")
  if config is None or not (p / config_file).exists():
    return
  if not any(c.name.isdigit() for c in (p / "checkpoints").glob("*")):
    return  # nothing trained yet: this run may write its own config
  old = read_json(p / config_file)
  for key in compare or sorted(config):
    diff = first_difference(old.get(key), json.loads(json.dumps(config.get(key))), key)
    if diff:
      raise hf_checkpoint.CheckpointError(f"{p} holds checkpoints of another configuration ({diff}); resume with "
                                          "the same settings or pass a new --workdir")


def first_difference(a, b, name: str) -> str | None:
  if isinstance(a, dict) and isinstance(b, dict):
    for k in sorted(a.keys() | b.keys()):
      d = first_difference(a.get(k), b.get(k), f"{name}.{k}")
      if d:
        return d
    return None
  return None if a == b else f"{name} was {json.dumps(a)}, now {json.dumps(b)}"


def check_base(cfg: ModelConfig, base_params, workdir, base_checkpoint):
  """Refuses base params that are not the shape of the base `cfg` a kvp or swiftkv workdir was trained against
  (one line naming the first tensor that differs, instead of a shape error deep inside a forward pass)."""
  want, got = _shapes(P.abstract(cfg)), _shapes(base_params)
  if want != got:
    k = next(k for k in sorted(want.keys() | got.keys()) if want.get(k) != got.get(k))
    shape = lambda d: list(d[k]) if k in d else "absent"
    raise hf_checkpoint.CheckpointError(
        f"the base params do not fit the base {workdir} was trained for ({k}: {shape(got)} given, {shape(want)} "
        f"there); pass the base it was trained against ({base_checkpoint})")


def tokenizer_dir(checkpoint: str | Path) -> Path:
  """A pretrain workdir keeps its tokenizer in `tokenizer/`; a Hugging Face directory holds it itself."""
  p = Path(checkpoint)
  return p / "tokenizer" if (p / "tokenizer" / "tokenizer.json").exists() else p


def load_model(path, dtype=None, shardings_for=None) -> tuple[ModelConfig, P.Params]:
  """(cfg, params) from a pretrain workdir (latest checkpoint), a Hugging Face directory / hub name, or a GGUF
  file (or a directory holding one).

  shardings_for: cfg -> a Params pytree of shardings; each array is then read straight into its shards (an 8B
  base never sits whole on one device). Without it, arrays land on this process's first device.
  """
  import jax
  import jax.numpy as jnp
  dtype = dtype or jnp.float32
  p = Path(path)
  if (p / MODEL_CONFIG).exists():
    cfg = ModelConfig.from_dict(read_json(p / MODEL_CONFIG))
    ck = Checkpointer(p, save_every=1)
    if ck.latest_step() is None:
      raise hf_checkpoint.CheckpointError(f"{p} has no finished checkpoint yet; train it first (or wait)")
    abstract = P.abstract(cfg, jnp.float32)
    if shardings_for is not None or jax.process_count() > 1:  # orbax needs a sharding for every process
      shardings = (shardings_for(cfg) if shardings_for is not None else
                   jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.local_devices()[0]), abstract))
      abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    try:
      params = ck.restore_params(abstract, hint=f"{MODEL_CONFIG} and the checkpoint disagree")
    finally:
      ck.close()
    return cfg, P.cast(params, dtype)
  # a model is expected here: a workdir of the kvp or swiftkv stage holds additions to its base, not a model
  if (p / KVP_CONFIG).exists():
    raise hf_checkpoint.CheckpointError(f"{p} is a kvp workdir, not a model; pass a pretrain workdir or Hugging Face "
                                        "directory (load a kvp workdir with kvp_jax.load_kvp)")
  if (p / SWIFTKV_CONFIG).exists():
    raise hf_checkpoint.CheckpointError(f"{p} is a swiftkv workdir, not a model; pass a pretrain workdir or Hugging "
                                        "Face directory (load a swiftkv workdir with baselines.swiftkv.load_swiftkv)")
  return pretrained.load_pretrained(path, dtype, shardings_for=shardings_for)
