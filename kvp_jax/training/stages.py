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
from kvp_jax.training import loop, sharding

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


QA_FORMATS = ("plain", "chat")


def texts_for(dc: DataConfig, tok=None) -> list[str]:
  """The training documents; qa_format="chat" renders the synthetic QA with `tok`'s chat template."""
  if dc.qa_format not in QA_FORMATS:
    raise ValueError(f"qa_format must be one of {QA_FORMATS}, got {dc.qa_format!r}")
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


def get_tokenizer(spec: str, workdir: Path, texts: list[str] | None):
  """`train:VOCAB` trains one into workdir/tokenizer (reused on resume); anything else is loaded."""
  if spec.startswith("train:"):
    out = workdir / "tokenizer"
    if (out / "tokenizer.json").exists():
      return tok_lib.load_tokenizer(out)
    logging.info("training a %s-token BPE tokenizer on %d documents", spec[6:], len(texts))
    return tok_lib.train_tokenizer(texts, int(spec[6:]), out)
  tok = tok_lib.load_tokenizer(checkpoints.tokenizer_dir(spec))
  if workdir is not None and not (workdir / "tokenizer" / "tokenizer.json").exists():
    tok.save_pretrained(str(workdir / "tokenizer"))  # every workdir carries the tokenizer it was trained with
  return tok


def _check_vocab(cfg: ModelConfig, tok, what: str):
  if len(tok) > cfg.vocab_size:
    raise ValueError(f"{what} has vocab_size={cfg.vocab_size} but the tokenizer has {len(tok)} tokens; "
                     "use the model's own tokenizer or a larger vocab_size")


def _data_iter(dc: DataConfig, texts, tok):
  loss_start = None
  if not dc.qa_context_loss:
    from kvp_jax.data import qa_synthetic
    loss_start = qa_synthetic.any_loss_start if dc.qa_format == "chat" else qa_synthetic.loss_start
    if not any(loss_start(t) is not None for t in texts):
      raise ValueError("qa_context_loss=False, but no document is a synthetic QA document; it applies to "
                       "--data=embedded only")
  return pipeline.make_lm_iterator(texts, tok, dc.seq_len, dc.batch_size, dc.seed, packing=dc.packing,
                                   loss_start=loss_start, add_bos=dc.add_bos)


def pretrain(*, workdir, model: dict | None, init_checkpoint: str | None, lp_keep: tuple[int, ...] | None,
             tokenizer: str, data: DataConfig, steps: int, optim: loop.OptimConfig, z_loss: float,
             mesh, save_every: int, log_every: int, seed: int = 0, fail_at_step: int | None = None):
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  texts = texts_for(data) if data.qa_format == "plain" else None  # a chat corpus needs the tokenizer first
  tok = get_tokenizer(tokenizer, workdir, texts)
  texts = texts if texts is not None else texts_for(data, tok)
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
  checkpoints.write_json(workdir / checkpoints.MODEL_CONFIG, cfg.to_dict())
  logging.info("pretraining a %.2fM-parameter %s model for %d steps", cfg.num_params() / 1e6, cfg.architecture,
               steps)
  loss_fn = lambda p, batch: lm_loss(cfg, p, batch, z_loss)
  return loop.train(workdir=workdir, loss_fn=loss_fn, init_trainable=make, logical_axes=P.logical_axes(cfg),
                    data_iter=_data_iter(data, texts, tok), steps=steps, optim=optim, mesh=mesh,
                    tokens_per_step=data.seq_len * data.batch_size, save_every=save_every,
                    log_every=log_every, fail_at_step=fail_at_step)


PREDICTOR_INITS = predictor.INITS + ("lstsq",)


def kvp(*, workdir, base_checkpoint: str, aux: aux_models.AuxSpec, predictor_kind: str, predictor_init: str,
        layer_map: tuple[int, ...] | None, loss: losses.KVPLossConfig, freeze_aux: bool, data: DataConfig,
        steps: int, optim: loop.OptimConfig, mesh, save_every: int, log_every: int, seed: int = 0,
        fail_at_step: int | None = None, lstsq_tokens: int = 4096, lstsq_ridge: float = 1e-3,
        init_from: str | None = None):
  """KV Prediction against a frozen base. The predictor starts as `predictor_init`: identity / random, or
  "lstsq", ridge least squares on the first `lstsq_tokens` tokens of a pass over the training data
  (kvp_jax/kvp/lstsq.py; its fit is written to lstsq.json). init_from: a kvp workdir whose aux and predictor
  to start from instead (the same aux and predictor shapes); steps=0 saves the starting point as step 0."""
  workdir = Path(workdir)
  if not base_checkpoint:
    raise ValueError("--stage=kvp needs --base_checkpoint (a pretrain workdir or a Hugging Face directory)")
  if predictor_init not in PREDICTOR_INITS:
    raise ValueError(f"unknown predictor init {predictor_init!r}; choose one of {PREDICTOR_INITS}")
  base_cfg, base = checkpoints.load_model(base_checkpoint)
  kcfg, kp0 = inference.build(base_cfg, base, aux, kind=predictor_kind,
                              init="identity" if predictor_init == "lstsq" else predictor_init, layer_map=layer_map,
                              seed=seed)
  if init_from:
    from kvp_jax.kvp import checkpoints as kvp_checkpoints
    kcfg_from, _, kp0 = kvp_checkpoints.load_kvp(init_from, base_params=base)
    if kcfg_from != kcfg:
      raise ValueError(f"--init_from={init_from} holds another aux/predictor ({kcfg_from.aux.num_layers} aux layers, "
                       f"kind {kcfg_from.kind}) than this run ({kcfg.aux.num_layers}, {kcfg.kind})")
  aux_cfg, aux_params, pred0 = kcfg.aux, kp0.aux, kp0.pred
  if aux.kind == "c" and aux.checkpoint:
    try:
      aux_models.check_compatible(base_cfg, aux_cfg, tok_lib.load_tokenizer(checkpoints.tokenizer_dir(base_checkpoint)),
                                  tok_lib.load_tokenizer(checkpoints.tokenizer_dir(aux.checkpoint)))
    except ValueError as e:
      if "mismatch" in str(e):
        raise
      logging.warning("could not compare tokenizers (%s); vocab sizes match", e)
  workdir.mkdir(parents=True, exist_ok=True)
  tok = get_tokenizer(str(base_checkpoint), workdir, None)
  texts = texts_for(data, tok)
  _check_vocab(base_cfg, tok, "the base")
  checkpoints.write_json(workdir / checkpoints.KVP_CONFIG, {
      "kvp": kcfg.to_dict(), "base_checkpoint": str(Path(base_checkpoint).absolute()) if Path(
          base_checkpoint).exists() else base_checkpoint,
      "loss": dataclasses.asdict(loss), "aux": dataclasses.asdict(aux), "freeze_aux": freeze_aux,
      "predictor_init": predictor_init, "init_from": init_from})
  ck = checkpoints.Checkpointer(workdir, save_every=1)
  resuming = ck.latest_step() is not None  # the fit is in the checkpoint already
  ck.close()
  if predictor_init == "lstsq" and not init_from and not resuming:
    pred0 = fit_lstsq(kcfg, base, aux_params, data, texts, tok, lstsq_tokens, lstsq_ridge, workdir)
  base_f = jax.tree.map(jnp.asarray, base)  # frozen: closed over, no grads, no optimizer state
  frozen = {"aux": aux_params} if freeze_aux else {}
  loss_fn = lambda t, batch: losses.kvp_loss(kcfg, loss, t, frozen, base_f, batch)
  init_trainable = (lambda: {"pred": pred0}) if freeze_aux else (lambda: {"aux": aux_params, "pred": pred0})
  pred_axes = predictor.PredictorParams(wk=(None, None, None), bk=(None, None), wv=(None, None, None),
                                        bv=(None, None))
  axes = {"pred": pred_axes} if freeze_aux else {"aux": P.logical_axes(aux_cfg), "pred": pred_axes}
  logging.info("KV Prediction: base %.2fM params (%d layers) <- aux %.2fM (%d layers), predictor %s, map %s",
               base_cfg.num_params() / 1e6, base_cfg.num_layers, aux_cfg.num_params() / 1e6, aux_cfg.num_layers,
               predictor_kind, kcfg.layer_map)
  to_saved = (lambda t: {"aux": aux_params, **t}) if freeze_aux else None
  trainable, rows = loop.train(
      workdir=workdir, loss_fn=loss_fn, init_trainable=init_trainable, logical_axes=axes,
      data_iter=_data_iter(data, texts, tok), steps=steps, optim=optim, mesh=mesh,
      tokens_per_step=data.seq_len * data.batch_size, save_every=save_every, log_every=log_every,
      fail_at_step=fail_at_step, params_for_checkpoint=to_saved)
  return trainable, rows


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
            fail_at_step: int | None = None):
  """SwiftKV's self-distillation (baselines/swiftkv.py): the new norm and q/k/v projections of layers >= k train,
  initialised from the base's own; the base is the frozen teacher. `seed` only orders the data."""
  workdir = Path(workdir)
  if not base_checkpoint:
    raise ValueError("--stage=swiftkv needs --base_checkpoint (a pretrain workdir or a Hugging Face directory)")
  base_cfg, base = checkpoints.load_model(base_checkpoint)
  k = swiftkv_lib.cutoff_layers(base_cfg.num_layers, cutoff)
  if k == base_cfg.num_layers:
    raise ValueError(f"--swiftkv_cutoff={cutoff} keeps all {k} layers for every prompt token: SwiftKV would have "
                     "nothing to train; use a cutoff below 1 (theirs: 0.5 for Llama-3.1, 0.75 for Qwen2.5)")
  workdir.mkdir(parents=True, exist_ok=True)
  tok = get_tokenizer(str(base_checkpoint), workdir, None)  # the base's own (a chat corpus needs it first)
  texts = texts_for(data, tok)
  _check_vocab(base_cfg, tok, "the base")
  checkpoints.write_json(workdir / checkpoints.SWIFTKV_CONFIG, {
      "base": base_cfg.to_dict(), "base_checkpoint": str(Path(base_checkpoint).absolute()) if Path(
          base_checkpoint).exists() else base_checkpoint,
      "cutoff": cutoff, "cutoff_layers": k, "loss": dataclasses.asdict(loss)})
  skv0 = swiftkv_lib.init_from_base(base_cfg, base, k)  # copies: training never aliases the base
  base_f = jax.tree.map(jnp.asarray, base)  # frozen: closed over, no grads, no optimizer state
  loss_fn = lambda t, batch: swiftkv_lib.swiftkv_loss(base_cfg, loss, t, base_f, batch)
  logging.info("SwiftKV: %d of %d layers run every prompt token; %.2fM new parameters train", k,
               base_cfg.num_layers, P.count(skv0) / 1e6)
  return loop.train(workdir=workdir, loss_fn=loss_fn, init_trainable=lambda: skv0,
                    logical_axes=swiftkv_lib.logical_axes(skv0), data_iter=_data_iter(data, texts, tok), steps=steps,
                    optim=optim, mesh=mesh, tokens_per_step=data.seq_len * data.batch_size, save_every=save_every,
                    log_every=log_every, fail_at_step=fail_at_step)
