"""The mesh and rules table: --mesh parsing, one free axis, specs from logical axes, and the batch rows a
process feeds (one process, one device here; many devices in test_sharded_step.py)."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as Pspec

from kvp_jax.training import sharding


def test_parse_mesh_and_errors():
  assert sharding.parse_mesh("data:2, fsdp:4") == {"data": 2, "fsdp": 4}
  assert sharding.parse_mesh("") == {}
  with pytest.raises(ValueError, match="each entry is AXIS:SIZE"):
    sharding.parse_mesh("tensor:2")
  with pytest.raises(ValueError, match="is not an integer"):
    sharding.parse_mesh("fsdp:x")


def test_make_mesh_fills_one_free_axis_and_checks_the_device_count():
  mesh = sharding.mesh_from_spec("")
  assert mesh.axis_names == sharding.MESH_AXES and mesh.shape["data"] == jax.device_count()
  with pytest.raises(ValueError, match="needs 4 devices"):
    sharding.mesh_from_spec("fsdp:2,model:2")
  with pytest.raises(ValueError, match="only one mesh axis may be -1"):
    sharding.make_mesh(data=-1, fsdp=-1)


class _FakeMesh:
  def __init__(self, **shape):
    self.shape = {a: shape.get(a, 1) for a in sharding.MESH_AXES}


def test_specs_follow_the_rules_and_replicate_what_does_not_divide():
  m = _FakeMesh(fsdp=4, model=2)
  assert sharding.spec_for(("embed", "heads", "head_dim"), (64, 4, 16), m) == Pspec("fsdp", "model", None)
  assert sharding.spec_for(("embed", "kv_heads", "head_dim"), (64, 1, 16), m) == Pspec("fsdp", None, None)
  assert sharding.spec_for(("vocab", "embed"), (100, 64), m) == Pspec("model", "fsdp")
  assert sharding.spec_for(("batch", None), (8, 3), _FakeMesh(data=2, fsdp=4)) == Pspec(("data", "fsdp"), None)
  assert sharding.spec_for(("batch", None), (8, 3), _FakeMesh(fsdp=4)) == Pspec("fsdp", None)
  assert sharding.spec_for(("embed",), (6,), m) == Pspec(None)  # 6 does not split 4 ways


def test_one_process_feeds_every_row():
  mesh = sharding.make_mesh(1, 1)
  assert sharding.process_rows(mesh, 8) == (0, 1)
  b = sharding.shard_batch({"inputs": np.zeros((4, 3), np.int32)}, mesh)
  assert b["inputs"].shape == (4, 3)
