"""The memory/time plan: built from shapes alone, its state bytes are what the shardings say, gradient
accumulation does not change the step's FLOPs, and `python -m kvp_jax.plan` plans a flagfile on a simulated mesh."""

import json
import os
import subprocess
import sys

import pytest

from kvp_jax.kvp import aux_models, losses
from kvp_jax.models import hf_checkpoint
from kvp_jax.models.config import tiny_config
from kvp_jax.training import plan as plan_lib
from kvp_jax.training import sharding
from kvp_jax.training import step as step_lib

CFG = tiny_config(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4,
                  num_kv_heads=2, head_dim=16)


def _plan(grad_accum=1, **kw):
  return plan_lib.plan_kvp(CFG, None, aux_models.AuxSpec(kind="lp", lp_keep_fraction=0.5), kind="kv",
                           layer_map=None, loss=losses.KVPLossConfig(), freeze_aux=False,
                           mesh=sharding.make_mesh(1, 1), batch_size=8, seq_len=32,
                           compute=step_lib.ComputeConfig(grad_accum=grad_accum, **kw))


def test_state_bytes_and_flops_of_a_one_device_plan():
  p1, p4 = _plan(), _plan(grad_accum=4, frozen_dtype="bfloat16")
  aux_params = CFG.replace(num_layers=2).num_params()
  pred_params = 2 * CFG.num_layers * (CFG.kv_width * CFG.kv_width + CFG.kv_width)
  assert p1.trainable_params == aux_params + pred_params and p1.frozen_params == CFG.num_params()
  assert p1.state_bytes["trainable"] == 4 * p1.trainable_params
  assert p1.state_bytes["opt"] >= 2 * 4 * p1.trainable_params  # Adam's two moments
  assert p1.state_bytes["frozen"] == 4 * CFG.num_params() and p4.state_bytes["frozen"] == 2 * CFG.num_params()
  # XLA counts the micro-batch loop body once; the plan multiplies it back: same work either way
  assert p4.flops_per_device == pytest.approx(p1.flops_per_device, rel=0.05)
  assert p4.xla_bytes["temp"] < p1.xla_bytes["temp"]  # a quarter of the activations at a time
  v5e = plan_lib.DEVICE_KINDS["v5e"]
  assert p1.fits(v5e) and not p1.fits(plan_lib.DeviceKind("tiny", p1.xla_bytes["peak"] / 2, 1e12))
  assert p1.step_seconds(v5e, 0.5) == pytest.approx(p1.flops_per_device / (0.5 * v5e.peak_flops))


def test_swiftkv_plan_trains_only_its_projections():
  from kvp_jax.baselines import swiftkv
  p = plan_lib.plan_swiftkv(CFG, 0.5, swiftkv.SwiftKVLossConfig(), mesh=sharding.make_mesh(1, 1), batch_size=4,
                            seq_len=16, compute=step_lib.ComputeConfig(frozen_dtype="bfloat16"))
  J, D, N, K, H = 2, CFG.hidden_size, CFG.num_heads, CFG.num_kv_heads, CFG.head_dim
  assert p.trainable_params == D + J * D * N * H + D * J * 2 * K * H  # norm, queries, fused K/V
  assert p.frozen_params == CFG.num_params() and p.state_bytes["frozen"] == 2 * CFG.num_params()
  assert p.what == "swiftkv" and p.flops_per_device > 0 and "k=2 of 4" in p.notes[0]


def test_known_model_configs_and_unknown_names():
  cfg = plan_lib.model_config("/path/to/Llama-3.1-8B")
  assert (cfg.num_layers, cfg.hidden_size, cfg.num_kv_heads, cfg.vocab_size) == (32, 4096, 8, 128256)
  assert 8.0e9 < cfg.num_params() < 8.1e9  # Llama-3.1-8B has 8.03B parameters
  assert 0.49e9 < plan_lib.model_config("Qwen2.5-0.5B").num_params() < 0.5e9  # 494M
  assert 7.6e9 < plan_lib.model_config("Qwen2.5-7B").num_params() < 7.7e9  # 7.62B
  assert 1.2e9 < plan_lib.model_config("Llama-3.2-1B").num_params() < 1.25e9  # 1.24B
  with pytest.raises(ValueError, match="not one of the known models"):
    plan_lib.model_config("/nowhere/Some-Model")


def test_cli_plans_a_flagfile_on_a_simulated_mesh(tmp_path):
  base = tmp_path / "base"
  base.mkdir()
  (base / "config.json").write_text(json.dumps(hf_checkpoint.config_to_hf(CFG)))
  flagfile = tmp_path / "run.flags"
  flagfile.write_text("\n".join(["--stage=kvp", "--workdir=runs/x", f"--base_checkpoint={base}", "--aux=lp",
                                 "--lp_keep_fraction=0.5", "--seq_len=32", "--batch_size=8", "--steps=10"]) + "\n")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  r = subprocess.run([sys.executable, "-m", "kvp_jax.plan", f"--flagfile={flagfile}", "--mesh=fsdp:2,model:2",
                      "--grad_accum=2", "--device_kind=v5e"], capture_output=True, text=True, timeout=600, env=env)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "mesh fsdp:2,model:2 (4 devices)" in r.stdout and "2 micro-batch(es)" in r.stdout
  assert "TPU v5e: peak" in r.stdout and "-> fits" in r.stdout
  bad = subprocess.run([sys.executable, "-m", "kvp_jax.plan", f"--flagfile={flagfile}", "--mesh=fsdp:-1"],
                       capture_output=True, text=True, timeout=120, env=env)
  assert bad.returncode == 2 and "needs every axis size" in bad.stderr and "Traceback" not in bad.stderr
