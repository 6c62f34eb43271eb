"""The training loop shared by every stage: optax optimiser, sharded jitted step, orbax checkpoints with the
grain iterator state, resume, progress logging and `metrics.jsonl`.

A stage supplies `loss_fn(trainable, batch) -> (loss, metrics)` plus its initial trainable params; anything
else the loss needs (a frozen base, a frozen aux) is closed over and never receives gradients or optimizer
state.
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
  """Appends one JSON object per logged step; on resume, drops lines past the restored step first."""

  def __init__(self, path: Path, resume_step: int):
    self.path = path
    if path.exists():
      kept = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= resume_step]
      path.write_text("".join(l + "\n" for l in kept))

  def write(self, row: dict):
    with self.path.open("a") as f:
      f.write(json.dumps(row) + "\n")


def _to_float(tree) -> dict:
  return {k: float(v) for k, v in jax.device_get(tree).items()}


def train(*, workdir, loss_fn: Callable, init_trainable: Callable[[], Any], logical_axes: Any | None,
          data_iter, steps: int, optim: OptimConfig, mesh, tokens_per_step: int, save_every: int,
          log_every: int = 10, fail_at_step: int | None = None, frozen_for_checkpoint: Any = None,
          params_for_checkpoint: Callable[[Any], Any] | None = None):
  """Runs (or resumes) training to `steps`. Returns (trainable params, list of logged metric rows).
  steps=0 saves the initial params as checkpoint 0.

  params_for_checkpoint: maps the trainable pytree to what is saved as `params` (e.g. adds a frozen aux so a
  kvp workdir always holds complete inference params); its inverse is `loss_fn`'s concern, not ours.
  """
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  tx = optimizer(optim, steps)
  sched = schedule(optim, steps)
  to_saved = params_for_checkpoint or (lambda p: p)

  trainable = init_trainable()
  shardings = (sharding.param_shardings(trainable, logical_axes, mesh) if logical_axes is not None
               else sharding.replicated(trainable, mesh))
  trainable = jax.device_put(trainable, shardings)
  # Optimizer state sharded like the params it mirrors (counts replicated): otherwise the first step's output
  # shardings differ from its inputs' and the train step compiles twice.
  abstract_opt = jax.eval_shape(tx.init, trainable)
  opt_shardings = optax.tree_map_params(tx, lambda _, sh: sh, abstract_opt, shardings,
                                        transform_non_params=lambda _: NamedSharding(mesh, Pspec()))
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(trainable)

  ckpt = Checkpointer(workdir, save_every=save_every)
  start = 0
  if ckpt.latest_step() is not None:
    start = ckpt.latest_step()
    abstract = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), t)
    saved, opt = ckpt.restore(abstract(to_saved(trainable)), abstract({"opt_state": opt_state, "step": jnp.zeros((), jnp.int32)}),
                              data_iter)
    trainable = _from_saved(saved, trainable)
    opt_state = opt["opt_state"]
    logging.info("resumed from %s at step %d", ckpt.dir, start)
  metrics_out = MetricsWriter(workdir / "metrics.jsonl", start)

  def step_fn(trainable, opt_state, batch):
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, batch)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    metrics["grad_norm"] = optax.global_norm(grads)
    return optax.apply_updates(trainable, updates), opt_state, metrics

  if steps == 0 and start == 0:  # nothing to train: the starting point (e.g. a least-squares fit) is the result
    ckpt.save(0, to_saved(trainable), {"opt_state": opt_state, "step": jnp.asarray(0, jnp.int32)}, data_iter,
              force=True)
  step_jit = jax.jit(step_fn, donate_argnums=(0, 1))
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
    ckpt.save(step, to_saved(trainable), {"opt_state": opt_state, "step": jnp.asarray(step, jnp.int32)},
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
