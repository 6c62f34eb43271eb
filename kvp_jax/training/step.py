"""The jitted train step: gradients of a stage's loss, accumulated over micro-batches, in a chosen compute dtype,
applied by optax; with explicit shardings for every input and output so nothing is resharded between steps.

step(trainable, frozen, opt_state, batch) -> (trainable, opt_state, metrics)
- trainable: float32 master weights, sharded by their logical axes; donated.
- frozen: parameters the loss reads but never trains (the KV-Prediction base, a frozen aux), stored in whatever
  dtype the stage loaded them (bfloat16 on accelerators), sharded like trainable weights; never donated.
- batch: {"inputs", "targets"[, "weights"]} [B, T], rows split over the data x fsdp axes.
Mixed precision: with compute_dtype=bfloat16 the loss sees a bfloat16 copy of the trainable weights; the
gradient flows back through the cast, so grads, optimizer state and updates stay float32.
Gradient accumulation: the batch is cut into k micro-batches (row r goes to micro-batch r % k, so every
micro-batch stays spread over all devices) and a `lax.scan` sums their gradients. Each micro-batch's token
mean is taken over the *whole* batch's weight (`loss_denominator`), so k micro-batches give exactly the
gradient of the one big batch even when padding differs between them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as Pspec

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
REMATS = ("none", "full", "dots", "dots_no_batch")  # kvp_jax/models/decoder.py REMAT_POLICIES


@dataclasses.dataclass(frozen=True)
class ComputeConfig:
  """How a stage computes, not what it learns: float32 everywhere and one pass per step is the CPU default."""
  compute_dtype: str = "float32"  # the dtype the loss sees the trainable weights in (master copy stays float32)
  frozen_dtype: str = "float32"  # storage of the frozen base (and a frozen aux)
  grad_accum: int = 1  # micro-batches per optimizer step
  remat: str = "none"  # per-layer activation rematerialisation policy

  def __post_init__(self):
    for name in ("compute_dtype", "frozen_dtype"):
      if getattr(self, name) not in DTYPES:
        raise ValueError(f"--{name} must be one of {tuple(DTYPES)}, got {getattr(self, name)!r}")
    if self.remat not in REMATS:
      raise ValueError(f"--remat must be one of {REMATS}, got {self.remat!r}")
    if self.grad_accum < 1:
      raise ValueError(f"--grad_accum must be >= 1, got {self.grad_accum}")

LossFn = Callable[[Any, Any, dict], tuple[jax.Array, dict]]  # (trainable, frozen, batch) -> (loss, metrics)


def cast_floats(tree, dtype):
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def microbatches(batch: dict, k: int) -> dict:
  """[B, ...] -> [k, B / k, ...] with row r in micro-batch r % k (each device's rows split k ways locally)."""
  def split(x):
    if x.shape[0] % k:
      raise ValueError(f"batch size {x.shape[0]} is not divisible by --grad_accum={k}")
    return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)
  return {key: split(v) for key, v in batch.items()}


def _weight_total(batch: dict):
  if "weights" in batch:
    return jnp.sum(batch["weights"].astype(jnp.float32))
  return jnp.asarray(batch["targets"].size, jnp.float32)


def make_step(loss_fn: LossFn, tx: optax.GradientTransformation, *, grad_accum: int = 1,
              compute_dtype=jnp.float32, batch_sharding: NamedSharding | None = None):
  """The un-jitted step function (see module doc); `jit_step` adds shardings and donation."""
  if grad_accum < 1:
    raise ValueError(f"--grad_accum must be >= 1, got {grad_accum}")

  def loss_of(trainable, frozen, batch):
    return loss_fn(cast_floats(trainable, compute_dtype), frozen, batch)

  grad_fn = jax.value_and_grad(loss_of, has_aux=True)

  def grads_and_metrics(trainable, frozen, batch):
    if grad_accum == 1:
      (_, metrics), grads = grad_fn(trainable, frozen, batch)
      return grads, metrics
    micro = microbatches(batch, grad_accum)
    denom = _weight_total(batch) / grad_accum  # so the k micro-batch means add up to the full batch's mean

    def body(acc, mb):
      if batch_sharding is not None:
        mb = jax.lax.with_sharding_constraint(mb, batch_sharding)
      (_, m), g = grad_fn(trainable, frozen, {**mb, "loss_denominator": denom})
      return jax.tree.map(jnp.add, acc, (g, m)), None

    zeros = jax.tree.map(jnp.zeros_like, trainable)
    metric_shapes = jax.eval_shape(lambda: grad_fn(trainable, frozen,
                                                   {**jax.tree.map(lambda x: x[0], micro),
                                                    "loss_denominator": denom})[0][1])
    zero_m = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes)
    (grads, metrics), _ = jax.lax.scan(body, (zeros, zero_m), micro)
    return jax.tree.map(lambda g: g / grad_accum, grads), jax.tree.map(lambda m: m / grad_accum, metrics)

  def step(trainable, frozen, opt_state, batch):
    grads, metrics = grads_and_metrics(trainable, frozen, batch)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    metrics = {**metrics, "grad_norm": optax.global_norm(grads)}
    return optax.apply_updates(trainable, updates), opt_state, metrics

  return step


def opt_shardings(tx: optax.GradientTransformation, abstract_trainable, trainable_shardings, mesh):
  """Optimizer state sharded like the params it mirrors (counts and scalars replicated)."""
  abstract_opt = jax.eval_shape(tx.init, abstract_trainable)
  return optax.tree_map_params(tx, lambda _, sh: sh, abstract_opt, trainable_shardings,
                               transform_non_params=lambda _: NamedSharding(mesh, Pspec()))


def jit_step(step, mesh, trainable_shardings, frozen_shardings, opt_state_shardings, batch_sharding):
  """jax.jit of `step` with every input's and output's sharding pinned; trainable and opt state donated."""
  replicated = NamedSharding(mesh, Pspec())
  return jax.jit(step, donate_argnums=(0, 2),
                 in_shardings=(trainable_shardings, frozen_shardings, opt_state_shardings, batch_sharding),
                 out_shardings=(trainable_shardings, opt_state_shardings, replicated))
