"""One device mesh and a small rules table from logical axes to mesh axes.

Mesh axes (always all four, unused ones of size 1, so one rules table serves every layout):
  data   plain data parallelism: the batch is split, parameters are replicated;
  fsdp   fully sharded data parallelism: the batch is split *and* every parameter, the frozen base included, and
         the optimizer state are split along their "embed" axis (XLA gathers a layer's weights when it runs);
  model  tensor parallelism: heads, KV heads, MLP width and vocabulary are split;
  seq    the prompt's chunks in KV-Runahead's chain-parallel prefill (kvp_jax/baselines/runahead.py).
One CPU is a 1x1x1x1 mesh; the same code runs on a pod. Parameters are sharded by the logical axes declared once
in kvp_jax/models/params.py; an axis whose size the mesh axes do not divide stays replicated.

Many processes (kvp_jax/training/distributed.py): every process feeds the rows of the global batch that its
own devices hold (`process_rows`); `shard_batch` assembles the global array from each process's rows.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as Pspec

MESH_AXES = ("data", "fsdp", "model", "seq")
BATCH_AXES = ("data", "fsdp")

RULES = {
    "batch": BATCH_AXES,
    "embed": "fsdp",
    "heads": "model",
    "kv_heads": "model",
    "mlp": "model",
    "vocab": "model",
    "head_dim": None,
    "layers": None,  # stacked per-layer weights (the predictor's [L_B, I, O])
    "pred_in": "fsdp",  # the predictor's input features
    "pred_out": "model",  # the predictor's output K/V features (K_b * H_b)
}


def parse_mesh(spec: str) -> dict[str, int]:
  """"data:2,fsdp:4" -> {"data": 2, "fsdp": 4}; one size may be -1 (every device the others leave)."""
  out = {}
  for part in filter(None, (p.strip() for p in spec.split(","))):
    name, sep, size = part.partition(":")
    if not sep or name not in MESH_AXES:
      raise ValueError(f"--mesh={spec!r}: each entry is AXIS:SIZE with AXIS one of {MESH_AXES}, e.g. fsdp:8,model:2")
    try:
      out[name] = int(size)
    except ValueError:
      raise ValueError(f"--mesh={spec!r}: size of {name!r} is not an integer") from None
  return out


def make_mesh(data: int = -1, model: int = 1, fsdp: int = 1, seq: int = 1, devices=None) -> jax.sharding.Mesh:
  """A ("data", "fsdp", "model", "seq") mesh over the first data*fsdp*model*seq devices; one size may be -1."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = {"data": data, "fsdp": fsdp, "model": model, "seq": seq}
  free = [k for k, v in sizes.items() if v == -1]
  if len(free) > 1:
    raise ValueError(f"only one mesh axis may be -1 (all remaining devices); got {free}")
  known = math.prod(v for v in sizes.values() if v != -1)
  if free:
    if known < 1 or len(devices) % known:
      raise ValueError(f"the other mesh axes ({known} devices) do not divide the {len(devices)} available devices")
    sizes[free[0]] = len(devices) // known
  n = math.prod(sizes.values())
  if min(sizes.values()) < 1 or n > len(devices):
    shape = "x".join(f"{k}:{v}" for k, v in sizes.items())
    raise ValueError(f"a {shape} mesh needs {n} devices; {len(devices)} are available")
  # Auto axes: XLA propagates shardings through the model code, which stays free of sharding annotations.
  return jax.make_mesh(tuple(sizes.values()), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices[:n])


def mesh_from_spec(spec: str, devices=None) -> jax.sharding.Mesh:
  """`--mesh` value -> mesh; axes not named have size 1, and "" means data parallelism over every device."""
  sizes = parse_mesh(spec) or {"data": -1}
  return make_mesh(**{"data": 1, **sizes}, devices=devices)


def _mesh_axes_for(name: str | None, size: int, mesh) -> str | tuple[str, ...] | None:
  rule = RULES.get(name) if name else None
  axes = tuple(a for a in ((rule,) if isinstance(rule, str) else rule or ()) if mesh.shape.get(a, 1) > 1)
  if not axes or size % math.prod(mesh.shape[a] for a in axes):
    return None  # e.g. 2 kv heads on a 4-way model axis: replicate rather than fail
  return axes[0] if len(axes) == 1 else axes


def spec_for(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh) -> Pspec:
  out, used = [], set()
  for name, size in zip(axes, shape):
    m = _mesh_axes_for(name, size, mesh)
    names = (m,) if isinstance(m, str) else m or ()
    if used & set(names):
      m, names = None, ()  # a mesh axis shards at most one dimension of an array
    used |= set(names)
    out.append(m)
  return Pspec(*out)


def _is_axes(a) -> bool:
  return isinstance(a, tuple) and all(s is None or isinstance(s, str) for s in a)


def param_shardings(params, logical_axes, mesh):
  """NamedShardings for a params pytree, given the matching pytree of logical-axis tuples."""
  return jax.tree.map(lambda x, ax: NamedSharding(mesh, spec_for(ax, x.shape, mesh)), params, logical_axes,
                      is_leaf=_is_axes)


def replicated(tree, mesh):
  return jax.tree.map(lambda _: NamedSharding(mesh, Pspec()), tree)


def put(tree, shardings):
  """jax.device_put onto (possibly multi-process) shardings. With several processes, an array committed to one
  local device (a checkpoint read without shardings) cannot be resharded across processes directly; it goes
  through host memory, where every process holds the same values."""
  if jax.process_count() == 1:
    return jax.device_put(tree, shardings)
  local = lambda x: isinstance(x, jax.Array) and x.is_fully_addressable and x.committed
  return jax.tree.map(lambda x, s: jax.device_put(np.asarray(x) if local(x) else x, s), tree, shardings)


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, Pspec(tuple(a for a in BATCH_AXES if mesh.shape[a] > 1) or None))


def batch_ways(mesh) -> int:
  """How many ways the batch is split (data x fsdp)."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def process_rows(mesh, global_batch: int) -> tuple[int, int]:
  """(block, blocks): this process feeds rows [block * n, (block + 1) * n) of the global batch, n =
  global_batch // blocks. One process: (0, 1). Processes whose devices hold the same rows (tensor parallelism
  across hosts) share a block and must read the same data."""
  if global_batch % batch_ways(mesh):
    raise ValueError(f"batch size {global_batch} is not divisible by the {batch_ways(mesh)}-way data x fsdp "
                     "split of the batch; change --batch_size or --mesh")
  idx = batch_sharding(mesh).addressable_devices_indices_map((global_batch,))
  rows = sorted({(s[0].start or 0, global_batch if s[0].stop is None else s[0].stop) for s in idx.values()})
  lo, hi = rows[0][0], rows[-1][1]
  if sum(b - a for a, b in rows) != hi - lo or global_batch % (hi - lo):
    raise ValueError("this process's devices do not hold one contiguous block of the batch; order the mesh "
                     "so each host's devices are neighbours on the data/fsdp axes")
  return lo // (hi - lo), global_batch // (hi - lo)


def shard_batch(batch: dict, mesh) -> dict:
  """Places this process's batch rows ([b, ...] numpy arrays) as one global [b * blocks, ...] array per key,
  split over the data and fsdp axes (one process: b is the whole batch)."""
  _, blocks = process_rows(mesh, batch_ways(mesh))  # counted in rows per data x fsdp way: any batch size
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    if (v.shape[0] * blocks) % batch_ways(mesh):
      raise ValueError(f"batch size {v.shape[0] * blocks} ({k}) is not divisible by the {batch_ways(mesh)}-way "
                       "data x fsdp split of the batch; change --batch_size or --mesh")
    out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh), v, (v.shape[0] * blocks, *v.shape[1:]))
  return out


def device_bytes(tree) -> int:
  """Bytes the arrays (or ShapeDtypeStructs with a sharding) of `tree` occupy on one device: the largest."""
  per_device: dict = {}
  for x in jax.tree.leaves(tree):
    shard = x.sharding.shard_shape(x.shape)
    nbytes = math.prod(shard) * np.dtype(x.dtype).itemsize
    for d in x.sharding.device_set:
      per_device[d] = per_device.get(d, 0) + nbytes
  return max(per_device.values(), default=0)
