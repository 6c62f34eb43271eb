"""The sharded KV-Prediction train step: every mesh layout gives the single-device loss and parameters and really
shards its buffers (8 simulated CPU devices, in a subprocess); bf16 compute stays close to float32; k
accumulated micro-batches equal one k-times-larger batch; remat does not change the gradients."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_params
from kvp_jax.kvp import aux_models, inference, losses, predictor
from kvp_jax.models import params as P
from kvp_jax.models.config import tiny_config
from kvp_jax.training import loop, sharding
from kvp_jax.training import step as step_lib

TESTS = Path(__file__).resolve().parents[1]

SETUP = """
import numpy as np, jax, jax.numpy as jnp
from helpers import random_params
from kvp_jax.kvp import aux_models, inference, losses, predictor
from kvp_jax.models import params as P
from kvp_jax.models.config import tiny_config

CFG = tiny_config(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16)


def kvp_setup(remat="none"):
  base = random_params(CFG, 0)
  kcfg, kp = inference.build(CFG, base, aux_models.AuxSpec(kind="lp", lp_keep_fraction=0.5), init="random")
  trainable = {"aux": kp.aux, "pred": kp.pred}
  axes = {"aux": P.logical_axes(kcfg.aux), "pred": predictor.logical_axes(kcfg)}
  loss_fn = lambda t, f, b: losses.kvp_loss(kcfg, losses.KVPLossConfig(), t, {}, f["base"], b, remat=remat)
  return trainable, axes, {"base": base}, {"base": P.logical_axes(CFG)}, loss_fn


def swiftkv_setup(remat="none"):
  from kvp_jax.baselines import swiftkv
  base = random_params(CFG, 0)
  # Initialised from another model: from the base itself the 2-layer student equals its teacher (loss 0).
  trainable = swiftkv.init_from_base(CFG, random_params(CFG, 1), 1)
  loss_fn = lambda t, f, b: swiftkv.swiftkv_loss(CFG, swiftkv.SwiftKVLossConfig(), t, f["base"], b, remat=remat)
  return trainable, swiftkv.logical_axes(trainable), {"base": base}, {"base": P.logical_axes(CFG)}, loss_fn


def batch(seed, B=8, T=16):
  rng = np.random.default_rng(seed)
  w = (rng.random((B, T)) > 0.3).astype(np.float32)  # padding that differs from row to row
  return {"inputs": rng.integers(0, 128, (B, T)).astype(np.int32),
          "targets": rng.integers(0, 128, (B, T)).astype(np.int32), "weights": w}
"""
exec(SETUP)  # the same tiny setup for the in-process tests below

MESHES = textwrap.dedent("""
  import os, sys
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  SETUP
  from kvp_jax.training import loop, sharding
  from kvp_jax.training import step as step_lib
  assert jax.device_count() == 8

  # Adam's first steps move a weight by ~lr * g / (|g| + eps): with eps=1e-8 a gradient near zero turns ulp-level
  # differences of the summation order into differences of order lr. eps=1e-3 keeps the comparison about the
  # sharding (the update is then smooth in g), not about Adam's amplification of rounding.
  tx = loop.optimizer(loop.OptimConfig(lr=1e-2, warmup_steps=0, eps=1e-3), steps=10)

  def run(spec):
    mesh = sharding.mesh_from_spec(spec)
    trainable, axes, frozen, frozen_axes, loss_fn = builders[STAGE]()
    sh, fsh = sharding.param_shardings(trainable, axes, mesh), sharding.param_shardings(frozen, frozen_axes, mesh)
    osh = step_lib.opt_shardings(tx, trainable, sh, mesh)
    t, f = jax.device_put(trainable, sh), jax.device_put(frozen, fsh)
    o = jax.jit(tx.init, out_shardings=osh)(t)
    bsh = sharding.batch_sharding(mesh)
    step = step_lib.jit_step(step_lib.make_step(loss_fn, tx, batch_sharding=bsh), mesh, sh, fsh, osh, bsh)
    b0 = sharding.shard_batch(batch(0), mesh)
    compiled = step.lower(t, f, o, b0).compile()
    sizes = {"trainable": sharding.device_bytes(t), "frozen": sharding.device_bytes(f),
             "opt": sharding.device_bytes(o), "args": compiled.memory_analysis().argument_size_in_bytes}
    wq_spec = (t["aux"].layers[0].wq if STAGE == "kvp" else t.wq).sharding.spec
    unsplit = [jax.tree_util.keystr(k) for k, x in jax.tree_util.tree_leaves_with_path((t, f))
               if x.ndim >= 2 and x.sharding.is_fully_replicated and not jax.tree_util.keystr(k).endswith((".bk", ".bv"))]
    losses_ = []
    for s in range(3):
      t, o, m = compiled(t, f, o, sharding.shard_batch(batch(s), mesh))
      losses_.append(float(m["loss"]))
    assert (t["aux"].layers[0].wq if STAGE == "kvp" else t.wq).sharding.spec == wq_spec  # no resharding
    return losses_, [np.asarray(x) for x in jax.tree.leaves(t)], sizes, wq_spec, b0["inputs"].sharding.spec, unsplit

  builders = {"kvp": kvp_setup, "swiftkv": swiftkv_setup}
  ref = run("data:1")
  total = {k: v for k, v in ref[2].items()}
  for spec in MESH_SPECS:
    l, ps, sizes, wq_spec, bspec, unsplit = run(spec)
    np.testing.assert_allclose(l, ref[0], rtol=1e-5, err_msg=spec)
    for a, b in zip(ps, ref[1]):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=spec)
    frac = {k: sizes[k] / total[k] for k in sizes}
    print(spec, "wq", wq_spec, "batch", bspec, "per-device fraction", {k: round(v, 3) for k, v in frac.items()})
    if STAGE == "swiftkv":  # SwiftKV's [J, D, N, H] queries: the embed axis on fsdp, heads on model
      want = {"fsdp:8": (None, "fsdp", None, None), "data:4,model:2": (None, None, "model", None)}.get(spec)
      assert want is None or wq_spec == jax.sharding.PartitionSpec(*want), wq_spec
      assert spec != "fsdp:8" or (not unsplit and frac["frozen"] == 1 / 8), (unsplit, frac)
      continue
    if spec == "fsdp:8":  # every matrix of the tiny model divides 8 ways along its embed (or input) axis
      assert wq_spec == jax.sharding.PartitionSpec("fsdp", None, None), wq_spec
      assert not unsplit and frac["frozen"] == 1 / 8, (unsplit, frac)
      assert max(frac.values()) < 1 / 8 + 0.005, frac  # the predictor's biases [L, O] stay whole
    if spec == "data:2,fsdp:4":
      assert bspec == jax.sharding.PartitionSpec(("data", "fsdp")), bspec
      assert not unsplit and frac["frozen"] == 1 / 4 and frac["trainable"] < 1 / 4 + 0.005, (unsplit, frac)
    if spec.startswith("data:8"):
      assert frac["trainable"] == frac["frozen"] == 1.0, frac
    if "model:2" in spec:  # heads, kv heads, MLP and vocab split; norms replicated
      assert wq_spec == jax.sharding.PartitionSpec(None, "model", None), wq_spec
      assert 0.5 < frac["trainable"] < 0.55 and 0.5 < frac["frozen"] < 0.55, frac
  print("OK")
""").replace("SETUP", SETUP)


def _run_meshes(specs, stage="kvp"):
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
         "JAX_PLATFORMS": "cpu"}
  code = f"MESH_SPECS = {specs!r}\nSTAGE = {stage!r}\n" + MESHES
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, env=env)
  assert r.returncode == 0 and "OK" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]
  return r.stdout


def test_fsdp_and_dp_x_tp_equal_one_device_and_shard_their_buffers():
  out = _run_meshes(["fsdp:8", "data:4,model:2"])
  assert "fsdp:8" in out and "data:4,model:2" in out


@pytest.mark.slow
def test_every_mesh_layout_equals_one_device():
  _run_meshes(["data:8", "fsdp:8", "model:2", "data:2,fsdp:4", "data:4,model:2"])


@pytest.mark.slow
def test_swiftkv_step_on_fsdp_and_dp_x_tp_equals_one_device():
  out = _run_meshes(["fsdp:8", "data:4,model:2"], stage="swiftkv")
  assert "fsdp:8" in out and "data:4,model:2" in out


def _grads(loss_fn, trainable, frozen, b, compute_dtype=jnp.float32):
  f = lambda t: loss_fn(step_lib.cast_floats(t, compute_dtype), frozen, b)
  (loss, m), g = jax.jit(jax.value_and_grad(f, has_aux=True))(trainable)
  return float(loss), g


def test_bf16_compute_and_frozen_base_stay_close_to_float32():
  trainable, _, frozen, _, loss_fn = kvp_setup()
  b = jax.tree.map(jnp.asarray, batch(0))
  l32, g32 = _grads(loss_fn, trainable, frozen, b)
  l16, g16 = _grads(loss_fn, trainable, P.cast(frozen, jnp.bfloat16), b, jnp.bfloat16)
  # Stated tolerance: bf16 keeps 8 mantissa bits (rel. step 2^-8 = 0.4%); the loss sums many such terms.
  assert abs(l16 - l32) / l32 < 1e-2, (l16, l32)
  n32 = float(jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(g32))))
  n16 = float(jnp.sqrt(sum(jnp.sum(x.astype(jnp.float32) ** 2) for x in jax.tree.leaves(g16))))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(g16))  # grads reach the float32 master weights
  assert abs(n16 - n32) / n32 < 5e-2, (n16, n32)


@pytest.mark.parametrize("k", [pytest.param(2, marks=pytest.mark.slow), 4])
def test_k_micro_batches_equal_one_batch_k_times_larger(k):
  trainable, _, frozen, _, loss_fn = kvp_setup()
  tx = loop.optimizer(loop.OptimConfig(lr=1e-2, warmup_steps=0, eps=1e-3), steps=10)  # eps: see MESHES
  b = jax.tree.map(jnp.asarray, batch(0))
  outs = {}
  for accum in (1, k):
    step = jax.jit(step_lib.make_step(loss_fn, tx, grad_accum=accum))
    outs[accum] = step(trainable, frozen, tx.init(trainable), b)
  # the weights differ between micro-batches, so this only holds with the whole batch's denominator
  w = np.asarray(b["weights"]).reshape(-1, k, 16).swapaxes(0, 1).sum((1, 2))
  assert len(set(w.tolist())) > 1, w
  for key in ("loss", "loss_base", "loss_aux", "loss_kv", "grad_norm"):
    np.testing.assert_allclose(float(outs[k][2][key]), float(outs[1][2][key]), rtol=1e-5, err_msg=key)
  for a, c in zip(jax.tree.leaves(outs[k][0]), jax.tree.leaves(outs[1][0])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-5, atol=1e-6)


def test_micro_batches_take_every_kth_row():
  x = jnp.arange(8)[:, None] * jnp.ones((8, 3), jnp.int32)
  mb = step_lib.microbatches({"inputs": x}, 2)["inputs"]
  assert mb.shape == (2, 4, 3) and mb[0, :, 0].tolist() == [0, 2, 4, 6] and mb[1, :, 0].tolist() == [1, 3, 5, 7]
  with pytest.raises(ValueError, match="not divisible by --grad_accum=3"):
    step_lib.microbatches({"inputs": x}, 3)


@pytest.mark.parametrize("policy", ["full", pytest.param("dots_no_batch", marks=pytest.mark.slow)])
def test_remat_gives_the_same_gradients(policy):
  trainable, _, frozen, _, loss_none = kvp_setup("none")
  _, _, _, _, loss_remat = kvp_setup(policy)
  b = jax.tree.map(jnp.asarray, batch(1))
  l0, g0 = _grads(loss_none, trainable, frozen, b)
  l1, g1 = _grads(loss_remat, trainable, frozen, b)
  assert l0 == pytest.approx(l1, rel=1e-6)
  for a, c in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-5, atol=1e-7)
  # and it is really rematerialised: the backward pass recomputes the layers' matmuls
  jaxpr = str(jax.make_jaxpr(jax.grad(lambda t: loss_remat(t, frozen, b)[0]))(trainable))
  assert "remat" in jaxpr or "checkpoint" in jaxpr


def test_swiftkv_accumulates_and_rematerialises_exactly():
  """SwiftKV's stage runs on the same step: 2 micro-batches equal one batch, remat leaves the gradients alone."""
  trainable, _, frozen, _, loss_fn = swiftkv_setup()
  tx = loop.optimizer(loop.OptimConfig(lr=1e-2, warmup_steps=0, eps=1e-3), steps=10)  # eps: see MESHES
  b = jax.tree.map(jnp.asarray, batch(0))
  outs = {k: jax.jit(step_lib.make_step(loss_fn, tx, grad_accum=k))(trainable, frozen, tx.init(trainable), b)
          for k in (1, 2)}
  for key in ("loss", "loss_logits", "loss_hidden", "ce_student", "grad_norm"):
    np.testing.assert_allclose(float(outs[2][2][key]), float(outs[1][2][key]), rtol=1e-5, err_msg=key)
  for a, c in zip(jax.tree.leaves(outs[2][0]), jax.tree.leaves(outs[1][0])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-5, atol=1e-6)
  _, g0 = _grads(loss_fn, trainable, frozen, b)
  _, _, _, _, loss_remat = swiftkv_setup("full")
  _, g1 = _grads(loss_remat, trainable, frozen, b)
  for a, c in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-5, atol=1e-7)
  jaxpr = str(jax.make_jaxpr(jax.grad(lambda t: loss_remat(t, frozen, b)[0]))(trainable))
  assert "remat" in jaxpr or "checkpoint" in jaxpr


def test_compute_config_rejects_bad_values():
  with pytest.raises(ValueError, match="--compute_dtype must be one of"):
    step_lib.ComputeConfig(compute_dtype="float16")
  with pytest.raises(ValueError, match="--remat must be one of"):
    step_lib.ComputeConfig(remat="some")
  with pytest.raises(ValueError, match="--grad_accum must be >= 1"):
    step_lib.ComputeConfig(grad_accum=0)
