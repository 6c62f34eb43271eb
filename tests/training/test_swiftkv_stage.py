"""SwiftKV's training stage: the distillation loss falls on held-out text, only SwiftKV's parameters change
(the base is untouched), a run cut short resumes to the same result, and the workdir loads back for inference."""

import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvp_jax.baselines import swiftkv
from kvp_jax.data import pipeline, qa_synthetic
from kvp_jax.data.tokenizer import load_tokenizer
from kvp_jax.models import checkpoints
from kvp_jax.training import loop, sharding, stages

from helpers import qa_corpus

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2,
        "head_dim": 8, "max_position_embeddings": 256}
OPTIM = loop.OptimConfig(lr=3e-3, warmup_steps=2, weight_decay=0.0, b2=0.999)
STEPS = 16


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return str(qa_corpus(tmp_path_factory.mktemp("corpus") / "docs.jsonl", 60))


def _data(corpus, seed=0):
  return stages.DataConfig(source=corpus, seq_len=32, batch_size=4, seed=seed)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, corpus):
  wd = tmp_path_factory.mktemp("base")
  stages.pretrain(workdir=wd, model=TINY, init_checkpoint=None, lp_keep=None, tokenizer="train:300",
                  data=_data(corpus), steps=20, optim=loop.OptimConfig(lr=3e-3, warmup_steps=2), z_loss=1e-4,
                  mesh=sharding.make_mesh(1, 1), save_every=20, log_every=10)
  return wd


def _train(wd, base_dir, corpus):
  return stages.swiftkv(workdir=wd, base_checkpoint=str(base_dir), cutoff=0.5, loss=swiftkv.SwiftKVLossConfig(),
                        data=_data(corpus, seed=1), steps=STEPS, optim=OPTIM, mesh=sharding.make_mesh(1, 1),
                        save_every=STEPS // 2, log_every=4)


def test_swiftkv_stage_learns_resumes_and_loads(tmp_path, base_dir, corpus):
  cfg, base = checkpoints.load_model(base_dir)
  base_before = [np.array(x) for x in jax.tree.leaves(base)]
  trained, rows = _train(tmp_path / "skv", base_dir, corpus)
  assert [r["step"] for r in rows] == [4, 8, 12, 16]
  assert {"loss", "loss_logits", "loss_hidden", "ce_student"} <= set(rows[-1])
  # held out: the distillation loss of the trained SwiftKV is well below that of its initialisation
  tok = load_tokenizer(base_dir / "tokenizer")
  docs = qa_synthetic.training_documents(8, seed=99, num_facts_range=(4, 8))
  batch = jax.tree.map(jnp.asarray, next(pipeline.make_lm_iterator(docs, tok, 32, 4, 0)))
  loss = jax.jit(lambda skv: swiftkv.swiftkv_loss(cfg, swiftkv.SwiftKVLossConfig(), skv, base, batch)[0])
  before, after = float(loss(swiftkv.init_from_base(cfg, base, 2))), float(loss(trained))
  print(f"held-out distillation loss {before:.4f} -> {after:.4f}")
  assert after < 0.8 * before
  # the base is the frozen teacher
  for a, b in zip(base_before, jax.tree.leaves(checkpoints.load_model(base_dir)[1])):
    np.testing.assert_array_equal(a, np.asarray(b))
  # loads back as the trained parameters
  _, _, loaded = swiftkv.load_swiftkv(tmp_path / "skv", base_params=base)
  for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # cut short after step 8: the rerun resumes there (params, optimizer, data position) and ends where it did
  shutil.copytree(tmp_path / "skv", tmp_path / "cut")
  shutil.rmtree(tmp_path / "cut" / "checkpoints" / str(STEPS))
  resumed, rows2 = _train(tmp_path / "cut", base_dir, corpus)
  assert [r["step"] for r in rows2] == [12, 16]
  for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(resumed)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_cli_cutoff_one_is_a_one_line_error(tmp_path, base_dir):
  proc = subprocess.run([sys.executable, "-m", "kvp_jax.train", "--stage=swiftkv", f"--workdir={tmp_path / 'w'}",
                         f"--base_checkpoint={base_dir}", "--swiftkv_cutoff=1.0"], capture_output=True, text=True,
                        env=os.environ, timeout=300)
  assert proc.returncode == 2 and "nothing to train" in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
