"""launch/probe_recall.py, profile_kvp.py and profile_decode.py run, and the probe's batches score what they
claim to."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "probe_recall.py"


def _module():
  spec = importlib.util.spec_from_file_location("probe_recall", SCRIPT)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_batches_mark_exactly_the_retrievable_targets():
  mod = _module()
  rng = np.random.default_rng(0)
  s, m = mod.recall_batch(rng, 128, batch=4)
  for row, mask in zip(s, m):
    ctx = dict(zip(row[0:32:2], row[1:32:2]))
    tgt = row[1:][mask > 0]
    keys = row[:-1][mask > 0]  # the token before each scored target is its query key
    assert len(tgt) == 16 and all(ctx[k] == v for k, v in zip(keys, tgt))
  s, m = mod.copy_batch(rng, 128, gap=10, batch=4)
  for row, mask in zip(s, m):
    sep = int(np.where(row == 2)[0][0])
    seg = row[4:4 + 24]
    np.testing.assert_array_equal(row[1:][mask > 0], seg[1:])
    assert sep >= 4 + 24


@pytest.mark.parametrize("task,loss", [("recall", "all"), ("copy", "scored")])
def test_runs(task, loss):
  proc = subprocess.run([sys.executable, str(SCRIPT), f"--task={task}", f"--loss={loss}", "--steps=1"], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert f"step 0 loss" in proc.stdout and f"{task} accuracy" in proc.stdout


# The two profilers run the 125M benchmark base (~70 s each): slow, as the benchmark smoke test covers its methods.
@pytest.mark.slow
def test_profile_kvp_runs():
  """launch/profile_kvp.py (the benchmark's 125M base, a short prompt, one run) prints every piece."""
  proc = subprocess.run([sys.executable, str(ROOT / "launch" / "profile_kvp.py"), "--prompt_len=16", "--runs=1"],
                        cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  for piece in ("lp0.25: aux ", "lp0.25: kvp_prefill", "c: aux+predictor+cache", "base: last-token step",
                "read bandwidth", "of the read bandwidth)", "its floor"):
    assert piece in proc.stdout


@pytest.mark.slow
def test_profile_decode_runs():
  """launch/profile_decode.py (the benchmark's 125M base, a short cache, one round) splits each step, and
  with --parts its attention into the score and value products."""
  proc = subprocess.run([sys.executable, str(ROOT / "launch" / "profile_decode.py"), "--prompt_len=16", "--runs=1",
                         "--batches=1,8", "--parts"], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  for piece in ("matmul peak", "B=1: step", "B=8: step", "matmuls alone", "rest of the step", "attention adds",
                "scores and softmax alone", "products alone", "XLA dots", "YNNPACK dots"):
    assert piece in proc.stdout
