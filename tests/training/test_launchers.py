"""launch/tpu_pod.sh and launch/slurm_gpu.sbatch run the same train command on every worker / task (dry runs)."""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FLAGS = "configs/kvp_llama3_1b_8b.flags"


def _dry(script, *args):
  return subprocess.run(["bash", str(ROOT / "launch" / script), *args], capture_output=True, text=True,
                        timeout=60, env={**os.environ, "DRY_RUN": "1"}, cwd=ROOT)


@pytest.mark.parametrize("script", ["tpu_pod.sh", "slurm_gpu.sbatch"])
def test_scripts_parse(script):
  assert subprocess.run(["bash", "-n", str(ROOT / "launch" / script)]).returncode == 0


def test_tpu_pod_copies_installs_and_trains_on_every_worker():
  r = _dry("tpu_pod.sh", "my-tpu", "us-central2-b", FLAGS, "--mesh=fsdp:16", "--grad_accum=16")
  assert r.returncode == 0, r.stderr
  lines = r.stdout.strip().splitlines()
  assert lines[0].startswith("tar ") and len(lines) == 4
  assert all("--worker=all" in l for l in lines[1:])
  train = lines[-1].replace("\\", "")
  for part in ("python -m kvp_jax.train", f"--flagfile={FLAGS}", "--multiprocess=on", "--mesh=fsdp:16",
               "--grad_accum=16"):
    assert part in train, train
  assert "jax[tpu]==" in lines[2].replace("\\", "")


def test_slurm_runs_one_srun_of_the_train_command():
  r = _dry("slurm_gpu.sbatch", FLAGS, "--mesh=fsdp:16")
  assert r.returncode == 0, r.stderr
  assert r.stdout.startswith("srun ") and f"-m kvp_jax.train --flagfile={FLAGS} --multiprocess=auto --mesh=fsdp:16" in r.stdout


@pytest.mark.parametrize("script,args", [("tpu_pod.sh", ["t", "z", "no/such.flags"]),
                                         ("slurm_gpu.sbatch", ["no/such.flags"])])
def test_missing_flagfile_is_one_clear_line(script, args):
  r = _dry(script, *args)
  assert r.returncode == 2 and "flagfile no/such.flags not found" in r.stderr
