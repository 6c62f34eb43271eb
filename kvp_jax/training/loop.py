"""The training loop shared by every stage: optax optimiser, sharded jitted step, orbax checkpoints with the
grain iterator state, resume, progress logging and `metrics.jsonl`.

A stage supplies `loss_fn(trainable, frozen, batch) -> (loss, metrics)` plus its initial trainable params and
whatever frozen params the loss reads (a frozen base, a frozen aux): those are sharded like the trainable ones
and passed to the step as an argument (a closed-over array would be baked into the program as a constant,
replicated on every device), and never receive gradients or optimizer state. The step itself (mixed precision,
gradient accumulation, shardings) is kvp_jax/training/step.py. With several processes each one feeds its own
rows of the batch, saves its shards of the checkpoint, and only process 0 writes metrics.jsonl.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
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

from kvp_jax.models.checkpoints import Checkpointer
from kvp_jax.training import sharding
from kvp_jax.training import step as step_lib


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
      kept = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= resume_step]
      path.write_text("".join(l + "\n" for l in kept))

  def write(self, row: dict):
    if self.path is None:
      return
    with self.path.open("a") as f:
      f.write(json.dumps(row) + "\n")


def _to_float(tree) -> dict:
  return {k: float(v) for k, v in jax.device_get(tree).items()}


def train(*, workdir, loss_fn: Callable, init_trainable: Callable[[], Any], logical_axes: Any | None,
          data_iter, steps: int, optim: OptimConfig, mesh, tokens_per_step: int, save_every: int,
          log_every: int = 10, fail_at_step: int | None = None, frozen: Any = None, frozen_axes: Any = None,
          params_for_checkpoint: Callable[[Any, Any], Any] | None = None, grad_accum: int = 1,
          compute_dtype=jnp.float32):
  """Runs (or resumes) training to `steps`. Returns (trainable params, list of logged metric rows).

  frozen, frozen_axes: the params loss_fn reads but never trains, and their logical axes (None: replicated).
  params_for_checkpoint: (trainable, frozen) -> what is saved as `params` (e.g. adds a frozen aux so a kvp
  workdir always holds complete inference params); its inverse is `loss_fn`'s concern, not ours.
  grad_accum, compute_dtype: micro-batches per step and the dtype the loss computes in (step.py).
  """
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
    abstract = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), t)
    saved, opt = ckpt.restore(abstract(to_saved(trainable, frozen)), abstract({"opt_state": opt_state, "step": step_array(0)}),
                              data_iter)
    trainable = _from_saved(saved, trainable)
    opt_state = opt["opt_state"]
    logging.info("resumed from %s at step %d", ckpt.dir, start)
  metrics_out = MetricsWriter(workdir / "metrics.jsonl", start)

  step_fn = step_lib.jit_step(
      step_lib.make_step(loss_fn, tx, grad_accum=grad_accum, compute_dtype=compute_dtype,
                         batch_sharding=sharding.batch_sharding(mesh)),
      mesh, shardings, frozen_shardings, opt_shardings, sharding.batch_sharding(mesh))
  step_jit = lambda trainable, opt_state, batch: step_fn(trainable, frozen, opt_state, batch)
  rows, t_last, step_last = [], time.time(), start
  t_begin = time.time()
  for step in range(start + 1, steps + 1):
    batch = sharding.shard_batch(next(data_iter), mesh)
    trainable, opt_state, metrics = step_jit(trainable, opt_state, batch)
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
    ckpt.save(step, to_saved(trainable, frozen), {"opt_state": opt_state, "step": step_array(step)},
              data_iter, force=step == steps)
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
