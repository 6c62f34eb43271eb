"""The training stages as library functions with plain arguments (flags live in kvp_jax/train.py).

- `pretrain`: language-model training of any decoder (a small base, a KVP-C aux, or a layer-pruned copy of a
  checkpoint fine-tuned alone, the paper's baseline).
- `kvp`: KV Prediction against a frozen base: the aux model and the predictor train, the base never does.
- `swiftkv`: SwiftKV's self-distillation from a frozen base: only its new norm and q/k/v projections train.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from pathlib import Path

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
  qa_format: str = "plain"  # "plain" documents, or "chat": conversations in the tokenizer's chat template
  add_bos: bool = True  # False for a model whose BOS is a chat-turn token (SmolLM2's <|im_start|>)
  data_shards: int = 0  # disjoint document streams feeding batch_size / data_shards rows each; 0: one per process


QA_FORMATS = ("plain", "chat")


def texts_for(dc: DataConfig, tok=None) -> list[str]:
  """The training documents; qa_format="chat" renders the synthetic QA with `tok`'s chat template."""
  if dc.qa_format not in QA_FORMATS:
    raise ValueError(f"qa_format must be one of {QA_FORMATS}, got {dc.qa_format!r}")
  if dc.qa_distractors == "mixed" and dc.qa_format != "chat":
    raise ValueError("--qa_distractors=mixed alternates the levels of chat-format documents; pass "
                     "--qa_format=chat, or shared / distinct")
  if dc.source != EMBEDDED:
    return pipeline.load_texts(dc.source)
  if dc.qa_format == "plain":
    return pipeline.mixed_pretraining_texts(num_qa_docs=dc.num_qa_docs, seed=dc.seed,
                                            max_code_files=dc.max_code_files, num_facts_range=dc.qa_num_facts,
                                            questions_per_doc=dc.qa_questions_per_doc,
                                            distractors=dc.qa_distractors, answer_style=dc.qa_answer_style,
                                            recap=dc.qa_recap)
  if tok is None or not getattr(tok, "chat_template", None):
    raise ValueError("qa_format='chat' needs a tokenizer with a chat template (an instruction-tuned base's)")
  from kvp_jax.data import code_corpus, qa_synthetic
  convs = qa_synthetic.chat_conversations(dc.num_qa_docs, dc.seed, dc.qa_num_facts,
                                          questions_per_doc=dc.qa_questions_per_doc, distractors=dc.qa_distractors)
  texts = code_corpus.code_documents("train", dc.max_code_files)
  texts += [tok.apply_chat_template(c, tokenize=False) for c in convs]
  random.Random(dc.seed).shuffle(texts)
  return texts


def _train_vocab(spec: str) -> int | None:
  """VOCAB of a `train:VOCAB` tokenizer spec (None for a tokenizer to load), checked before any work."""
  if not spec.startswith("train:"):
    return None
  if not spec[6:].isdigit():
    raise ValueError(f"--tokenizer=train:VOCAB needs an integer VOCAB, got {spec!r}")
  return int(spec[6:])


def get_tokenizer(spec: str, workdir: Path | None, texts: list[str] | None):
  """`train:VOCAB` trains one into workdir/tokenizer (reused on resume); anything else is loaded (and copied
  into workdir/tokenizer when a workdir is given)."""
  vocab = _train_vocab(spec)
  if vocab is not None:
    out = workdir / "tokenizer"
    if not (out / "tokenizer.json").exists() and distributed.is_main():
      logging.info("training a %d-token BPE tokenizer on %d documents", vocab, len(texts))
      tok = tok_lib.train_tokenizer(texts, vocab, out)
      if jax.process_count() == 1:
        return tok
    distributed.barrier("tokenizer")  # the other processes load what process 0 trained
    return tok_lib.load_tokenizer(out)
  tok = tok_lib.load_tokenizer(checkpoints.tokenizer_dir(spec))
  if workdir is not None:
    _keep_tokenizer(tok, workdir)
  return tok


def _keep_tokenizer(tok, workdir: Path):
  if not (workdir / "tokenizer" / "tokenizer.json").exists() and distributed.is_main():
    tok.save_pretrained(str(workdir / "tokenizer"))  # every workdir carries the tokenizer it was trained with


def _check_run(data: DataConfig, mesh, steps: int, save_every: int, log_every: int):
  """What can be checked before reading any data or writing anything."""
  loop.check_counts(steps, save_every, log_every)
  if data.seq_len < 1 or data.batch_size < 1:
    raise ValueError(f"seq_len and batch_size must be positive, got {data.seq_len}, {data.batch_size}")
  n = mesh.shape["data"]
  if data.batch_size % n:
    raise ValueError(f"batch size {data.batch_size} is not divisible by the {n}-way data axis; change "
                     "--batch_size or --mesh_data")


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
    loss_start = qa_synthetic.any_loss_start if dc.qa_format == "chat" else qa_synthetic.loss_start
    if not any(loss_start(t) is not None for t in texts):
      raise ValueError("qa_context_loss=False, but no document is a synthetic QA document; it applies to "
                       "--data=embedded only")
  mine, shards = data_shards_of_process(dc, mesh) if mesh is not None else ([0], 1)
  return pipeline.concat_rows([
      pipeline.make_lm_iterator(texts, tok, dc.seq_len, dc.batch_size // shards, dc.seed, packing=dc.packing,
                                loss_start=loss_start, add_bos=dc.add_bos, shard=(i, shards)) for i in mine])


def pretrain(*, workdir, model: dict | None, init_checkpoint: str | None, lp_keep: tuple[int, ...] | None,
             tokenizer: str, data: DataConfig, steps: int, optim: loop.OptimConfig, z_loss: float,
             mesh, save_every: int, log_every: int, seed: int = 0, fail_at_step: int | None = None,
             compute: step_lib.ComputeConfig = step_lib.ComputeConfig()):
  # Everything that can be wrong with the input is checked before the workdir is written to.
  workdir = Path(workdir)
  _check_run(data, mesh, steps, save_every, log_every)
  checkpoints.check_workdir(workdir, checkpoints.MODEL_CONFIG)
  if model and init_checkpoint:
    raise ValueError("pass either --model (a fresh config) or --init_checkpoint, not both")
  if not model and not init_checkpoint:
    raise ValueError("--stage=pretrain needs --model (a JSON ModelConfig) or --init_checkpoint")
  if model:
    ModelConfig.from_dict({"vocab_size": 1, **model})  # its keys and values, before the tokenizer is trained
  vocab = _train_vocab(tokenizer)
  texts = texts_for(data) if data.qa_format == "plain" else None  # a chat corpus needs the tokenizer first
  if init_checkpoint:
    cfg, init_params = checkpoints.load_model(init_checkpoint)
    if lp_keep is not None:
      cfg, init_params = aux_models.prune_layers(cfg, init_params, lp_keep)
    make = lambda: init_params
  tok = get_tokenizer(tokenizer, workdir, texts) if vocab is not None else get_tokenizer(tokenizer, None, texts)
  texts = texts if texts is not None else texts_for(data, tok)
  if not init_checkpoint:
    cfg = ModelConfig.from_dict({"vocab_size": len(tok), **model})
    make = lambda: jax.jit(P.init, static_argnums=(0, 2))(cfg, jax.random.PRNGKey(seed))  # eager init is slow
  _check_vocab(cfg, tok, "the model")
  data_iter = _data_iter(data, texts, tok, mesh)
  checkpoints.check_workdir(workdir, checkpoints.MODEL_CONFIG, cfg.to_dict())
  workdir.mkdir(parents=True, exist_ok=True)
  _keep_tokenizer(tok, workdir)
  if distributed.is_main():
    checkpoints.write_json(workdir / checkpoints.MODEL_CONFIG, cfg.to_dict())
  logging.info("pretraining a %.2fM-parameter %s model for %d steps", cfg.num_params() / 1e6, cfg.architecture,
               steps)
  loss_fn = lambda p, _, batch: lm_loss(cfg, p, batch, z_loss, remat=compute.remat)
  return loop.train(workdir=workdir, loss_fn=loss_fn, init_trainable=make, logical_axes=P.logical_axes(cfg),
                    data_iter=data_iter, steps=steps, optim=optim, mesh=mesh,
                    tokens_per_step=data.seq_len * data.batch_size, save_every=save_every,
                    log_every=log_every, fail_at_step=fail_at_step, grad_accum=compute.grad_accum,
                    compute_dtype=step_lib.DTYPES[compute.compute_dtype],
                    run_config={"stage": "pretrain", "model": cfg.to_dict(), "data": dataclasses.asdict(data)},
                    run_info={"steps": steps, "optim": dataclasses.asdict(optim), "z_loss": z_loss,
                              "init_checkpoint": None if init_checkpoint is None else str(init_checkpoint),
                              "lp_keep": lp_keep, "compute": dataclasses.asdict(compute)})


PREDICTOR_INITS = predictor.INITS + ("lstsq",)


def kvp(*, workdir, base_checkpoint: str, aux: aux_models.AuxSpec, predictor_kind: str, predictor_init: str,
        layer_map: tuple[int, ...] | None, loss: losses.KVPLossConfig, freeze_aux: bool, data: DataConfig,
        steps: int, optim: loop.OptimConfig, mesh, save_every: int, log_every: int, seed: int = 0,
        fail_at_step: int | None = None, lstsq_tokens: int = 4096, lstsq_ridge: float = 1e-3,
        init_from: str | None = None, compute: step_lib.ComputeConfig = step_lib.ComputeConfig()):
  """KV Prediction against a frozen base. The predictor starts as `predictor_init`: identity / random, or
  "lstsq", ridge least squares on the first `lstsq_tokens` tokens of a pass over the training data
  (kvp_jax/kvp/lstsq.py; its fit is written to lstsq.json). init_from: a kvp workdir whose aux and predictor
  to start from instead (the same aux and predictor shapes); steps=0 saves the starting point as step 0."""
  workdir = Path(workdir)
  if not base_checkpoint:
    raise ValueError("--stage=kvp needs --base_checkpoint (a pretrain workdir or a Hugging Face directory)")
  if predictor_init not in PREDICTOR_INITS:
    raise ValueError(f"unknown predictor init {predictor_init!r}; choose one of {PREDICTOR_INITS}")
  if freeze_aux and aux.kind == "c" and not aux.checkpoint:
    raise ValueError("--freeze_aux would freeze a randomly initialised aux (--aux_model); pass --aux_checkpoint "
                     "or drop --freeze_aux")
  _check_run(data, mesh, steps, save_every, log_every)
  checkpoints.check_workdir(workdir, checkpoints.KVP_CONFIG)
  frozen_dtype = step_lib.DTYPES[compute.frozen_dtype]
  # The frozen base is read straight into its shards (it is what does not fit one device).
  base_shardings = lambda c: sharding.param_shardings(P.abstract(c), P.logical_axes(c), mesh)
  base_cfg, base = checkpoints.load_model(base_checkpoint, frozen_dtype, shardings_for=base_shardings)
  tokenizers = _tokenizers(base_checkpoint, aux)
  kcfg, kp0 = inference.build(base_cfg, base, aux, kind=predictor_kind,
                              init="identity" if predictor_init == "lstsq" else predictor_init, layer_map=layer_map,
                              seed=seed, tokenizers=tokenizers)
  if init_from:
    from kvp_jax.kvp import checkpoints as kvp_checkpoints
    kcfg_from, _, kp0 = kvp_checkpoints.load_kvp(init_from, base_params=base)
    if kcfg_from != kcfg:
      raise ValueError(f"--init_from={init_from} holds another aux/predictor ({kcfg_from.aux.num_layers} aux layers, "
                       f"kind {kcfg_from.kind}) than this run ({kcfg.aux.num_layers}, {kcfg.kind})")
  # The trained parts keep float32 master weights (a KVP-LP aux copies the base as stored: exact from bfloat16).
  aux_cfg, aux_params, pred0 = kcfg.aux, P.cast(kp0.aux, jnp.float32), P.cast(kp0.pred, jnp.float32)
  # The base's own tokenizer (a chat corpus needs it first), read once: _tokenizers may have read it already.
  tok = tokenizers[0] if tokenizers[0] is not None else get_tokenizer(str(base_checkpoint), None, None)
  texts = texts_for(data, tok)
  _check_vocab(base_cfg, tok, "the base")
  data_iter = _data_iter(data, texts, tok, mesh)
  meta = {"kvp": kcfg.to_dict(), "base_checkpoint": str(Path(base_checkpoint).absolute()) if Path(
              base_checkpoint).exists() else base_checkpoint,
          "loss": dataclasses.asdict(loss), "aux": dataclasses.asdict(aux), "freeze_aux": freeze_aux,
          "predictor_init": predictor_init, "init_from": init_from}
  checkpoints.check_workdir(workdir, checkpoints.KVP_CONFIG, meta, compare=("kvp", "freeze_aux"))
  workdir.mkdir(parents=True, exist_ok=True)
  _keep_tokenizer(tok, workdir)
  if distributed.is_main():
    checkpoints.write_json(workdir / checkpoints.KVP_CONFIG, meta)
  ck = checkpoints.Checkpointer(workdir, save_every=1)
  resuming = ck.latest_step() is not None  # the fit is in the checkpoint already
  ck.close()
  if predictor_init == "lstsq" and not init_from and not resuming:
    pred0 = P.cast(fit_lstsq(kcfg, base, aux_params, data, texts, tok, lstsq_tokens, lstsq_ridge, workdir),
                   jnp.float32)
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
      data_iter=data_iter, steps=steps, optim=optim, mesh=mesh,
      tokens_per_step=data.seq_len * data.batch_size, save_every=save_every, log_every=log_every,
      fail_at_step=fail_at_step, params_for_checkpoint=to_saved, frozen=frozen, frozen_axes=frozen_axes,
      grad_accum=compute.grad_accum, compute_dtype=step_lib.DTYPES[compute.compute_dtype],
      run_config={"stage": "kvp", "kvp": kcfg.to_dict(), "freeze_aux": freeze_aux, "data": dataclasses.asdict(data)},
      run_info={"steps": steps, "optim": dataclasses.asdict(optim), "loss": dataclasses.asdict(loss),
                "base_checkpoint": meta["base_checkpoint"], "compute": dataclasses.asdict(compute)})
  return trainable, rows


def _tokenizers(base_checkpoint: str, aux: aux_models.AuxSpec):
  """(base's, aux's) tokenizer of a KVP-C aux read from a checkpoint, for aux_models.check_compatible; (None,
  None) for another aux or when either cannot be read (then the two embedding tables must have one length)."""
  if aux.kind != "c" or not aux.checkpoint:
    return None, None
  try:
    return (tok_lib.load_tokenizer(checkpoints.tokenizer_dir(base_checkpoint)),
            tok_lib.load_tokenizer(checkpoints.tokenizer_dir(aux.checkpoint)))
  except (OSError, ValueError) as e:
    logging.warning("could not read both tokenizers (%s): base and aux vocab sizes must then match", e)
    return None, None


def fit_lstsq(kcfg, base, aux_params, data: DataConfig, texts, tok, num_tokens: int, ridge: float, workdir: Path):
  """The least-squares predictor on the first `num_tokens` tokens of the training texts, packed end to end
  (every token a fitting token; a seed of its own, so the fit does not just replay the first training batches)."""
  from kvp_jax.kvp import lstsq
  per_batch = data.seq_len * data.batch_size
  it = pipeline.make_lm_iterator(texts, tok, data.seq_len, data.batch_size, data.seed + 7919, packing="concat",
                                 add_bos=data.add_bos)
  batches = itertools.islice(it, -(-num_tokens // per_batch))
  pred, summary = lstsq.fit(kcfg, base, aux_params, batches, num_tokens=num_tokens, ridge=ridge,
                            log=lambda s: logging.info("%s", s))
  logging.info("lstsq fit on %d tokens in %.0fs: R^2 of K %.3f-%.3f, of V %.3f-%.3f over base layers",
               summary["tokens"], summary["seconds"], min(summary["r2_k"]), max(summary["r2_k"]),
               min(summary["r2_v"]), max(summary["r2_v"]))
  checkpoints.write_json(Path(workdir) / "lstsq.json", summary)
  return pred


def swiftkv(*, workdir, base_checkpoint: str, cutoff: float, loss: swiftkv_lib.SwiftKVLossConfig, data: DataConfig,
            steps: int, optim: loop.OptimConfig, mesh, save_every: int, log_every: int, seed: int = 0,
            fail_at_step: int | None = None, compute: step_lib.ComputeConfig = step_lib.ComputeConfig()):
  """SwiftKV's self-distillation (baselines/swiftkv.py): the new norm and q/k/v projections of layers >= k train,
  initialised from the base's own; the base is the frozen teacher. `seed` only orders the data. Runs on the same
  sharded step as `kvp`: the base is read into its shards and passed as a frozen argument."""
  # Everything that can be wrong with the input is checked before the workdir is written to.
  workdir = Path(workdir)
  if not base_checkpoint:
    raise ValueError("--stage=swiftkv needs --base_checkpoint (a pretrain workdir or a Hugging Face directory)")
  _check_run(data, mesh, steps, save_every, log_every)
  checkpoints.check_workdir(workdir, checkpoints.SWIFTKV_CONFIG)
  frozen_dtype = step_lib.DTYPES[compute.frozen_dtype]
  base_shardings = lambda c: sharding.param_shardings(P.abstract(c), P.logical_axes(c), mesh)
  base_cfg, base = checkpoints.load_model(base_checkpoint, frozen_dtype, shardings_for=base_shardings)
  k = swiftkv_lib.cutoff_layers(base_cfg.num_layers, cutoff)
  if k == base_cfg.num_layers:
    raise ValueError(f"--swiftkv_cutoff={cutoff} keeps all {k} layers for every prompt token: SwiftKV would have "
                     "nothing to train; use a cutoff below 1 (theirs: 0.5 for Llama-3.1, 0.75 for Qwen2.5)")
  tok = get_tokenizer(str(base_checkpoint), None, None)  # the base's own (a chat corpus needs it first)
  texts = texts_for(data, tok)
  _check_vocab(base_cfg, tok, "the base")
  data_iter = _data_iter(data, texts, tok, mesh)
  meta = {"base": base_cfg.to_dict(), "base_checkpoint": str(Path(base_checkpoint).absolute()) if Path(
              base_checkpoint).exists() else base_checkpoint,
          "cutoff": cutoff, "cutoff_layers": k, "loss": dataclasses.asdict(loss)}
  checkpoints.check_workdir(workdir, checkpoints.SWIFTKV_CONFIG, meta, compare=("base", "cutoff_layers"))
  workdir.mkdir(parents=True, exist_ok=True)
  _keep_tokenizer(tok, workdir)
  if distributed.is_main():
    checkpoints.write_json(workdir / checkpoints.SWIFTKV_CONFIG, meta)
  # Copies of the base's weights (training never aliases the base), kept as float32 master weights.
  skv0 = P.cast(swiftkv_lib.init_from_base(base_cfg, base, k), jnp.float32)
  loss_fn = lambda t, f, batch: swiftkv_lib.swiftkv_loss(base_cfg, loss, t, f["base"], batch, remat=compute.remat)
  logging.info("SwiftKV: %d of %d layers run every prompt token; %.2fM new parameters train", k,
               base_cfg.num_layers, P.count(skv0) / 1e6)
  return loop.train(workdir=workdir, loss_fn=loss_fn, init_trainable=lambda: skv0,
                    logical_axes=swiftkv_lib.logical_axes(skv0), data_iter=data_iter, steps=steps,
                    optim=optim, mesh=mesh, tokens_per_step=data.seq_len * data.batch_size, save_every=save_every,
                    log_every=log_every, fail_at_step=fail_at_step,
                    frozen={"base": base}, frozen_axes={"base": P.logical_axes(base_cfg)},
                    grad_accum=compute.grad_accum, compute_dtype=step_lib.DTYPES[compute.compute_dtype],
                    run_config={"stage": "swiftkv", "base": base_cfg.to_dict(), "cutoff_layers": k,
                                "data": dataclasses.asdict(data)},
                    run_info={"steps": steps, "optim": dataclasses.asdict(optim), "loss": dataclasses.asdict(loss),
                              "cutoff": cutoff, "base_checkpoint": meta["base_checkpoint"],
                              "compute": dataclasses.asdict(compute)})
