"""The training stages as library functions with plain arguments (flags live in kvp_jax/train.py).

- `pretrain`: language-model training of any decoder (a small base, a KVP-C aux, or a layer-pruned copy of a
  checkpoint fine-tuned alone, the paper's baseline).
- `kvp`: KV Prediction against a frozen base: the aux model and the predictor train, the base never does.
- `swiftkv`: SwiftKV's self-distillation from a frozen base: only its new norm and q/k/v projections train.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging

from kvp_jax.baselines import swiftkv as swiftkv_lib
from kvp_jax.data import pipeline
from kvp_jax.data import tokenizer as tok_lib
from kvp_jax.kvp import aux_models, inference, losses, predictor
from kvp_jax.models import checkpoints
from kvp_jax.models import params as P
from kvp_jax.models.config import ModelConfig
from kvp_jax.models.lm_loss import lm_loss
from kvp_jax.training import distributed, loop, sharding
from kvp_jax.training import step as step_lib

EMBEDDED = "embedded"


@dataclasses.dataclass(frozen=True)
class DataConfig:
  source: str = EMBEDDED  # "embedded" (stdlib code + synthetic QA), a path, "glob:..." or "hf:name[:cfg][:split]"
  num_qa_docs: int = 2000
  qa_num_facts: tuple[int, int] = (16, 136)  # facts per synthetic QA document: ~15 tokens each
  max_code_files: int | None = None  # cap on stdlib files, to tilt the embedded mix towards QA
  qa_questions_per_doc: int = 1  # more questions per QA document = denser retrieval signal
  qa_distractors: str = "shared"  # difficulty of the synthetic QA: "shared" (hard) or "distinct" (easy)
  qa_answer_style: str = "bare"  # "bare" value or a restating "sentence" (see data/qa_synthetic.py)
  qa_recap: bool = False  # restate the facts before the questions: a dense copying signal
  qa_context_loss: bool = True  # False: a QA document's loss starts at its recap/questions (qa_synthetic.loss_start)
  seq_len: int = 256
  batch_size: int = 8
  seed: int = 0
  packing: str = "documents"  # "documents": no document split unless longer than a window; or "concat"
  data_shards: int = 0  # disjoint document streams feeding batch_size / data_shards rows each; 0: one per process


def texts_for(dc: DataConfig) -> list[str]:
  if dc.source == EMBEDDED:
    return pipeline.mixed_pretraining_texts(num_qa_docs=dc.num_qa_docs, seed=dc.seed,
                                            max_code_files=dc.max_code_files, num_facts_range=dc.qa_num_facts,
                                            questions_per_doc=dc.qa_questions_per_doc,
                                            distractors=dc.qa_distractors, answer_style=dc.qa_answer_style,
                                            recap=dc.qa_recap)
  return pipeline.load_texts(dc.source)


def get_tokenizer(spec: str, workdir: Path, texts: list[str] | None):
  """`train:VOCAB` trains one into workdir/tokenizer (reused on resume); anything else is loaded."""
  if spec.startswith("train:"):
    out = workdir / "tokenizer"
    if not (out / "tokenizer.json").exists() and distributed.is_main():
      logging.info("training a %s-token BPE tokenizer on %d documents", spec[6:], len(texts))
      tok = tok_lib.train_tokenizer(texts, int(spec[6:]), out)
      if jax.process_count() == 1:
        return tok
    distributed.barrier("tokenizer")  # the other processes load what process 0 trained
    return tok_lib.load_tokenizer(out)
  tok = tok_lib.load_tokenizer(checkpoints.tokenizer_dir(spec))
  if workdir is not None and not (workdir / "tokenizer" / "tokenizer.json").exists() and distributed.is_main():
    tok.save_pretrained(str(workdir / "tokenizer"))  # every workdir carries the tokenizer it was trained with
  return tok


def _check_vocab(cfg: ModelConfig, tok, what: str):
  if len(tok) > cfg.vocab_size:
    raise ValueError(f"{what} has vocab_size={cfg.vocab_size} but the tokenizer has {len(tok)} tokens; "
                     "use the model's own tokenizer or a larger vocab_size")


def data_shards_of_process(dc: DataConfig, mesh) -> tuple[list[int], int]:
  """(this process's data shards, their count). The batch is data_shards streams of batch_size / data_shards
  rows, in shard order, whatever the process count: one process reading both shards of a 2-shard run sees the
  same batches as two processes reading one each."""
  block, blocks = sharding.process_rows(mesh, dc.batch_size)
  shards = dc.data_shards or blocks
  if shards % blocks or dc.batch_size % shards:
    raise ValueError(f"--data_shards={shards} must be a multiple of the {blocks} process row blocks and divide "
                     f"--batch_size={dc.batch_size}")
  per = shards // blocks
  return list(range(block * per, (block + 1) * per)), shards


def _data_iter(dc: DataConfig, texts, tok, mesh=None):
  loss_start = None
  if not dc.qa_context_loss:
    from kvp_jax.data import qa_synthetic
    if not any(qa_synthetic.loss_start(t) is not None for t in texts):
      raise ValueError("qa_context_loss=False, but no document is a synthetic QA document; it applies to "
                       "--data=embedded only")
    loss_start = qa_synthetic.loss_start
  mine, shards = data_shards_of_process(dc, mesh) if mesh is not None else ([0], 1)
  return pipeline.concat_rows([
      pipeline.make_lm_iterator(texts, tok, dc.seq_len, dc.batch_size // shards, dc.seed, packing=dc.packing,
                                loss_start=loss_start, shard=(i, shards)) for i in mine])


def pretrain(*, workdir, model: dict | None, init_checkpoint: str | None, lp_keep: tuple[int, ...] | None,
             tokenizer: str, data: DataConfig, steps: int, optim: loop.OptimConfig, z_loss: float,
             mesh, save_every: int, log_every: int, seed: int = 0, fail_at_step: int | None = None,
             compute: step_lib.ComputeConfig = step_lib.ComputeConfig()):
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  texts = texts_for(data)
  tok = get_tokenizer(tokenizer, workdir, texts)
  if init_checkpoint:
    cfg, init_params = checkpoints.load_model(init_checkpoint)
    if lp_keep is not None:
      cfg, init_params = aux_models.prune_layers(cfg, init_params, lp_keep)
    if model:
      raise ValueError("pass either --model (a fresh config) or --init_checkpoint, not both")
    make = lambda: init_params
  else:
    if not model:
      raise ValueError("--stage=pretrain needs --model (a JSON ModelConfig) or --init_checkpoint")
    cfg = ModelConfig.from_dict({"vocab_size": len(tok), **model})
    make = lambda: jax.jit(P.init, static_argnums=(0, 2))(cfg, jax.random.PRNGKey(seed))  # eager init is slow
  _check_vocab(cfg, tok, "the model")
  if distributed.is_main():
    checkpoints.write_json(workdir / checkpoints.MODEL_CONFIG, cfg.to_dict())
  logging.info("pretraining a %.2fM-parameter %s model for %d steps", cfg.num_params() / 1e6, cfg.architecture,
               steps)
  loss_fn = lambda p, _, batch: lm_loss(cfg, p, batch, z_loss, remat=compute.remat)
  return loop.train(workdir=workdir, loss_fn=loss_fn, init_trainable=make, logical_axes=P.logical_axes(cfg),
                    data_iter=_data_iter(data, texts, tok, mesh), steps=steps, optim=optim, mesh=mesh,
                    tokens_per_step=data.seq_len * data.batch_size, save_every=save_every,
                    log_every=log_every, fail_at_step=fail_at_step, grad_accum=compute.grad_accum,
                    compute_dtype=step_lib.DTYPES[compute.compute_dtype])


def kvp(*, workdir, base_checkpoint: str, aux: aux_models.AuxSpec, predictor_kind: str, predictor_init: str,
        layer_map: tuple[int, ...] | None, loss: losses.KVPLossConfig, freeze_aux: bool, data: DataConfig,
        steps: int, optim: loop.OptimConfig, mesh, save_every: int, log_every: int, seed: int = 0,
        fail_at_step: int | None = None, compute: step_lib.ComputeConfig = step_lib.ComputeConfig()):
  workdir = Path(workdir)
  if not base_checkpoint:
    raise ValueError("--stage=kvp needs --base_checkpoint (a pretrain workdir or a Hugging Face directory)")
  frozen_dtype = step_lib.DTYPES[compute.frozen_dtype]
  # The frozen base is read straight into its shards (it is what does not fit one device).
  base_shardings = lambda c: sharding.param_shardings(P.abstract(c), P.logical_axes(c), mesh)
  base_cfg, base = checkpoints.load_model(base_checkpoint, frozen_dtype, shardings_for=base_shardings)
  kcfg, kp0 = inference.build(base_cfg, base, aux, kind=predictor_kind, init=predictor_init, layer_map=layer_map,
                              seed=seed)
  # The trained parts keep float32 master weights (a KVP-LP aux copies the base as stored: exact from bfloat16).
  aux_cfg, aux_params, pred0 = kcfg.aux, P.cast(kp0.aux, jnp.float32), P.cast(kp0.pred, jnp.float32)
  if aux.kind == "c" and aux.checkpoint:
    try:
      aux_models.check_compatible(base_cfg, aux_cfg, tok_lib.load_tokenizer(checkpoints.tokenizer_dir(base_checkpoint)),
                                  tok_lib.load_tokenizer(checkpoints.tokenizer_dir(aux.checkpoint)))
    except ValueError as e:
      if "mismatch" in str(e):
        raise
      logging.warning("could not compare tokenizers (%s); vocab sizes match", e)
  workdir.mkdir(parents=True, exist_ok=True)
  texts = texts_for(data)
  tok = get_tokenizer(str(base_checkpoint), workdir, texts)
  _check_vocab(base_cfg, tok, "the base")
  if distributed.is_main():
    checkpoints.write_json(workdir / checkpoints.KVP_CONFIG, {
        "kvp": kcfg.to_dict(), "base_checkpoint": str(Path(base_checkpoint).absolute()) if Path(
            base_checkpoint).exists() else base_checkpoint,
        "loss": dataclasses.asdict(loss), "aux": dataclasses.asdict(aux), "freeze_aux": freeze_aux})
  # Frozen params go to the step as an argument, sharded like trained ones; no grads, no optimizer state.
  frozen = {"base": base, **({"aux": P.cast(aux_params, frozen_dtype)} if freeze_aux else {})}
  frozen_axes = {"base": P.logical_axes(base_cfg), **({"aux": P.logical_axes(aux_cfg)} if freeze_aux else {})}
  loss_fn = lambda t, f, batch: losses.kvp_loss(kcfg, loss, t, {k: v for k, v in f.items() if k != "base"},
                                                f["base"], batch, remat=compute.remat)
  init_trainable = (lambda: {"pred": pred0}) if freeze_aux else (lambda: {"aux": aux_params, "pred": pred0})
  pred_axes = predictor.logical_axes(kcfg)
  axes = {"pred": pred_axes} if freeze_aux else {"aux": P.logical_axes(aux_cfg), "pred": pred_axes}
  logging.info("KV Prediction: base %.2fM params (%d layers) <- aux %.2fM (%d layers), predictor %s, map %s",
               base_cfg.num_params() / 1e6, base_cfg.num_layers, aux_cfg.num_params() / 1e6, aux_cfg.num_layers,
               predictor_kind, kcfg.layer_map)
  to_saved = (lambda t, f: {"aux": f["aux"], **t}) if freeze_aux else None
  trainable, rows = loop.train(
      workdir=workdir, loss_fn=loss_fn, init_trainable=init_trainable, logical_axes=axes,
      data_iter=_data_iter(data, texts, tok, mesh), steps=steps, optim=optim, mesh=mesh,
      tokens_per_step=data.seq_len * data.batch_size, save_every=save_every, log_every=log_every,
      fail_at_step=fail_at_step, params_for_checkpoint=to_saved, frozen=frozen, frozen_axes=frozen_axes,
      grad_accum=compute.grad_accum, compute_dtype=step_lib.DTYPES[compute.compute_dtype])
  return trainable, rows


def swiftkv(*, workdir, base_checkpoint: str, cutoff: float, loss: swiftkv_lib.SwiftKVLossConfig, data: DataConfig,
            steps: int, optim: loop.OptimConfig, mesh, save_every: int, log_every: int, seed: int = 0,
            fail_at_step: int | None = None, compute: step_lib.ComputeConfig = step_lib.ComputeConfig()):
  """SwiftKV's self-distillation (baselines/swiftkv.py): the new norm and q/k/v projections of layers >= k train,
  initialised from the base's own; the base is the frozen teacher. `seed` only orders the data. Runs on the same
  sharded step as `kvp`: the base is read into its shards and passed as a frozen argument."""
  workdir = Path(workdir)
  if not base_checkpoint:
    raise ValueError("--stage=swiftkv needs --base_checkpoint (a pretrain workdir or a Hugging Face directory)")
  frozen_dtype = step_lib.DTYPES[compute.frozen_dtype]
  base_shardings = lambda c: sharding.param_shardings(P.abstract(c), P.logical_axes(c), mesh)
  base_cfg, base = checkpoints.load_model(base_checkpoint, frozen_dtype, shardings_for=base_shardings)
  k = swiftkv_lib.cutoff_layers(base_cfg.num_layers, cutoff)
  if k == base_cfg.num_layers:
    raise ValueError(f"--swiftkv_cutoff={cutoff} keeps all {k} layers for every prompt token: SwiftKV would have "
                     "nothing to train; use a cutoff below 1 (theirs: 0.5 for Llama-3.1, 0.75 for Qwen2.5)")
  workdir.mkdir(parents=True, exist_ok=True)
  texts = texts_for(data)
  tok = get_tokenizer(str(base_checkpoint), workdir, texts)
  _check_vocab(base_cfg, tok, "the base")
  if distributed.is_main():
    checkpoints.write_json(workdir / checkpoints.SWIFTKV_CONFIG, {
        "base": base_cfg.to_dict(), "base_checkpoint": str(Path(base_checkpoint).absolute()) if Path(
            base_checkpoint).exists() else base_checkpoint,
        "cutoff": cutoff, "cutoff_layers": k, "loss": dataclasses.asdict(loss)})
  # Copies of the base's weights (training never aliases the base), kept as float32 master weights.
  skv0 = P.cast(swiftkv_lib.init_from_base(base_cfg, base, k), jnp.float32)
  loss_fn = lambda t, f, batch: swiftkv_lib.swiftkv_loss(base_cfg, loss, t, f["base"], batch, remat=compute.remat)
  logging.info("SwiftKV: %d of %d layers run every prompt token; %.2fM new parameters train", k,
               base_cfg.num_layers, P.count(skv0) / 1e6)
  return loop.train(workdir=workdir, loss_fn=loss_fn, init_trainable=lambda: skv0,
                    logical_axes=swiftkv_lib.logical_axes(skv0), data_iter=_data_iter(data, texts, tok, mesh),
                    steps=steps, optim=optim, mesh=mesh, tokens_per_step=data.seq_len * data.batch_size,
                    save_every=save_every, log_every=log_every, fail_at_step=fail_at_step,
                    frozen={"base": base}, frozen_axes={"base": P.logical_axes(base_cfg)},
                    grad_accum=compute.grad_accum, compute_dtype=step_lib.DTYPES[compute.compute_dtype])
