"""One device mesh and a small rules table from logical axes to mesh axes.

The mesh has a "data" axis (batch) and a "model" axis (heads / MLP width). One CPU is a 1x1 mesh; the same
code runs on many accelerators. Parameters are sharded by the logical axes declared once in
kvp_jax/models/params.py; any axis whose size the mesh axis does not divide stays replicated.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as Pspec

RULES = {
    "batch": "data",
    "heads": "model",
    "kv_heads": "model",
    "mlp": "model",
    "vocab": None,
    "embed": None,
    "head_dim": None,
}


def make_mesh(data: int = -1, model: int = 1) -> jax.sharding.Mesh:
  """A ("data", "model") mesh; data=-1 takes every device that model leaves, else the first data*model."""
  n = jax.device_count()
  if data == -1:
    if n % model:
      raise ValueError(f"--mesh_model={model} does not divide the {n} available devices")
    data = n // model
  if data < 1 or model < 1 or data * model > n:
    raise ValueError(f"a {data}x{model} mesh needs {data * model} devices; {n} are available")
  # Auto axes: XLA propagates shardings through the model code, which stays free of sharding annotations.
  return jax.make_mesh((data, model), ("data", "model"), axis_types=(AxisType.Auto, AxisType.Auto),
                       devices=jax.devices()[:data * model])


def spec_for(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh) -> Pspec:
  out = []
  for name, size in zip(axes, shape):
    mesh_axis = RULES.get(name) if name else None
    if mesh_axis is not None and size % mesh.shape[mesh_axis]:
      mesh_axis = None  # e.g. 2 kv heads on a 4-way model axis: replicate rather than fail
    out.append(mesh_axis)
  return Pspec(*out)


def param_shardings(params, logical_axes, mesh):
  """NamedShardings for a params pytree, given the matching pytree of logical-axis tuples."""
  return jax.tree.map(lambda x, ax: NamedSharding(mesh, spec_for(ax, x.shape, mesh)), params, logical_axes,
                      is_leaf=lambda a: isinstance(a, tuple) and all(s is None or isinstance(s, str) for s in a))


def replicated(tree, mesh):
  return jax.tree.map(lambda _: NamedSharding(mesh, Pspec()), tree)


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, Pspec("data"))


def shard_batch(batch: dict, mesh) -> dict:
  """Places a host batch of [B, ...] numpy arrays with B split over the data axis."""
  n = mesh.shape["data"]
  for k, v in batch.items():
    if np.shape(v)[0] % n:
      raise ValueError(f"batch size {np.shape(v)[0]} ({k}) is not divisible by the {n}-way data axis; "
                       "change --batch_size or --mesh_data")
  return jax.device_put(batch, batch_sharding(mesh))
