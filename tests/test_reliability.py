"""Reliability (issue 17): every bad input is one clear line, and no work is lost to a crash or a preemption.

ROWS is the matrix, one row per case: the command or call, the input, and the message expected. A `cli` row
runs a main (`python -m kvp_jax.<main> FLAGS`) in a subprocess, in its own directory, and checks: exit code 2,
exactly one line on stderr, starting `error:` and holding the expected text, no traceback, and no output
directory left behind. An `api` row calls the library in-process and checks that it raises a ValueError
(CheckpointError is one) whose message is one line holding the expected text; some rows also check that
nothing on disk was changed. Categories: flags, paths, corrupt (files), mismatch, runtime (inputs at run time).

Below the matrix, the crash tests: a real SIGTERM to a real training subprocess (checkpoint of the current step,
exit 0, and a resume equal to the uninterrupted run in metrics and final parameters), kill -9 inside a
checkpoint save (the previous checkpoint stays loadable and the resume is exact), a loss that turns NaN (the
run stops naming the step and keeps the last good checkpoint), an evaluation and a benchmark interrupted
halfway (the rerun reuses the rows already written), and a checkpoint's recorded versions and configuration.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvp_jax
from kvp_jax.baselines import swiftkv
from kvp_jax.data import tokenizer as tok_lib
from kvp_jax.kvp import aux_models, inference, losses
from kvp_jax.kvp.checkpoints import load_kvp
from kvp_jax.models import checkpoints, hf_checkpoint
from kvp_jax.models import params as P
from kvp_jax.models.config import ModelConfig
from kvp_jax.training import loop, sharding, stages

from helpers import qa_corpus

HOOKS = str(Path(__file__).with_name("crash_hooks.py"))
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
        "head_dim": 8, "max_position_embeddings": 256}
TINY_JSON = json.dumps(TINY)
SMALL_JSON = json.dumps({"hidden_size": 16, "intermediate_size": 32, "num_layers": 1, "num_heads": 2,
                         "num_kv_heads": 1, "head_dim": 8})
OPTIM = loop.OptimConfig(lr=3e-3, warmup_steps=1)


# ---------------------------------------------------------------------------------------------- fixtures


@dataclasses.dataclass
class Fx:
  """Tiny checkpoints (trained a couple of steps) and damaged or mismatched copies of them."""
  root: Path
  corpus: Path
  base: Path  # pretrain workdir
  kvp: Path  # kvp workdir against `base`
  swiftkv: Path  # swiftkv workdir against `base`
  hf: Path  # `base` as a Hugging Face directory, with its tokenizer
  bad: Path  # damaged copies, one per name (see _damage)

  def fresh(self, name: str) -> Path:
    """A path that does not exist yet, for one row's output."""
    d = self.root / "rows" / name
    d.parent.mkdir(parents=True, exist_ok=True)
    return d


def _data(corpus, **kw) -> stages.DataConfig:
  return stages.DataConfig(source=str(corpus), seq_len=16, batch_size=2, **kw)


def _random_hf(path: Path, vocab: int, tokenizer=None, **over) -> Path:
  cfg = ModelConfig.from_dict({"vocab_size": vocab, **TINY, **over})
  hf_checkpoint.save_pretrained(cfg, P.init(cfg, jax.random.PRNGKey(3)), path)
  if tokenizer is not None:
    tokenizer.save_pretrained(str(path))
  return path


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> Fx:
  root = tmp_path_factory.mktemp("reliability")
  corpus = qa_corpus(root / "docs.jsonl", 40, (4, 6))
  mesh = sharding.make_mesh(1, 1)
  common = dict(data=_data(corpus), steps=2, optim=OPTIM, mesh=mesh, save_every=2, log_every=1)
  stages.pretrain(workdir=root / "base", model=TINY, init_checkpoint=None, lp_keep=None, tokenizer="train:300",
                  z_loss=1e-4, **common)
  stages.kvp(workdir=root / "kvp", base_checkpoint=str(root / "base"), aux=aux_models.AuxSpec(kind="lp"),
             predictor_kind="kv", predictor_init="random", layer_map=None, loss=losses.KVPLossConfig(),
             freeze_aux=False, **common)
  stages.swiftkv(workdir=root / "swiftkv", base_checkpoint=str(root / "base"), cutoff=0.5,
                 loss=swiftkv.SwiftKVLossConfig(), **common)
  cfg, params = checkpoints.load_model(root / "base")
  hf = hf_checkpoint.save_pretrained(cfg, params, root / "hf")
  for f in (root / "base" / "tokenizer").iterdir():
    shutil.copy(f, hf)
  f = Fx(root, corpus, root / "base", root / "kvp", root / "swiftkv", hf, root / "bad")
  _damage(f)
  return f


def _damage(f: Fx):
  """The damaged and mismatched inputs the rows read."""
  from safetensors.numpy import load_file, save_file
  bad = f.bad
  bad.mkdir()
  (bad / "a_file").write_text("not a directory")
  (bad / "hf_noweights").mkdir()
  shutil.copy(f.hf / "config.json", bad / "hf_noweights")
  (bad / "hf_bin").mkdir()
  shutil.copy(f.hf / "config.json", bad / "hf_bin")
  (bad / "hf_bin" / "pytorch_model.bin").write_bytes(b"PK\x03\x04 a pickle we must never open")
  tensors = load_file(str(f.hf / "model.safetensors"))

  def hf_copy(name, change=None):
    shutil.copytree(f.hf, bad / name)
    if change is not None:
      t = dict(tensors)
      change(t)
      save_file(t, str(bad / name / "model.safetensors"), metadata={"format": "pt"})

  hf_copy("hf_trunc")
  raw = (f.hf / "model.safetensors").read_bytes()
  (bad / "hf_trunc" / "model.safetensors").write_bytes(raw[:len(raw) // 2])
  hf_copy("hf_shape", lambda t: t.update({"model.norm.weight": np.ones(7, np.float32)}))

  def poison(name, value, where):
    def change(t):
      w = t[name].copy()
      w[where] = value
      t[name] = w
    return change

  hf_copy("hf_nan", poison("model.layers.1.mlp.up_proj.weight", np.nan, (0, 0)))
  hf_copy("hf_inf", poison("model.embed_tokens.weight", np.inf, (3, 1)))
  hf_copy("hf_badjson")
  (bad / "hf_badjson" / "config.json").write_text("{not json")
  hf_copy("hf_arch")
  j = json.loads((f.hf / "config.json").read_text())
  (bad / "hf_arch" / "config.json").write_text(json.dumps({**j, "architectures": ["GPT2LMHeadModel"],
                                                           "model_type": "gpt2"}))
  step = lambda d: max((c for c in (d / "checkpoints").iterdir() if c.name.isdigit()), key=lambda c: int(c.name))
  for name, item in (("base_noparams", "params"), ("base_noopt", "opt")):
    shutil.copytree(f.base, bad / name)
    shutil.rmtree(step(bad / name) / item)
  shutil.copytree(f.base, bad / "base_badcfg")
  (bad / "base_badcfg" / checkpoints.MODEL_CONFIG).write_text("{")
  shutil.copytree(f.base, bad / "base_wrongcfg")
  j = json.loads((f.base / checkpoints.MODEL_CONFIG).read_text())
  (bad / "base_wrongcfg" / checkpoints.MODEL_CONFIG).write_text(json.dumps({**j, "hidden_size": 48}))
  shutil.copytree(f.base, bad / "base_newer")
  meta_file = step(bad / "base_newer") / "_CHECKPOINT_METADATA"
  meta = json.loads(meta_file.read_text())
  meta["custom_metadata"]["kvp_jax"]["format"] = checkpoints.FORMAT + 1
  meta_file.write_text(json.dumps(meta))
  (bad / "base_nockpt").mkdir()
  shutil.copy(f.base / checkpoints.MODEL_CONFIG, bad / "base_nockpt")
  (bad / "missing_flag.flags").write_text("--stage=pretrain\n--stepz=3\n")
  # mismatches: an aux of another vocabulary; one of the same size but another tokenizer; another base
  _random_hf(bad / "aux_vocab280", 280)
  reversed_docs = [json.loads(l)["text"][::-1] for l in f.corpus.read_text().splitlines()]
  _random_hf(bad / "aux_othertok", 300, tok_lib.train_tokenizer(reversed_docs, 300))
  _random_hf(bad / "base_3layers", 300, num_layers=3)
  # GGUF files as llama.cpp writes them (tests/gguf_writer.py): truncated, a foreign architecture, a quant
  # type gguf cannot dequantize, a NaN weight
  from gguf_writer import Q, write_gguf
  cfg = ModelConfig.from_dict({"vocab_size": 64, **TINY})
  params = P.init(cfg, jax.random.PRNGKey(4))
  write_gguf(bad / "m.gguf", cfg, params)
  raw = (bad / "m.gguf").read_bytes()
  (bad / "truncated.gguf").write_bytes(raw[:int(len(raw) * 0.6)])
  write_gguf(bad / "gemma.gguf", cfg, params, arch="gemma2")
  write_gguf(bad / "q81.gguf", cfg, params, Q.Q8_1)
  write_gguf(bad / "nan.gguf", cfg, dataclasses.replace(params, final_norm=params.final_norm.at[5].set(jnp.nan)))


def _copy(src: Path, dst: Path) -> Path:
  shutil.copytree(src, dst)
  return dst


def _unwritable(path: Path) -> bool:
  """Makes `path` (a directory) unwritable, also for root (chattr +i) where the filesystem allows."""
  path.mkdir(parents=True, exist_ok=True)
  os.chmod(path, 0o555)
  if os.geteuid() == 0:
    subprocess.run(["chattr", "+i", str(path)], capture_output=True)
  try:
    (path / "probe").write_text("")
  except OSError:
    return True
  (path / "probe").unlink()
  return False


def _writable_again(path: Path):
  if os.geteuid() == 0:
    subprocess.run(["chattr", "-i", str(path)], capture_output=True)
  os.chmod(path, 0o755)


# ---------------------------------------------------------------------------------------------- the matrix


@dataclasses.dataclass(frozen=True)
class Row:
  id: str
  category: str  # flags | paths | corrupt | mismatch | runtime
  main: str | None  # cli rows: train / eval / bench / quickstart / demo / plan; None for an api row
  given: tuple[str, ...] | Callable[[Fx], object]  # flags ({base}, {kvp}, {swiftkv}, {bad}, {corpus}, {out}) or a call
  expect: str | tuple[str, ...]  # in the one-line message (every one of them)
  env: tuple[tuple[str, str], ...] = ()


TRAIN_KVP = ("--stage=kvp", "--base_checkpoint={base}", "--data={corpus}", "--seq_len=16", "--batch_size=2",
             "--steps=2", "--workdir={out}")
TRAIN_SKV = ("--stage=swiftkv", "--base_checkpoint={base}", "--data={corpus}", "--seq_len=16", "--batch_size=2",
             "--steps=2", "--workdir={out}")
TRAIN_PRE = ("--stage=pretrain", f"--model={TINY_JSON}", "--tokenizer={base}", "--data={corpus}", "--seq_len=16",
             "--batch_size=2", "--steps=2", "--workdir={out}")
EVAL = ("--base_checkpoint={base}", "--output_dir={out}", "--num_qa=2", "--num_code=2", "--qa_num_facts=4,5",
        "--code_context_chars=64,128", "--batch_size=2", "--buckets=256")
BENCH = ("--output={out}/b.json", "--base_checkpoint={base}", "--prompt_lens=16", "--batch_sizes=1", "--runs=1",
         "--torch=false", "--lp_fractions=0.5", "--c_model=", "--recompute_budgets=", "--lazyllm_schedule=",
         "--prune_keep=", "--matmul_n=64", "--tpot_steps=2")


def _generate(**kw):
  def call(f: Fx):
    cfg, params = kvp_jax.load_model(f.base)
    return kvp_jax.generate(cfg, params, **kw)
  return call


def _kvp_generate(**kw):
  def call(f: Fx):
    kcfg, base, kp = load_kvp(f.kvp)
    return kvp_jax.kvp_generate(kcfg, base, kp, **kw)
  return call


def _pretrain(f: Fx, workdir, model=TINY, **data_kw):
  return stages.pretrain(workdir=workdir, model=model, init_checkpoint=None, lp_keep=None, tokenizer=str(f.base),
                         data=_data(f.corpus, **data_kw), steps=4, optim=OPTIM, z_loss=1e-4,
                         mesh=sharding.make_mesh(1, 1), save_every=2, log_every=1)


def _kvp_stage(f: Fx, workdir, base=None, aux=None, **kw):
  return stages.kvp(workdir=workdir, base_checkpoint=str(base or f.base), aux=aux or aux_models.AuxSpec(kind="lp"),
                    predictor_kind="kv", predictor_init="random", layer_map=None, loss=losses.KVPLossConfig(),
                    freeze_aux=False, data=_data(f.corpus), steps=4, optim=OPTIM, mesh=sharding.make_mesh(1, 1),
                    save_every=2, log_every=1, **kw)


def _swiftkv_stage(f: Fx, workdir, **data_kw):
  return stages.swiftkv(workdir=workdir, base_checkpoint=str(f.base), cutoff=0.5, loss=swiftkv.SwiftKVLossConfig(),
                        data=_data(f.corpus, **data_kw), steps=4, optim=OPTIM,
                        mesh=sharding.make_mesh(1, 1), save_every=2, log_every=1)


def _unchanged(path: Path, call):
  """Runs `call`, then checks that no file under `path` was added, removed or rewritten."""
  def snap():
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
  before = snap()
  try:
    return call()
  finally:
    assert snap() == before, f"{path} was changed by a call that failed"


def _nothing_at(workdir: Path, call):
  """Runs `call(workdir)` for a workdir that does not exist, then checks that it still does not."""
  try:
    return call(workdir)
  finally:
    assert not workdir.exists(), f"a failed call left {sorted(p.name for p in workdir.rglob('*'))} in {workdir}"


ROWS = [
    # --- flags: refused while the command line is parsed
    Row("unknown flag", "flags", "train", TRAIN_KVP + ("--no_such_flag=1",), "Unknown command line flag 'no_such_flag'"),
    Row("wrong type", "flags", "train", TRAIN_KVP + ("--steps=abc",), "flag --steps=abc: invalid literal for int()"),
    Row("negative steps", "flags", "train", TRAIN_KVP + ("--steps=-5",), "flag --steps=-5: must be >= 0"),
    Row("keep fraction 0", "flags", "train", TRAIN_KVP + ("--lp_keep_fraction=0",),
        "flag --lp_keep_fraction=0.0: must be in (0, 1]"),
    Row("keep fraction > 1", "flags", "train", TRAIN_KVP + ("--lp_keep_fraction=1.5",),
        "flag --lp_keep_fraction=1.5: must be in (0, 1]"),
    Row("lambda_C < 0", "flags", "train", TRAIN_KVP + ("--lambda_c=-1",), "flag --lambda_c=-1.0: must be a finite number >= 0"),
    Row("lr nan", "flags", "train", TRAIN_KVP + ("--lr=nan",), "flag --lr=nan: must be a finite number > 0"),
    Row("save_every 0", "flags", "train", TRAIN_KVP + ("--save_every=0",), "flag --save_every=0: must be >= 1"),
    Row("mesh axis of size 0", "flags", "train", TRAIN_KVP + ("--mesh=model:0",),
        "flag --mesh=model:0: sizes must be >= 1"),
    Row("mesh axis unknown", "flags", "train", TRAIN_KVP + ("--mesh=tensor:2",), "each entry is AXIS:SIZE"),
    Row("qa facts MIN > MAX", "flags", "train", TRAIN_KVP + ("--qa_num_facts=9,3",), "must be MIN,MAX with 1 <= MIN <= MAX"),
    Row("--aux=c without an aux model", "flags", "train", TRAIN_KVP + ("--aux=c",),
        "--aux=c needs exactly one of --aux_checkpoint and --aux_model"),
    Row("--freeze_aux with --aux_model from scratch", "flags", "train",
        TRAIN_KVP + ("--aux=c", f"--aux_model={SMALL_JSON}", "--freeze_aux"), "--freeze_aux would freeze the randomly"),
    Row("mixed QA distractors on plain documents", "flags", None,
        lambda f: stages.texts_for(stages.DataConfig(qa_distractors="mixed", num_qa_docs=2, max_code_files=1)),
        "--qa_distractors=mixed alternates the levels of chat-format documents"),
    Row("pretrain without --model", "flags", "train", tuple(a for a in TRAIN_PRE if not a.startswith("--model")),
        "--stage=pretrain needs exactly one of --model"),
    Row("missing flagfile", "flags", "train", ("--flagfile=/nonexistent/run.flags",), "Unable to open flagfile"),
    Row("flagfile with an unknown flag", "flags", "train", ("--flagfile={bad}/missing_flag.flags", "--workdir={out}"),
        "Unknown command line flag 'stepz'"),
    Row("positional argument", "flags", "train", TRAIN_KVP + ("foo",), "unexpected arguments ['foo']"),
    Row("tokenizer train:VOCAB not a number", "flags", "train",
        tuple(a for a in TRAIN_PRE if not a.startswith("--tokenizer")) + ("--tokenizer=train:abc",),
        "--tokenizer=train:VOCAB needs an integer VOCAB"),
    Row("swiftkv: cutoff 0", "flags", "train", TRAIN_SKV + ("--swiftkv_cutoff=0",),
        "flag --swiftkv_cutoff=0.0: must be in (0, 1)"),
    Row("swiftkv: cutoff 1 (nothing to train)", "flags", "train", TRAIN_SKV + ("--swiftkv_cutoff=1",),
        "SwiftKV has nothing to train"),
    Row("swiftkv: temperature 0", "flags", "train", TRAIN_SKV + ("--swiftkv_temperature=0",),
        "flag --swiftkv_temperature=0.0: must be a finite number > 0"),
    Row("b2 = 1", "flags", "train", TRAIN_SKV + ("--b2=1",), "flag --b2=1.0: must be in [0, 1)"),
    Row("--stage=swiftkv without a base", "flags", "train",
        tuple(a for a in TRAIN_SKV if not a.startswith("--base_checkpoint")), "--stage=swiftkv need --base_checkpoint"),
    Row("a swiftkv flag without --stage=swiftkv", "flags", "train", TRAIN_KVP + ("--swiftkv_cutoff=0.25",),
        "--swiftkv_cutoff is read by --stage=swiftkv only, and this run is --stage=kvp"),
    Row("a kvp flag with --stage=swiftkv", "flags", "train", TRAIN_SKV + ("--aux=c",),
        "--aux is read by --stage=kvp only, and this run is --stage=swiftkv"),
    Row("eval: unparsable method spec", "flags", "eval", EVAL + ("--method=nonsense",), "unknown method 'nonsense'"),
    Row("eval: unknown method setting", "flags", "eval", EVAL + ("--method=random_prune;kep=0.5",),
        "unexpected keyword argument 'kep'"),
    Row("eval: LazyLLM schedule outside the base's layers", "flags", "eval", EVAL + ("--method=lazyllm;schedule=5:0.5",),
        "schedule layers [5] must increase strictly within [1, 1]"),
    Row("eval: negative example count", "flags", "eval", EVAL + ("--num_qa=-1",), "flag --num_qa=-1: must be >= 0"),
    Row("eval: one value for MIN,MAX", "flags", "eval", EVAL + ("--qa_num_facts=8",), "must be MIN,MAX"),
    Row("eval: GemFilter keeping 0 tokens", "flags", "eval", EVAL + ("--method=gemfilter;topk=0",),
        "GemFilter's topk (tokens kept) must be an integer >= 1, got 0"),
    Row("eval: GemFilter even pool kernel", "flags", "eval", EVAL + ("--method=gemfilter;topk=8;pool_kernel=4",),
        "GemFilter's pool_kernel must be an odd integer >= 1"),
    Row("eval: SpecPrefill keep fraction 0", "flags", "eval", EVAL + ("--method=specprefill:base@{base};keep=0",),
        "SpecPrefill's keep (fraction of chunks kept) must be in (0, 1], got 0"),
    Row("eval: SpecPrefill chunk 0", "flags", "eval", EVAL + ("--method=specprefill:base@{base};keep=0.5;chunk=0",),
        "SpecPrefill's chunk must be an integer >= 1, got 0"),
    Row("eval: SwiftKV cutoff beyond the base's layers", "flags", "eval", EVAL + ("--method=swiftkv;cutoff=2",),
        "SwiftKV cutoff fraction 2.0 gives k=4 of 2 layers"),
    Row("bench: zero runs", "flags", "bench", BENCH + ("--runs=0",), "flag --runs=0: must be >= 1"),
    Row("bench: unknown dtype", "flags", "bench", BENCH + ("--dtype=int8",), "flag --dtype=int8: value should be one of"),
    Row("bench: prompt length not a number", "flags", "bench", BENCH + ("--prompt_lens=abc",),
        "must be comma-separated integers >= 2"),
    Row("bench: LazyLLM schedule outside the base's layers", "flags", "bench", BENCH + ("--lazyllm_schedule=9:0.5",),
        "schedule layers [9] must increase strictly within [1, 1]"),
    Row("bench: base_model not JSON", "flags", "bench",
        tuple(a for a in BENCH if not a.startswith("--base_checkpoint")) + ("--base_model={x",),
        "--base_model is not valid JSON"),
    Row("bench: SwiftKV cutoff > 1", "flags", "bench", BENCH + ("--swiftkv_cutoffs=1.5",),
        "flag --swiftkv_cutoffs=['1.5']: must be comma-separated numbers in (0.0, 1.0]"),
    Row("bench: SwiftKV cutoff below one layer", "flags", "bench", BENCH + ("--swiftkv_cutoffs=0.1",),
        "SwiftKV cutoff fraction 0.1 gives k=0 of 2 layers"),
    Row("bench: GemFilter keeping 0 tokens", "flags", "bench", BENCH + ("--gemfilter_topk=0",),
        "flag --gemfilter_topk=['0']: must be comma-separated integers >= 1"),
    Row("bench: GemFilter layer outside the base", "flags", "bench", BENCH + ("--gemfilter_layer=5",),
        "GemFilter's selection layer 5 is not a layer of this 2-layer base"),
    Row("bench: unknown SpecPrefill draft", "flags", "bench", BENCH + ("--specprefill_draft=nope",),
        "specprefill draft pairing 'nope' not among ['lp0.5']; name one"),
    Row("bench: SpecPrefill without a draft", "flags", "bench",
        tuple(a for a in BENCH if not a.startswith("--lp_fractions")) + ("--lp_fractions=", "--specprefill_keep=0.3"),
        "--specprefill_keep needs a draft model"),
    Row("quickstart: unknown preset", "flags", "quickstart", ("--workdir={out}", "--preset=nope"),
        "flag --preset=nope: value should be one of"),
    Row("demo: temperature 0", "flags", "demo", ("--sample", "--temperature=0"),
        "flag --temperature=0.0: must be a finite number > 0"),
    Row("plan: mesh of an unknown axis", "flags", "plan", TRAIN_KVP + ("--mesh=fsdp:2,tensor:2",),
        "flag --mesh=fsdp:2,tensor:2: each entry is AXIS:SIZE"),
    # --- paths
    Row("workdir is a file", "paths", "train", TRAIN_KVP + ("--workdir={bad}/a_file",), "is a file; pass a directory"),
    Row("read-only workdir", "paths", "train", TRAIN_KVP + ("--workdir={readonly}/run",), "cannot write to --workdir"),
    Row("kvp workdir passed as the base", "paths", "train", TRAIN_KVP + ("--base_checkpoint={kvp}",),
        "is a kvp workdir"),
    Row("swiftkv workdir passed as the base", "paths", "train", TRAIN_KVP + ("--base_checkpoint={swiftkv}",),
        "is a swiftkv workdir, not a model"),
    Row("kvp workdir passed as SwiftKV's base", "paths", "train", TRAIN_SKV + ("--base_checkpoint={kvp}",),
        "is a kvp workdir, not a model"),
    Row("eval: swiftkv@ a kvp workdir", "paths", "eval", EVAL + ("--method=swiftkv@{kvp}",),
        "no swiftkv_config.json in {kvp}; pass a workdir made by --stage=swiftkv"),
    Row("missing base checkpoint", "paths", "train", TRAIN_KVP + ("--base_checkpoint=/nonexistent/base",),
        "no checkpoint directory at /nonexistent/base"),
    Row("missing corpus", "paths", "train", TRAIN_KVP + ("--data=/nonexistent/docs.jsonl",),
        "/nonexistent/docs.jsonl: no such file or directory"),
    Row("eval output_dir is a file", "paths", "eval", EVAL + ("--output_dir={bad}/a_file",),
        "--output_dir {bad}/a_file is a file"),
    Row("bench output under a file (checked before the run)", "paths", "bench", BENCH + ("--output={bad}/a_file/b.json",),
        "--output's directory {bad}/a_file is a file"),
    Row("kvp workdir reused for pretraining", "paths", None,
        lambda f: _unchanged(f.kvp, lambda: _pretrain(f, f.kvp)), "is a kvp workdir (it holds kvp_config.json)"),
    Row("pretrain workdir reused for kvp", "paths", None,
        lambda f: _unchanged(f.base, lambda: _kvp_stage(f, f.base)), "is a pretrain workdir (it holds model_config.json)"),
    Row("kvp workdir reused for swiftkv", "paths", None,
        lambda f: _unchanged(f.kvp, lambda: _swiftkv_stage(f, f.kvp)), "is a kvp workdir (it holds kvp_config.json)"),
    Row("swiftkv workdir reused for kvp", "paths", None,
        lambda f: _unchanged(f.swiftkv, lambda: _kvp_stage(f, f.swiftkv)),
        "is a swiftkv workdir (it holds swiftkv_config.json)"),
    Row("HF directory without weights", "paths", None, lambda f: kvp_jax.load_pretrained(f.bad / "hf_noweights"),
        "no *.safetensors file"),
    Row(".bin-only directory", "paths", None, lambda f: kvp_jax.load_pretrained(f.bad / "hf_bin"),
        "pickled weights are never loaded"),
    Row("workdir without a finished checkpoint", "paths", None, lambda f: kvp_jax.load_model(f.bad / "base_nockpt"),
        "has no finished checkpoint yet"),
    # --- corrupt files
    Row("truncated safetensors", "corrupt", None, lambda f: kvp_jax.load_pretrained(f.bad / "hf_trunc"),
        "the file is missing or corrupt"),
    Row("tensor of the wrong shape", "corrupt", None, lambda f: kvp_jax.load_pretrained(f.bad / "hf_shape"),
        "tensor 'model.norm.weight' has shape (7,)"),
    Row("NaN weight", "corrupt", None, lambda f: kvp_jax.load_pretrained(f.bad / "hf_nan"),
        ("tensor 'model.layers.1.mlp.up_proj.weight'", "holds NaN values")),
    Row("Inf weight", "corrupt", None, lambda f: kvp_jax.load_pretrained(f.bad / "hf_inf"),
        ("tensor 'model.embed_tokens.weight'", "holds infinite values")),
    Row("truncated GGUF", "corrupt", None, lambda f: kvp_jax.load_pretrained(f.bad / "truncated.gguf"),
        ("truncated.gguf as GGUF", "the file is truncated")),
    Row("GGUF of an unsupported architecture", "corrupt", None, lambda f: kvp_jax.load_pretrained(f.bad / "gemma.gguf"),
        "unsupported GGUF architecture 'gemma2'"),
    Row("GGUF of an unsupported quant type", "corrupt", None, lambda f: kvp_jax.load_pretrained(f.bad / "q81.gguf"),
        "is stored as Q8_1, which gguf"),
    Row("GGUF with a NaN weight", "corrupt", None, lambda f: kvp_jax.load_pretrained(f.bad / "nan.gguf"),
        ("tensor 'output_norm.weight'", "holds NaN values")),
    Row("malformed config.json", "corrupt", None, lambda f: kvp_jax.load_pretrained(f.bad / "hf_badjson"),
        "config.json is malformed"),
    Row("unsupported architecture", "corrupt", None, lambda f: kvp_jax.load_pretrained(f.bad / "hf_arch"),
        "unsupported architecture ['GPT2LMHeadModel']"),
    Row("orbax checkpoint missing its params item", "corrupt", None, lambda f: kvp_jax.load_model(f.bad / "base_noparams"),
        "has no 'params' item: the checkpoint is incomplete or damaged"),
    Row("resume from a checkpoint missing its opt item", "corrupt", None,
        lambda f: _pretrain(f, _copy(f.bad / "base_noopt", f.fresh("noopt"))), "has no 'opt' item"),
    Row("malformed model_config.json", "corrupt", None, lambda f: kvp_jax.load_model(f.bad / "base_badcfg"),
        "model_config.json is not valid JSON"),
    Row("model_config.json disagrees with the checkpoint", "corrupt", None,
        lambda f: kvp_jax.load_model(f.bad / "base_wrongcfg"),
        "params/embed has shape [300, 32] there, shape [300, 48] here"),
    Row("checkpoint of a newer format", "corrupt", None, lambda f: kvp_jax.load_model(f.bad / "base_newer"),
        "was written by a newer kvp_jax"),
    # --- mismatches
    Row("aux of another vocabulary", "mismatch", None,
        lambda f: inference.build(*kvp_jax.load_model(f.base), aux_models.AuxSpec(kind="c", checkpoint=str(
            f.bad / "aux_vocab280"))), "vocab mismatch: base has 300 tokens, aux 280"),
    Row("aux with another tokenizer of the same size", "mismatch", None,
        lambda f: _nothing_at(f.fresh("othertok"), lambda wd: _kvp_stage(f, wd, aux=aux_models.AuxSpec(
            kind="c", checkpoint=str(f.bad / "aux_othertok")))), "tokenizer mismatch"),
    Row("predictor trained for another base", "mismatch", None,
        lambda f: load_kvp(f.kvp, base_params=kvp_jax.load_model(f.bad / "base_3layers")[1]),
        "the base params do not fit the base"),
    Row("swiftkv trained for another base", "mismatch", None,
        lambda f: swiftkv.load_swiftkv(f.swiftkv, base_params=kvp_jax.load_model(f.bad / "base_3layers")[1]),
        "the base params do not fit the base"),
    Row("resume swiftkv with other data settings", "mismatch", None,
        lambda f: _unchanged(f.swiftkv, lambda: _swiftkv_stage(f, f.swiftkv, seed=7)), "was written by a run with other settings (config.data.seed was 0, now 7)"),
    Row("layer map of the wrong length", "mismatch", None,
        lambda f: inference.build(*kvp_jax.load_model(f.base), layer_map=(0,)), "layer map has 1 entries"),
    Row("mesh the devices cannot form", "mismatch", "train", TRAIN_KVP + ("--mesh=data:4",),
        "mesh needs 4 devices; 1 are available"),
    Row("batch not divisible by the data axis", "mismatch", "train", TRAIN_KVP + ("--batch_size=3",),
        "batch size 3 is not divisible by the 2-way data axis",
        env=(("XLA_FLAGS", "--xla_force_host_platform_device_count=2"),)),
    Row("resume with another model config", "mismatch", None,
        lambda f: _unchanged(f.base, lambda: _pretrain(f, f.base, model={**TINY, "hidden_size": 48})),
        "holds checkpoints of another configuration (hidden_size was 32, now 48)"),
    Row("resume with other data settings", "mismatch", None,
        lambda f: _pretrain(f, _copy(f.base, f.fresh("otherdata")), seed=7),
        "was written by a run with other settings (config.data.seed was 0, now 7)"),
    # --- inputs at run time
    Row("empty prompt", "runtime", None, _generate(prompt_ids=[[]], max_new_tokens=4),
        "prompt 0 must be a non-empty sequence"),
    Row("a batch with one empty prompt", "runtime", None, _generate(prompt_ids=[[1, 2], []], max_new_tokens=4),
        "prompt 1 must be a non-empty sequence"),
    Row("prompt longer than the cache", "runtime", None, _generate(prompt_ids=[[1] * 40], max_new_tokens=4, max_len=16),
        "prompt of 40 tokens is longer than the cache (max_len=16)"),
    Row("prompt longer than the model's context", "runtime", None, _generate(prompt_ids=[[1] * 300], max_new_tokens=4),
        "exceeds the model's max_position_embeddings=256"),
    Row("token id out of range", "runtime", None, _generate(prompt_ids=[[1, 300]], max_new_tokens=4),
        "prompt 0 has token ids outside [0, vocab_size=300)"),
    Row("max_new_tokens <= 0", "runtime", None, _generate(prompt_ids=[[1, 2]], max_new_tokens=0),
        "max_new_tokens must be >= 1, got 0"),
    Row("temperature <= 0 with sampling", "runtime", None,
        _generate(prompt_ids=[[1, 2]], max_new_tokens=4, greedy=False, temperature=0.0, key=jax.random.key(0)),
        "temperature must be > 0"),
    Row("kvp_generate: token id out of range", "runtime", None, _kvp_generate(prompt_ids=[[1, 2, 300]], max_new_tokens=4),
        "prompt 0 has token ids outside [0, vocab_size=300)"),
    Row("kvp_generate: max_new_tokens <= 0", "runtime", None, _kvp_generate(prompt_ids=[[1, 2, 3]], max_new_tokens=-1),
        "max_new_tokens must be >= 1, got -1"),
    Row("kvp_generate: prompt longer than the cache", "runtime", None,
        _kvp_generate(prompt_ids=[[1] * 40], max_new_tokens=4, max_len=16),
        "prompt of 40 tokens is longer than the cache (max_len=16)"),
    Row("logits: token id out of range", "runtime", None,
        lambda f: kvp_jax.logits(*kvp_jax.load_model(f.base), jnp.array([[1, 300]])),
        "token ids must be in [0, vocab_size=300)"),
    Row("config with no kv heads", "runtime", None,
        lambda f: ModelConfig.from_dict({**TINY, "vocab_size": 10, "num_kv_heads": 0}), "num_kv_heads must be positive"),
]
CLI_ROWS = [r for r in ROWS if r.main]
API_ROWS = [r for r in ROWS if not r.main]
# Each cli row starts a Python that imports jax (seconds each): the default suite runs one or two per main and
# category, `-m slow` the rest (`-m ""` all). The api rows are in-process and all run by default.
FAST_CLI = {"unknown flag", "swiftkv: cutoff 1 (nothing to train)", "eval: SpecPrefill keep fraction 0",
            "bench: GemFilter layer outside the base", "quickstart: unknown preset", "demo: temperature 0",
            "kvp workdir passed as the base", "read-only workdir", "mesh the devices cannot form",
            "plan: mesh of an unknown axis"}


def test_the_matrix_has_at_least_30_rows_in_every_category():
  assert len(ROWS) >= 30 and len({r.id for r in ROWS}) == len(ROWS)
  assert {r.category for r in ROWS} == {"flags", "paths", "corrupt", "mismatch", "runtime"}
  assert FAST_CLI <= {r.id for r in CLI_ROWS} and {r.main for r in CLI_ROWS if r.id in FAST_CLI} == {
      r.main for r in CLI_ROWS}


def _run_cli(row: Row, f: Fx, readonly: Path) -> dict:
  out = f.fresh(row.id.replace(" ", "_").replace("/", "_"))
  subs = {"{base}": str(f.base), "{kvp}": str(f.kvp), "{swiftkv}": str(f.swiftkv), "{bad}": str(f.bad),
          "{corpus}": str(f.corpus),
          "{out}": str(out), "{readonly}": str(readonly)}
  args = []
  for a in row.given:
    for k, v in subs.items():
      a = a.replace(k, v)
    args.append(a)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", **dict(row.env)}
  r = subprocess.run([sys.executable, "-m", f"kvp_jax.{row.main}", *args], capture_output=True, text=True, env=env,
                     timeout=600, cwd=f.root)
  expect = []
  for e in _expected(row):
    for k, v in subs.items():
      e = e.replace(k, v)
    expect.append(e)
  return {"rc": r.returncode, "stderr": r.stderr, "out_left": out.exists(), "expect": expect}


def _expected(row: Row) -> tuple[str, ...]:
  return (row.expect,) if isinstance(row.expect, str) else row.expect


@pytest.fixture(scope="module")
def cli_results(fx, request):
  """The cli rows this session runs (after -m / -k selection), four at a time (each in its own directory:
  they share no output)."""
  chosen = {item.callspec.params["row"].id for item in request.session.items
            if getattr(item, "originalname", None) == "test_cli_row"}
  readonly = fx.root / "readonly"
  can = _unwritable(readonly)
  try:
    with concurrent.futures.ThreadPoolExecutor(4) as ex:
      futures = {r.id: ex.submit(_run_cli, r, fx, readonly) for r in CLI_ROWS
                 if r.id in chosen and (can or "readonly" not in " ".join(r.given))}
      results = {k: v.result() for k, v in futures.items()}
  finally:
    _writable_again(readonly)
  return results


@pytest.mark.parametrize("row", [pytest.param(r, id=r.id, marks=() if r.id in FAST_CLI else pytest.mark.slow)
                                 for r in CLI_ROWS])
def test_cli_row(row, cli_results):
  if row.id not in cli_results:
    pytest.skip("cannot make a directory unwritable here (root without chattr)")
  r = cli_results[row.id]
  lines = [l for l in r["stderr"].splitlines() if l.strip()]
  assert "Traceback" not in r["stderr"], r["stderr"][-3000:]
  assert r["rc"] == 2, (r["rc"], r["stderr"][-2000:])
  assert len(lines) == 1, r["stderr"][-2000:]
  assert lines[0].startswith("error: ") and all(e in lines[0] for e in r["expect"]), lines[0]
  assert not r["out_left"], "a failed command left its output directory behind"


@pytest.mark.parametrize("row", API_ROWS, ids=[r.id for r in API_ROWS])
def test_api_row(row, fx):
  with pytest.raises(ValueError) as e:
    row.given(fx)
  msg = str(e.value)
  assert "\n" not in msg.strip(), msg
  assert all(e in msg for e in _expected(row)), msg


# ---------------------------------------------------------------------------------------------- crash tests

CRASH_MODEL = json.dumps({"hidden_size": 16, "intermediate_size": 32, "num_layers": 1, "num_heads": 2,
                          "num_kv_heads": 1, "head_dim": 8})


def _train_flags(fx: Fx, workdir: Path, **over) -> list[str]:
  flags = {"stage": "pretrain", "model": CRASH_MODEL, "tokenizer": str(fx.base), "data": str(fx.corpus),
           "seq_len": 16, "batch_size": 2, "steps": 8, "log_every": 1, "save_every": 100, "warmup_steps": 2,
           "workdir": str(workdir), **over}
  return [f"--{k}={v}" for k, v in flags.items()]


def _start(args: list[str], hook: tuple | None = None) -> subprocess.Popen:
  cmd = [sys.executable, HOOKS, *hook, "kvp_jax.train"] if hook else [sys.executable, "-m", "kvp_jax.train"]
  return subprocess.Popen(cmd + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 600):
  t0 = time.time()
  while not path.exists():
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    assert time.time() - t0 < timeout, "the training subprocess never reached the pause"
    time.sleep(0.05)


def _metrics(workdir: Path) -> list[dict]:
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")} for r in rows]


def _params(workdir: Path) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree.leaves(checkpoints.load_model(workdir)[1])]


def _pretrain_small(f: Fx, workdir: Path, steps: int, save_every: int = 100, **optim):
  """In process, what _train_flags runs in a subprocess (the crash model, logging every step)."""
  return stages.pretrain(workdir=workdir, model=json.loads(CRASH_MODEL), init_checkpoint=None, lp_keep=None,
                         tokenizer=str(f.base), data=_data(f.corpus), steps=steps, z_loss=1e-4,
                         optim=dataclasses.replace(OPTIM, **optim), mesh=sharding.make_mesh(1, 1),
                         save_every=save_every, log_every=1)


def test_sigterm_in_process_checkpoints_the_step_and_the_resume_equals_the_straight_run(fx, tmp_path, monkeypatch):
  """The default suite's twin of the subprocess test below: the same handler and a real SIGTERM, sent to this
  process while it writes step 3's metrics row."""
  write = loop.MetricsWriter.write

  def write_then_signal(self, row):
    write(self, row)
    if row["step"] == 3:
      os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(loop.MetricsWriter, "write", write_then_signal)
  wd = tmp_path / "run"
  with pytest.raises(loop.Preempted, match="at step 4") as e:  # step 4 was dispatched when the signal came
    _pretrain_small(fx, wd, steps=6)
  assert str(wd / "checkpoints" / "4") in str(e.value)
  assert signal.getsignal(signal.SIGTERM) != loop._SIGTERM._handle  # the previous handler is back
  monkeypatch.setattr(loop.MetricsWriter, "write", write)
  _pretrain_small(fx, wd, steps=6)
  _pretrain_small(fx, tmp_path / "straight", steps=6)
  assert [r["step"] for r in _metrics(wd)] == list(range(1, 7))
  assert _metrics(wd) == _metrics(tmp_path / "straight")
  for a, b in zip(_params(wd), _params(tmp_path / "straight"), strict=True):
    np.testing.assert_array_equal(a, b)


def test_nan_loss_in_process_raises_diverged_naming_the_step_and_keeps_the_last_good_checkpoint(fx, tmp_path):
  wd = tmp_path / "run"
  # lr 1e30: the first update is finite but huge; the next step's loss or gradients overflow
  with pytest.raises(loop.Diverged) as e:
    _pretrain_small(fx, wd, steps=6, save_every=1, lr=1e30, warmup_steps=0)
  msg = str(e.value)
  assert "\n" not in msg and "at step 2;" in msg and "the last good checkpoint, step 1, is kept" in msg, msg
  assert sorted(p.name for p in (wd / "checkpoints").iterdir()) == ["1"]
  assert all(np.isfinite(x).all() for x in _params(wd))


@pytest.fixture(scope="module")
def straight_run(fx, tmp_path_factory):
  """The uninterrupted run the interrupted ones must equal, started in the background."""
  wd = tmp_path_factory.mktemp("straight") / "run"
  return wd, _start(_train_flags(fx, wd))


def _finished(run) -> Path:
  wd, proc = run
  _, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  return wd


@pytest.mark.slow
def test_sigterm_checkpoints_the_current_step_and_the_rerun_equals_the_straight_run(fx, straight_run, tmp_path):
  wd = tmp_path / "run"
  mark = tmp_path / "paused"
  proc = _start(_train_flags(fx, wd), hook=("pause_after_log", "3", str(mark)))
  _wait_for(mark, proc)
  proc.send_signal(signal.SIGTERM)  # what a preempted VM or SLURM job receives
  _, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  last = err.strip().splitlines()[-1]
  # the handler lets step 4 (already dispatched) finish, checkpoints it, and says where
  assert last == f"preempted: stopped by SIGTERM at step 4; checkpoint in {wd / 'checkpoints' / '4'}; rerun the " \
                 "same command to resume", last
  assert (wd / "checkpoints" / "4").is_dir()
  rerun = subprocess.run([sys.executable, "-m", "kvp_jax.train", *_train_flags(fx, wd)], capture_output=True,
                         text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=600)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "at step 4" in rerun.stderr and "resumed from" in rerun.stderr
  ref = _finished(straight_run)
  assert [r["step"] for r in _metrics(wd)] == list(range(1, 9))
  assert _metrics(wd) == _metrics(ref)
  for a, b in zip(_params(wd), _params(ref), strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_kill_9_inside_a_save_keeps_the_previous_checkpoint_and_resumes_exactly(fx, straight_run, tmp_path):
  wd = tmp_path / "run"
  mark = tmp_path / "paused"
  proc = _start(_train_flags(fx, wd, save_every=2), hook=("pause_in_finalize", "4", str(mark)))
  _wait_for(mark, proc)
  proc.kill()  # SIGKILL while checkpoint 4 is written but not yet renamed into place
  proc.communicate(timeout=60)
  names = sorted(p.name for p in (wd / "checkpoints").iterdir())
  assert any(n.startswith("4.orbax-checkpoint-tmp") for n in names), names
  assert "4" not in names and "2" in names, names
  ckpt = checkpoints.Checkpointer(wd, save_every=1)
  assert ckpt.latest_step() == 2
  ckpt.close()
  cfg, params = checkpoints.load_model(wd)  # the previous checkpoint loads, and is finite
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
  rerun = subprocess.run([sys.executable, "-m", "kvp_jax.train", *_train_flags(fx, wd, save_every=2)],
                         capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=600)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "at step 2" in rerun.stderr
  assert not any(".orbax-checkpoint-tmp" in p.name for p in (wd / "checkpoints").iterdir())  # cleaned on start
  ref = _finished(straight_run)
  assert _metrics(wd) == _metrics(ref)
  for a, b in zip(_params(wd), _params(ref), strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(fx, tmp_path):
  wd = tmp_path / "run"
  # lr 1e30: the first update is finite but huge; the next step's loss or gradients overflow
  r = subprocess.run([sys.executable, "-m", "kvp_jax.train",
                      *_train_flags(fx, wd, lr=1e30, warmup_steps=0, save_every=1, steps=6)],
                     capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=600)
  last = r.stderr.strip().splitlines()[-1]
  assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
  assert last.startswith("error: training diverged: ") and "at step 2;" in last, last
  assert f"the last good checkpoint, step 1, is kept in {wd / 'checkpoints'}" in last, last
  assert sorted(p.name for p in (wd / "checkpoints").iterdir()) == ["1"]
  assert all(np.isfinite(x).all() for x in _params(wd))
  rows = [json.loads(l) for l in (wd / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1] and np.isfinite(rows[0]["loss"])  # no NaN row was logged


def test_checkpoints_record_versions_and_config(fx):
  ckpt = checkpoints.Checkpointer(fx.kvp, save_every=1)
  meta = ckpt.step_metadata(ckpt.latest_step())
  ckpt.close()
  assert meta["format"] == checkpoints.FORMAT
  assert meta["versions"]["jax"] == jax.__version__ and meta["versions"]["orbax-checkpoint"]
  assert meta["config"]["stage"] == "kvp" and meta["config"]["kvp"]["base"]["hidden_size"] == TINY["hidden_size"]
  assert meta["config"]["data"]["seq_len"] == 16 and meta["info"]["optim"]["lr"] == OPTIM.lr
  ckpt = checkpoints.Checkpointer(fx.swiftkv, save_every=1)
  meta = ckpt.step_metadata(ckpt.latest_step())
  ckpt.close()
  assert meta["format"] == checkpoints.FORMAT and meta["versions"]["jax"] == jax.__version__
  assert meta["config"]["stage"] == "swiftkv" and meta["config"]["cutoff_layers"] == 1
  assert meta["config"]["base"]["hidden_size"] == TINY["hidden_size"] and meta["info"]["cutoff"] == 0.5


def test_the_mains_log_filter_drops_jax_backend_probe_info_but_not_warnings():
  """cli.run's filter on absl's handler: jax's INFO "Unable to initialize backend 'tpu'" (printed on CI's
  machine) would make a bad-input error two lines on stderr; its warnings, and our own lines, still pass."""
  import logging as pylogging

  from jax._src import xla_bridge

  from kvp_jax import cli

  def record(name, path, level):
    return pylogging.getLogger(name).makeRecord(name, level, path, 1, "Unable to initialize backend 'tpu'", (), None)

  probe = (xla_bridge.logger.name, xla_bridge.__file__)
  assert not cli._keep_record(record(*probe, pylogging.INFO))
  assert not cli._keep_record(record(*probe, pylogging.DEBUG))
  assert cli._keep_record(record(*probe, pylogging.WARNING))
  assert not cli._keep_record(record("absl", "/x/orbax/checkpoint/manager.py", pylogging.INFO))
  assert cli._keep_record(record("absl", loop.__file__, pylogging.INFO))


def test_metrics_survive_a_torn_last_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')  # killed mid-write
  loop.MetricsWriter(path, resume_step=2)
  assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [1, 2]


# Without fidelity rows is slow (the default suite resumes the run with fidelity, which carries more per row).
@pytest.mark.parametrize("fidelity", [pytest.param(False, marks=pytest.mark.slow), True])
def test_an_interrupted_evaluation_resumes_from_the_rows_it_wrote(fx, tmp_path, monkeypatch, fidelity):
  from kvp_jax.evaluation import runner
  from kvp_jax.evaluation.registry import MethodSpec
  from kvp_jax.evaluation.tasks import EvalConfig
  ec = EvalConfig(num_qa=2, qa_num_facts=(4, 5), num_code=2, code_context_chars=(64, 128), qa_max_new_tokens=2,
                  code_max_new_tokens=2, batch_size=2, buckets=(256,), kv_error_examples=2, fidelity=fidelity)
  specs = [MethodSpec.parse(s) for s in ("base", "random_prune;keep=0.5")]
  score = runner.score_method
  calls = []

  def crash_on_second(*a, **k):
    calls.append(1)
    if len(calls) == 2:
      raise KeyboardInterrupt  # the run dies while scoring the second method
    return score(*a, **k)

  monkeypatch.setattr(runner, "score_method", crash_on_second)
  with pytest.raises(KeyboardInterrupt):
    runner.evaluate(str(fx.base), specs, ec, tmp_path / "a", log=lambda s: None)
  monkeypatch.setattr(runner, "score_method", score)
  assert len((tmp_path / "a" / runner.SCORED).read_text().splitlines()) == 2  # the header and one row
  logs = []
  resumed = runner.evaluate(str(fx.base), specs, ec, tmp_path / "a", log=logs.append)
  assert any("resuming: 1 of 2 methods already scored" in l for l in logs), logs
  straight = runner.evaluate(str(fx.base), specs, ec, tmp_path / "b", log=lambda s: None)
  # with fidelity, the reused base row's first-token distributions were recomputed as the reference
  assert [r["metrics"] for r in resumed["results"]] == [r["metrics"] for r in straight["results"]]
  assert ("first_token_kl" in resumed["results"][1]["metrics"]) == fidelity
  # the rows are kept: a rerun that adds a method scores only that one
  calls.clear()
  monkeypatch.setattr(runner, "score_method", lambda *a, **k: calls.append(1) or score(*a, **k))
  logs.clear()
  added = runner.evaluate(str(fx.base), specs + [MethodSpec.parse("static_prune;keep=0.5")], ec, tmp_path / "a",
                          log=logs.append)
  assert any("resuming: 2 of 3 methods already scored" in l for l in logs), logs
  assert len(calls) == (2 if fidelity else 1)  # with fidelity the base's distributions are recomputed, not its row
  assert [r["metrics"] for r in added["results"][:2]] == [r["metrics"] for r in straight["results"]]
  monkeypatch.setattr(runner, "score_method", score)
  # rows of other settings are not reused
  (tmp_path / "a" / runner.SCORED).write_text(json.dumps({"fingerprint": {"eval": "other"}}) + "\n")
  logs.clear()
  runner.evaluate(str(fx.base), specs[:1], ec, tmp_path / "a", log=logs.append)
  assert any("starting over" in l for l in logs), logs


def test_an_evaluation_rescores_a_method_whose_checkpoint_changed(fx, tmp_path):
  """A row scored before its checkpoint was retrained is not reused."""
  from kvp_jax.evaluation import runner
  from kvp_jax.evaluation.registry import MethodSpec
  from kvp_jax.evaluation.tasks import EvalConfig
  ec = EvalConfig(num_qa=2, qa_num_facts=(4, 5), num_code=2, code_context_chars=(64, 128), qa_max_new_tokens=2,
                  code_max_new_tokens=2, batch_size=2, buckets=(256,), kv_error_examples=2, fidelity=False)
  aux = tmp_path / "aux"
  shutil.copytree(fx.base, aux)
  specs = [MethodSpec.parse("base"), MethodSpec.parse(f"specprefill:base@{aux};keep=0.5")]
  runner.evaluate(str(fx.base), specs, ec, tmp_path / "a", log=lambda s: None)
  logs = []
  runner.evaluate(str(fx.base), specs, ec, tmp_path / "a", log=logs.append)
  assert any("resuming: 2 of 2 methods" in l for l in logs), logs
  for f in aux.rglob("*"):  # "retrained": the checkpoint's files are rewritten
    if f.is_file():
      os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
  logs.clear()
  runner.evaluate(str(fx.base), specs, ec, tmp_path / "a", log=logs.append)
  assert any("resuming: 1 of 2 methods" in l for l in logs), logs


def test_an_interrupted_benchmark_resumes_from_the_groups_it_wrote(tmp_path, monkeypatch):
  from kvp_jax.benchmark import runner
  cfg = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                    head_dim=8)
  spec = runner.BenchSpec(base_cfg=cfg, base=P.init(cfg, jax.random.PRNGKey(0)), pairings=[], prompt_lens=[8, 16],
                          batch_sizes=[1], runs=1, warmup=0, tpot_steps=1, matmul_n=32, torch=False,
                          log=lambda s: None, partial=str(tmp_path / "b.json.partial.jsonl"))
  run_group = runner._run_group

  def crash_on_second(spec_, B, T, *a):
    if T == 16:
      raise KeyboardInterrupt
    return run_group(spec_, B, T, *a)

  monkeypatch.setattr(runner, "_run_group", crash_on_second)
  with pytest.raises(KeyboardInterrupt):
    runner.run(spec)
  monkeypatch.setattr(runner, "_run_group", run_group)
  written = [json.loads(l) for l in Path(spec.partial).read_text().splitlines()]
  assert [w.get("group") for w in written] == [None, [1, 8]]
  logs = []
  out = runner.run(dataclasses.replace(spec, log=logs.append))
  assert any("resuming: 1 (B, T) groups already timed" in l for l in logs), logs
  assert [r for r in out["rows"] if r["prompt_len"] == 8] == written[1]["rows"]  # reused as written
  assert {r["prompt_len"] for r in out["rows"]} == {8, 16}
  logs.clear()
  runner.run(dataclasses.replace(spec, runs=2, log=logs.append))  # another spec: nothing reused
  assert any("starting over" in l for l in logs), logs
