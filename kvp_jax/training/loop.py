"""The training loop shared by every stage: optax optimiser, sharded jitted step, orbax checkpoints with the
grain iterator state, resume, progress logging and `metrics.jsonl`.

A stage supplies `loss_fn(trainable, frozen, batch) -> (loss, metrics)` plus its initial trainable params and
whatever frozen params the loss reads (a frozen base, a frozen aux): those are sharded like the trainable ones
and passed to the step as an argument (a closed-over array would be baked into the program as a constant,
replicated on every device), and never receive gradients or optimizer state. The step itself (mixed precision,
gradient accumulation, shardings) is kvp_jax/training/step.py. With several processes each one feeds its own
rows of the batch, saves its shards of the checkpoint, and only process 0 writes metrics.jsonl.

No work is lost to a preemption or a divergence: SIGTERM (what a preempted TPU VM or a SLURM job gets before
the kill) checkpoints the step just finished and raises `Preempted`; a loss, gradient norm or parameter that
stops being finite raises `Diverged` before that state can be saved, so the last checkpoint stays the last
good one. Each checkpoint records the run's configuration, and a resume under another one is refused.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as Pspec

from kvp_jax.models.checkpoints import Checkpointer, first_difference, provenance
from kvp_jax.models.hf_checkpoint import CheckpointError
from kvp_jax.training import sharding
from kvp_jax.training import step as step_lib


class Preempted(Exception):
  """Training stopped on SIGTERM after checkpointing the current step; rerunning the same command resumes."""

  def __init__(self, step: int, path: Path):
    super().__init__(f"stopped by SIGTERM at step {step}; checkpoint in {path}; rerun the same command to resume")
    self.step, self.path = step, path


class Diverged(RuntimeError):
  """The loss, gradient norm or parameters stopped being finite; no checkpoint was written from that state."""


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with linear warmup and cosine decay to lr * min_lr_ratio, global-norm clipping (METHOD.md recipe)."""
  lr: float = 1.2e-3
  min_lr_ratio: float = 0.1
  warmup_steps: int = 100
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  clip: float = 1.0


def schedule(oc: OptimConfig, steps: int) -> optax.Schedule:
  warmup = min(oc.warmup_steps, max(steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(0.0, oc.lr, warmup, max(steps, warmup + 1), oc.lr * oc.min_lr_ratio)


def optimizer(oc: OptimConfig, steps: int) -> optax.GradientTransformation:
  # No weight decay on vectors (norm gains, biases): the usual AdamW practice.
  decay_mask = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)
  return optax.chain(optax.clip_by_global_norm(oc.clip),
                     optax.adamw(schedule(oc, steps), oc.b1, oc.b2, oc.eps, weight_decay=oc.weight_decay,
                                 mask=decay_mask))


class MetricsWriter:
  """Appends one JSON object per logged step; on resume, drops lines past the restored step first.
  Only process 0 writes (every process computes the same replicated metrics)."""

  def __init__(self, path: Path, resume_step: int):
    self.path = path if jax.process_index() == 0 else None
    if self.path is not None and path.exists():
      kept = []
      for line in path.read_text().splitlines():
        try:
          row = json.loads(line)
        except json.JSONDecodeError:
          continue  # a line torn by a crash in the middle of its write
        if row["step"] <= resume_step:
          kept.append(line)
      tmp = path.with_suffix(".jsonl.tmp")  # write-then-rename: a crash here never loses the file
      tmp.write_text("".join(l + "\n" for l in kept))
      tmp.replace(path)

  def write(self, row: dict):
    if self.path is None:
      return
    with self.path.open("a") as f:
      f.write(json.dumps(row) + "\n")


def _to_float(tree) -> dict:
  return {k: float(v) for k, v in jax.device_get(tree).items()}


@jax.jit
def _track_nonfinite(first_bad, loss, grad_norm, step):
  """first_bad: [step, loss, grad_norm] of the first non-finite step, step 0 while there is none. On device,
  so tracking costs no host sync; it is read only where a sync happens anyway (logging) or must (saving)."""
  bad = (first_bad[0] == 0) & ~(jnp.isfinite(loss) & jnp.isfinite(grad_norm))
  return jnp.where(bad, jnp.stack([step.astype(jnp.float32), loss, grad_norm]), first_bad)


@jax.jit
def _all_finite(tree):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _stop_if_diverged(first_bad, params, ckpt: Checkpointer, step: int):
  """Raises Diverged if a step so far was not finite (or `params`, about to be saved, are not)."""
  bad_step, loss, gnorm = (float(x) for x in np.asarray(first_bad))
  if bad_step == 0 and (params is None or bool(_all_finite(params))):
    return
  ckpt.wait()
  last = ckpt.latest_step()
  ckpt.close()
  what = (f"the loss is {loss} and the gradient norm {gnorm} at step {int(bad_step)}" if bad_step
          else f"the parameters stopped being finite at step {step}")
  kept = (f"the last good checkpoint, step {last}, is kept in {ckpt.dir}" if last is not None
          else "no checkpoint had been written")
  raise Diverged(f"training diverged: {what}; stopped without saving that state ({kept}); lower --lr or raise "
                 "--warmup_steps, then rerun to resume from it")


def _check_resume(ckpt: Checkpointer, step: int, run_config: dict | None):
  """A checkpoint written under another configuration is refused (one line naming the first difference)."""
  meta = ckpt.step_metadata(step)
  if run_config is not None and meta.get("config") is not None:
    diff = first_difference(meta["config"], json.loads(json.dumps(run_config)), "config")
    if diff:
      raise CheckpointError(f"{ckpt.dir / str(step)} was written by a run with other settings ({diff}); resume "
                            "with the same settings or pass a new --workdir")
  old, now = meta.get("versions") or {}, provenance()["versions"]
  changed = [f"{k} {old[k]} -> {now.get(k)}" for k in sorted(old) if old[k] != now.get(k)]
  if changed:
    logging.warning("resuming a checkpoint written with other library versions (%s)", ", ".join(changed))


def check_counts(steps: int, save_every: int, log_every: int):
  if steps < 0 or save_every < 1 or log_every < 1:
    raise ValueError(f"need steps >= 0, save_every >= 1 and log_every >= 1; got {steps}, {save_every}, {log_every}")


class _SigtermFlag:
  """While `train` runs, SIGTERM only sets `got`: the loop checkpoints the step it is on and stops. The previous
  handler is restored when train returns or raises. Inactive off the main thread (Python takes signals there
  only). One per process, like the signal it watches."""

  def __init__(self):
    self.got = False

  def watching(self, fn):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
      if threading.current_thread() is not threading.main_thread():
        return fn(*args, **kwargs)
      self.got = False
      prev = signal.signal(signal.SIGTERM, self._handle)
      try:
        return fn(*args, **kwargs)
      finally:
        signal.signal(signal.SIGTERM, prev)
    return wrapped

  def _handle(self, signum, frame):
    self.got = True
    logging.warning("SIGTERM: checkpointing at the end of this step, then stopping")


_SIGTERM = _SigtermFlag()


@_SIGTERM.watching
def train(*, workdir, loss_fn: Callable, init_trainable: Callable[[], Any], logical_axes: Any | None,
          data_iter, steps: int, optim: OptimConfig, mesh, tokens_per_step: int, save_every: int,
          log_every: int = 10, fail_at_step: int | None = None, frozen: Any = None, frozen_axes: Any = None,
          params_for_checkpoint: Callable[[Any, Any], Any] | None = None, grad_accum: int = 1,
          compute_dtype=jnp.float32, run_config: dict | None = None, run_info: dict | None = None):
  """Runs (or resumes) training to `steps`. Returns (trainable params, list of logged metric rows).
  steps=0 saves the initial params as checkpoint 0.

  frozen, frozen_axes: the params loss_fn reads but never trains, and their logical axes (None: replicated).
  params_for_checkpoint: (trainable, frozen) -> what is saved as `params` (e.g. adds a frozen aux so a kvp
  workdir always holds complete inference params); its inverse is `loss_fn`'s concern, not ours.
  grad_accum, compute_dtype: micro-batches per step and the dtype the loss computes in (step.py).
  run_config: what a resume must match (model, data); run_info: recorded only (optimizer settings, steps).
  Both go into every checkpoint's metadata. Raises Preempted after a SIGTERM, Diverged on non-finite values.
  """
  check_counts(steps, save_every, log_every)
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  tx = optimizer(optim, steps)
  sched = schedule(optim, steps)
  to_saved = params_for_checkpoint or (lambda p, _: p)

  shard = lambda tree, axes: (sharding.param_shardings(tree, axes, mesh) if axes is not None
                              else sharding.replicated(tree, mesh))
  trainable = init_trainable()
  shardings = shard(trainable, logical_axes)
  trainable = sharding.put(trainable, shardings)
  frozen = {} if frozen is None else frozen
  frozen_shardings = shard(frozen, frozen_axes)
  frozen = sharding.put(frozen, frozen_shardings)
  # Optimizer state sharded like the params it mirrors (counts replicated): otherwise the first step's output
  # shardings differ from its inputs' and the train step compiles twice.
  opt_shardings = step_lib.opt_shardings(tx, trainable, shardings, mesh)
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(trainable)

  # The saved step count: a replicated global array, which every process can save and restore.
  step_array = lambda s: jax.device_put(np.asarray(s, np.int32), NamedSharding(mesh, Pspec()))
  ckpt = Checkpointer(workdir, save_every=save_every)
  start = 0
  if ckpt.latest_step() is not None:
    start = ckpt.latest_step()
    _check_resume(ckpt, start, run_config)
    abstract = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), t)
    saved, opt = ckpt.restore(abstract(to_saved(trainable, frozen)), abstract({"opt_state": opt_state, "step": step_array(0)}),
                              data_iter)
    trainable = _from_saved(saved, trainable)
    opt_state = opt["opt_state"]
    logging.info("resumed from %s at step %d", ckpt.dir, start)
  metrics_out = MetricsWriter(workdir / "metrics.jsonl", start)

  if steps == 0 and start == 0:  # nothing to train: the starting point (e.g. a least-squares fit) is the result
    ckpt.save(0, to_saved(trainable, frozen), {"opt_state": opt_state, "step": step_array(0)}, data_iter,
              force=True)
  step_fn = step_lib.jit_step(
      step_lib.make_step(loss_fn, tx, grad_accum=grad_accum, compute_dtype=compute_dtype,
                         batch_sharding=sharding.batch_sharding(mesh)),
      mesh, shardings, frozen_shardings, opt_shardings, sharding.batch_sharding(mesh))
  step_jit = lambda trainable, opt_state, batch: step_fn(trainable, frozen, opt_state, batch)
  rows, t_last, step_last = [], time.time(), start
  t_begin = time.time()
  metadata = {"config": run_config, "info": run_info}
  first_bad = jnp.zeros(3, jnp.float32)
  for step in range(start + 1, steps + 1):
    batch = sharding.shard_batch(next(data_iter), mesh)
    trainable, opt_state, metrics = step_jit(trainable, opt_state, batch)
    first_bad = _track_nonfinite(first_bad, metrics["loss"], metrics["grad_norm"], jnp.asarray(step, jnp.int32))
    preempted = _SIGTERM.got and step < steps
    save = preempted or step == steps or ckpt.due(step)
    if step % log_every == 0 or step == steps or save:  # never log or save a non-finite state
      _stop_if_diverged(first_bad, to_saved(trainable, frozen) if save else None, ckpt, step)
    if step % log_every == 0 or step == steps:
      m = _to_float(metrics)  # the only host sync per log interval
      now = time.time()
      tps = tokens_per_step * (step - step_last) / max(now - t_last, 1e-9)
      eta = (now - t_begin) / (step - start) * (steps - step)
      row = {"step": step, **m, "lr": float(sched(step - 1)), "tokens_per_s": tps, "elapsed_s": now - t_begin}
      metrics_out.write(row)
      rows.append(row)
      logging.info("step %d/%d loss %.4f lr %.2e %.0f tok/s ETA %s", step, steps, m["loss"], row["lr"], tps,
                   _fmt_eta(eta))
      t_last, step_last = now, step
    if save:
      ckpt.save(step, to_saved(trainable, frozen), {"opt_state": opt_state, "step": step_array(step)},
                data_iter, force=step == steps or preempted, metadata=metadata)
    if preempted:
      ckpt.wait()
      ckpt.close()
      raise Preempted(step, ckpt.dir / str(step))
    if fail_at_step is not None and step == fail_at_step:
      ckpt.wait()
      logging.error("--fail_at_step=%d: simulating a crash", step)
      os._exit(3)
  ckpt.wait()
  ckpt.close()
  return trainable, rows


def _from_saved(saved, like):
  """Inverse of params_for_checkpoint for the two shapes we use: identical trees, or a dict superset."""
  if isinstance(like, dict) and isinstance(saved, dict):
    return {k: saved[k] for k in like}
  return saved


def _fmt_eta(s: float) -> str:
  if not math.isfinite(s):
    return "?"
  m, s = divmod(int(s), 60)
  return f"{m}m{s:02d}s"
