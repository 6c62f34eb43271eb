"""The training stages end to end on a tiny model: loss goes down, the base stays frozen, a crash resumes
exactly, bad input is one clear line, and a 4-device sharded step equals the single-device step."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvp_jax.data import qa_synthetic
from kvp_jax.kvp import aux_models, inference, losses
from kvp_jax.kvp import checkpoints as kvp_checkpoints
from kvp_jax.models import checkpoints
from kvp_jax.training import loop, sharding, stages

from helpers import qa_corpus

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
        "head_dim": 8, "max_position_embeddings": 256}
OPTIM = loop.OptimConfig(lr=3e-3, warmup_steps=2)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return str(qa_corpus(tmp_path_factory.mktemp("corpus") / "docs.jsonl", 80))


def _data(corpus, seed=0):
  return stages.DataConfig(source=corpus, seq_len=32, batch_size=4, seed=seed)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, corpus):
  wd = tmp_path_factory.mktemp("base")
  stages.pretrain(workdir=wd, model=TINY, init_checkpoint=None, lp_keep=None, tokenizer="train:300",
                  data=_data(corpus), steps=30, optim=OPTIM, z_loss=1e-4, mesh=sharding.make_mesh(1, 1),
                  save_every=30, log_every=10)
  return wd


def _kvp(wd, base_dir, corpus, steps, **kw):
  args = dict(aux=aux_models.AuxSpec(kind="lp", lp_keep_fraction=0.5), predictor_kind="kv",
              predictor_init="random", layer_map=None, loss=losses.KVPLossConfig(), freeze_aux=False)
  args.update(kw)
  return stages.kvp(workdir=wd, base_checkpoint=str(base_dir), data=_data(corpus, seed=1), steps=steps,
                    optim=OPTIM, mesh=sharding.make_mesh(1, 1), save_every=steps, log_every=5, **args)


def _heldout_batch(base_dir):
  from kvp_jax.data import pipeline
  from kvp_jax.data.tokenizer import load_tokenizer
  tok = load_tokenizer(Path(base_dir) / "tokenizer")
  docs = qa_synthetic.training_documents(8, seed=99, num_facts_range=(4, 8))
  return jax.tree.map(jnp.asarray, next(pipeline.make_lm_iterator(docs, tok, 32, 4, 0)))


def test_pretrain_writes_metrics_and_learns(base_dir):
  rows = [json.loads(l) for l in (base_dir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [10, 20, 30]
  for key in ("step", "loss", "lr", "tokens_per_s"):
    assert key in rows[0]
  assert rows[-1]["loss"] < rows[0]["loss"] - 0.3


def test_kvp_training_lowers_consistency_and_base_ce_and_leaves_base_unchanged(tmp_path, base_dir, corpus,
                                                                               monkeypatch):
  base_cfg, base = checkpoints.load_model(base_dir)
  before = [np.array(x) for x in jax.tree.leaves(base)]
  monkeypatch.setattr(checkpoints, "load_model", lambda *a, **k: (base_cfg, base))
  files = {p: hashlib.sha1(p.read_bytes()).hexdigest() for p in Path(base_dir).rglob("*") if p.is_file()}
  batch = _heldout_batch(base_dir)
  trainable, rows = _kvp(tmp_path / "kvp", base_dir, corpus, steps=40)
  monkeypatch.undo()
  kcfg, _, kp = kvp_checkpoints.load_kvp(tmp_path / "kvp", base_params=base)
  lc = losses.KVPLossConfig()
  # the initial state is the freshly built aux + the seeded random predictor, as the stage builds them
  _, aux0, _ = aux_models.build_aux(aux_models.AuxSpec(kind="lp", lp_keep_fraction=0.5), base_cfg, base, 0)
  from kvp_jax.kvp import predictor
  pred0 = predictor.init(kcfg, jax.random.PRNGKey(2), how="random")
  m0 = losses.kvp_loss(kcfg, lc, {"aux": aux0, "pred": pred0}, {}, base, batch)[1]
  m1 = losses.kvp_loss(kcfg, lc, {"aux": kp.aux, "pred": kp.pred}, {}, base, batch)[1]
  print("held-out before/after: kv %.4f -> %.4f, base CE %.4f -> %.4f" % (
      m0["loss_kv"], m1["loss_kv"], m0["loss_base"], m1["loss_base"]))
  assert float(m1["loss_kv"]) < 0.85 * float(m0["loss_kv"])
  assert float(m1["loss_base"]) < float(m0["loss_base"]) - 0.1
  assert {"step", "loss", "lr", "tokens_per_s", "loss_base", "loss_aux", "loss_kv"} <= set(rows[-1])
  # the frozen base: bitwise unchanged in memory and on disk
  for a, b in zip(before, jax.tree.leaves(base)):
    np.testing.assert_array_equal(a, np.asarray(b))
  assert files == {p: hashlib.sha1(p.read_bytes()).hexdigest() for p in files}


def test_freeze_aux_trains_only_the_predictor(tmp_path, base_dir, corpus):
  _kvp(tmp_path / "kvp", base_dir, corpus, steps=4, freeze_aux=True)
  kcfg, base, kp = kvp_checkpoints.load_kvp(tmp_path / "kvp")
  _, aux0, _ = aux_models.build_aux(aux_models.AuxSpec(kind="lp", lp_keep_fraction=0.5), kcfg.base, base, 0)
  for a, b in zip(jax.tree.leaves(aux0), jax.tree.leaves(kp.aux)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  first, _ = inference.kvp_prefill(kcfg, base, kp, jnp.ones((1, 8), jnp.int32), jnp.zeros(1, jnp.int32), 16)
  assert first.shape == (1, kcfg.base.vocab_size)


def _cli(*args, env=None):
  return subprocess.run([sys.executable, "-m", "kvp_jax.train", *args], capture_output=True, text=True,
                        env={**os.environ, **(env or {})}, timeout=600)


def _strip(rows):
  return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")} for r in rows]


# Slow (~70 s, three CLI runs): the default suite keeps tests/test_reliability.py's SIGTERM at a step, whose
# resume must equal the straight run as well.
@pytest.mark.slow
def test_crash_and_resume_reproduces_uninterrupted_run(tmp_path, base_dir, corpus):
  common = ["--stage=kvp", f"--base_checkpoint={base_dir}", f"--data={corpus}", "--seq_len=32",
            "--batch_size=4", "--steps=12", "--save_every=4", "--log_every=2", "--warmup_steps=2",
            "--predictor_init=random", "--seed=1"]
  crashed = _cli(*common, f"--workdir={tmp_path / 'a'}", "--fail_at_step=7")
  assert crashed.returncode != 0, crashed.stderr[-2000:]
  resumed = _cli(*common, f"--workdir={tmp_path / 'a'}")
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "resumed from" in resumed.stderr
  straight = _cli(*common, f"--workdir={tmp_path / 'b'}")
  assert straight.returncode == 0, straight.stderr[-2000:]
  read = lambda d: [json.loads(l) for l in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
  a, b = _strip(read("a")), _strip(read("b"))
  assert [r["step"] for r in a] == [2, 4, 6, 8, 10, 12]
  assert a == b


@pytest.mark.parametrize("args, message", [
    (["--base_checkpoint=/nonexistent/base"], "no checkpoint directory at /nonexistent/base"),
    (["--aux=c", '--aux_model={"vocab_size": 999, "hidden_size": 16, "intermediate_size": 32, "num_layers": 1, '
      '"num_heads": 2, "num_kv_heads": 1, "head_dim": 8}'], "vocab mismatch"),
    (["--predictor=mlp"], "unknown predictor kind 'mlp'"),
    (["--no_such_flag=1"], "Unknown command line flag 'no_such_flag'"),
    (["--lp_keep_fraction=0.6"], "KVP-LP keep fraction must be one of"),
])
def test_bad_input_is_one_clear_line(tmp_path, base_dir, args, message):
  r = _cli("--stage=kvp", f"--workdir={tmp_path / 'w'}", f"--base_checkpoint={base_dir}", "--steps=0", *args)
  assert r.returncode != 0
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  lines = [l for l in r.stderr.splitlines() if message in l]
  assert lines, r.stderr[-2000:]


SHARDED = textwrap.dedent("""
  import os, sys, json
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
  import jax, numpy as np
  from kvp_jax.kvp import aux_models, losses
  from kvp_jax.training import loop, sharding, stages
  assert jax.device_count() == 4
  out = {}
  for n in (1, 4):
    wd = sys.argv[1] + f"/m{n}"
    trainable, rows = stages.kvp(workdir=wd, base_checkpoint=sys.argv[2],
        aux=aux_models.AuxSpec(kind="lp", lp_keep_fraction=0.5), predictor_kind="kv", predictor_init="random",
        layer_map=None, loss=losses.KVPLossConfig(), freeze_aux=False,
        data=stages.DataConfig(source=sys.argv[3], seq_len=32, batch_size=8, seed=1), steps=3,
        optim=loop.OptimConfig(lr=3e-3, warmup_steps=1), mesh=sharding.make_mesh(n, 1), save_every=3,
        log_every=1)
    out[n] = ([r["loss"] for r in rows], [np.asarray(x) for x in jax.tree.leaves(trainable)],
              str(jax.tree.leaves(trainable)[0].sharding))
  np.testing.assert_allclose(out[1][0], out[4][0], rtol=1e-5)
  for a, b in zip(out[1][1], out[4][1]):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
  print("OK", out[1][0], out[4][0], out[4][2])
""")


# Slow (~45 s): the whole KVP stage on 4 simulated devices; the default suite keeps the sharded step's own
# equality tests (tests/training/test_sharded_step.py).
@pytest.mark.slow
def test_sharded_step_equals_single_device(tmp_path, base_dir, corpus):
  r = subprocess.run([sys.executable, "-c", SHARDED, str(tmp_path), str(base_dir), corpus], capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]
