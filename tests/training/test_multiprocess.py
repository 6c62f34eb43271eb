"""Two processes on 127.0.0.1 (gloo CPU collectives, 2 simulated devices each) train KV Prediction with
`python -m kvp_jax.train`: the loss equals one process reading the same two data shards, and the checkpoint both
processes wrote (their shards and their own data-iterator states) resumes a crashed run exactly."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kvp_jax.kvp import aux_models, losses
from kvp_jax.training import loop, sharding, stages

from helpers import qa_corpus

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
        "head_dim": 8, "max_position_embeddings": 256}
STEPS, LR = 4, 3e-3


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  d = tmp_path_factory.mktemp("mp")
  qa_corpus(d / "docs.jsonl", 80)
  stages.pretrain(workdir=d / "base", model=TINY, init_checkpoint=None, lp_keep=None, tokenizer="train:300",
                  data=stages.DataConfig(source=str(d / "docs.jsonl"), seq_len=32, batch_size=4), steps=2,
                  optim=loop.OptimConfig(lr=LR, warmup_steps=1), z_loss=1e-4, mesh=sharding.make_mesh(1, 1),
                  save_every=2, log_every=1)
  return d


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_processes(d: Path, workdir: Path, *extra) -> list[subprocess.CompletedProcess]:
  port = _free_port()
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
         "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}
  args = [sys.executable, "-m", "kvp_jax.train", "--stage=kvp", f"--workdir={workdir}",
          f"--base_checkpoint={d / 'base'}", f"--data={d / 'docs.jsonl'}", "--seq_len=32", "--batch_size=8",
          f"--steps={STEPS}", "--log_every=1", "--save_every=2", f"--lr={LR}", "--warmup_steps=1",
          "--predictor_init=random", "--mesh=data:4", f"--coordinator=127.0.0.1:{port}", "--num_processes=2",
          *extra]
  procs = [subprocess.Popen(args + [f"--process_id={i}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env) for i in range(2)]
  out = []
  for p in procs:
    stdout, stderr = p.communicate(timeout=900)
    out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
  return out


def _one_process(base, workdir, steps):
  """One process, one device, the same two data shards that two processes read one each."""
  return stages.kvp(
      workdir=workdir, base_checkpoint=str(base / "base"), aux=aux_models.AuxSpec(kind="lp"),
      predictor_kind="kv", predictor_init="random", layer_map=None, loss=losses.KVPLossConfig(), freeze_aux=False,
      data=stages.DataConfig(source=str(base / "docs.jsonl"), seq_len=32, batch_size=8, data_shards=2),
      steps=steps, optim=loop.OptimConfig(lr=LR, warmup_steps=1), mesh=sharding.make_mesh(1, 1), save_every=2,
      log_every=1)[1]


def _check_rows(wd, ref_rows):
  rows = [json.loads(l) for l in (wd / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [r["step"] for r in ref_rows]  # process 0 alone writes metrics
  for key in ("loss", "loss_base", "loss_aux", "loss_kv", "grad_norm"):
    np.testing.assert_allclose([r[key] for r in rows], [r[key] for r in ref_rows], rtol=1e-5, err_msg=key)


def _both_wrote(wd, step):
  data_dir = wd / "checkpoints" / str(step) / "data"
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= {p.name for p in data_dir.iterdir()}


# Slow (~40 s, two jax.distributed processes); the default suite keeps the sharded step on simulated devices.
@pytest.mark.slow
def test_two_processes_equal_one_and_both_write_the_checkpoint(tmp_path, base):
  wd = tmp_path / "two"
  for r in _two_processes(base, wd, "--steps=2"):
    assert r.returncode == 0, r.stderr[-3000:]
  _both_wrote(wd, 2)
  _check_rows(wd, _one_process(base, tmp_path / "one", steps=2))


@pytest.mark.slow
def test_two_processes_resume_from_the_checkpoint_both_wrote(tmp_path, base):
  wd = tmp_path / "two"
  for r in _two_processes(base, wd, "--fail_at_step=2"):
    assert r.returncode == 3, r.stderr[-3000:]  # --fail_at_step exits with 3 after the step-2 checkpoint
  _both_wrote(wd, 2)
  resumed = _two_processes(base, wd)
  for r in resumed:
    assert r.returncode == 0, r.stderr[-3000:]
  assert "resumed from" in resumed[0].stderr and "at step 2" in resumed[0].stderr
  _check_rows(wd, _one_process(base, tmp_path / "one", steps=STEPS))
