"""`python -m kvp_jax.train --flagfile=configs/tiny_kvp.flags [--flag=value ...]`

Flags given on the command line after --flagfile override it. A workdir that already holds a checkpoint is
resumed from it (parameters, optimizer, data position and step), so rerunning the same command after a crash
continues where it stopped.

Many devices: `--mesh=data:2,fsdp:4` (axes data, fsdp, model, seq; kvp_jax/training/sharding.py). Many processes
(a TPU pod, SLURM, or `--coordinator/--num_processes/--process_id` by hand): every process runs this same
command; launch/ holds the launchers, and `python -m kvp_jax.plan` says beforehand whether a run fits.
"""

from __future__ import annotations

import json
import math

from absl import flags, logging

from kvp_jax import cli

F = flags.FLAGS
flags.DEFINE_enum("stage", "pretrain", ["pretrain", "kvp", "swiftkv"], "What to train.")
flags.DEFINE_string("workdir", None, "Checkpoints, metrics.jsonl, tokenizer and configs go here.")
flags.DEFINE_integer("steps", 100, "Total optimizer steps (a resumed run continues up to this).")
flags.DEFINE_integer("seed", 0, "Seed of initialisation and data order.")
# data
flags.DEFINE_string("data", "embedded", "'embedded' (stdlib code + synthetic QA), a file/dir, 'glob:...', or "
                    "'hf:name[:config][:split]'.")
flags.DEFINE_integer("num_qa_docs", 2000, "Synthetic QA documents in the embedded corpus.")
flags.DEFINE_list("qa_num_facts", ["16", "136"], "Min,max facts per synthetic QA document (~15 tokens each).")
flags.DEFINE_integer("qa_questions_per_doc", 1, "Question/answer pairs after each synthetic QA context.")
flags.DEFINE_enum("qa_distractors", "shared", ["shared", "distinct", "mixed"], "Synthetic QA difficulty: "
                  "distractors sharing the asked attribute and name parts (shared), or every entity named once "
                  "(distinct); mixed alternates the two by document (--qa_format=chat, as the smollm2 preset trains).")
flags.DEFINE_enum("qa_answer_style", "bare", ["bare", "sentence"], "Synthetic QA answers: the bare value, or "
                  "a sentence restating the needed fact(s) before it.")
flags.DEFINE_bool("qa_recap", False, "Restate a QA document's facts before its questions (dense copy signal).")
flags.DEFINE_bool("qa_context_loss", True, "Train on a synthetic QA document's context tokens too; false: its loss "
                  "starts at the recap/questions (the context is random; its loss only adds noise).")
flags.DEFINE_integer("max_code_files", None, "Cap on stdlib code files in the embedded corpus.")
flags.DEFINE_enum("qa_format", "plain", ["plain", "chat"], "Synthetic QA as plain documents, or as conversations "
                  "in the tokenizer's chat template (an instruction-tuned base).")
flags.DEFINE_bool("add_bos", True, "Start every training document with the tokenizer's BOS (false where BOS is a "
                  "chat-turn token, as SmolLM2's <|im_start|>).")
flags.DEFINE_integer("seq_len", 256, "Training sequence length (documents are packed).")
flags.DEFINE_enum("packing", "documents", ["documents", "concat"],
                  "documents: a document no longer than seq_len+1 stays whole in one window (padding is masked); "
                  "concat: concatenate and split, documents cross window edges.")
flags.DEFINE_integer("batch_size", 8, "Global batch size in sequences.")
flags.DEFINE_string("tokenizer", "train:2048", "pretrain: a tokenizer directory, or train:VOCAB to train one "
                    "into the workdir. kvp uses the base checkpoint's tokenizer.")
# models
flags.DEFINE_string("model", None, "pretrain: ModelConfig fields as JSON (vocab_size defaults to the tokenizer's).")
flags.DEFINE_string("init_checkpoint", None, "pretrain: start from this workdir / Hugging Face directory.")
flags.DEFINE_float("lp_keep_fraction", None, "Keep 0.25/0.5/0.75 of the layers (KVP-LP rules): for --aux=lp, "
                   "or to prune --init_checkpoint when pretraining a layer-pruned model alone.")
flags.DEFINE_list("lp_keep_layers", None, "Explicit kept layer indices (overrides --lp_keep_fraction).")
flags.DEFINE_string("base_checkpoint", None, "kvp, swiftkv: the frozen base (pretrain workdir or Hugging Face dir).")
flags.DEFINE_enum("aux", "lp", ["lp", "c"], "kvp: layer-pruned base copy (KVP-LP) or a separate model (KVP-C).")
flags.DEFINE_string("aux_checkpoint", None, "kvp --aux=c: the auxiliary model (pretrain workdir or HF dir).")
flags.DEFINE_string("aux_model", None, "kvp --aux=c from scratch: ModelConfig fields as JSON.")
flags.DEFINE_string("predictor", "kv", "kvp: 'kv' (from aux K/V) or 'activation' (from aux layer inputs).")
flags.DEFINE_enum("predictor_init", "identity", ["identity", "random", "lstsq"], "identity where widths match; "
                  "lstsq: ridge least squares from the aux's features to the base's K/V on --lstsq_tokens tokens.")
flags.DEFINE_integer("lstsq_tokens", 4096, "kvp --predictor_init=lstsq: training tokens the fit reads.")
flags.DEFINE_float("lstsq_ridge", 1e-3, "kvp --predictor_init=lstsq: ridge, relative to the features' mean square.")
flags.DEFINE_string("init_from", None, "kvp: start aux and predictor from this kvp workdir (e.g. a lstsq fit).")
flags.DEFINE_list("layer_map", None, "kvp: aux layer feeding each base layer (overrides the paper's map).")
flags.DEFINE_bool("freeze_aux", False, "kvp: train only the predictor.")
# loss
flags.DEFINE_float("w_base", 1.0, "Weight of the base CE computed with predicted KV.")
flags.DEFINE_float("w_aux", 1.0, "Weight of the aux CE.")
flags.DEFINE_float("lambda_c", 1.0, "Scale of the K/V consistency L1 term.")
flags.DEFINE_enum("kv_reduce", "mean", ["mean", "sum"], "Consistency loss over layers: mean (lambda_C=1/n_B) or sum.")
flags.DEFINE_float("z_loss", 1e-4, "z-loss coefficient (times logsumexp^2).")
flags.DEFINE_float("qk_weight", 0.0, "Weight of the query-key similarity loss (0 = off).")
flags.DEFINE_enum("attention_mode", "corenet", ["corenet", "aligned"], "How base queries see predicted KV in training.")
# SwiftKV (baselines/swiftkv.py); their recipe also has --weight_decay=0 --b2=0.999
flags.DEFINE_float("swiftkv_cutoff", 0.5, "swiftkv: fraction of the base's layers every prompt token runs (k = "
                   "f * L rounded; theirs: 0.5 for Llama-3.1, 0.75 for Qwen2.5).")
flags.DEFINE_float("swiftkv_temperature", 2.0, "swiftkv: temperature of the logits distillation (times T^2).")
flags.DEFINE_float("swiftkv_hidden_weight", 1.0, "swiftkv: weight of the MSE on the last decoder layer's input.")
# optimisation
flags.DEFINE_float("lr", 1.2e-3, "Peak learning rate.")
flags.DEFINE_float("min_lr_ratio", 0.1, "Cosine decays to lr * this.")
flags.DEFINE_integer("warmup_steps", 100, "Linear warmup steps.")
flags.DEFINE_float("b2", 0.95, "AdamW beta2.")
flags.DEFINE_float("weight_decay", 0.1, "AdamW weight decay (matrices only).")
flags.DEFINE_float("clip", 1.0, "Global gradient-norm clip.")
# infrastructure
flags.DEFINE_string("mesh", "", "Device mesh as AXIS:SIZE,... over data (batch), fsdp (batch + every weight and "
                    "optimizer state), model (heads / MLP width / vocab), seq; one size may be -1 (all devices "
                    "left). Empty: data parallelism over every device.")
flags.DEFINE_integer("data_shards", 0, "Disjoint document streams making up each batch (batch_size / data_shards "
                     "rows each); 0: one per process. Keep it fixed to resume or compare across process counts.")
flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"], "Dtype the loss computes in; trained "
                  "weights and optimizer state stay float32.")
flags.DEFINE_enum("frozen_dtype", "float32", ["float32", "bfloat16"], "Storage dtype of the frozen base (kvp, swiftkv).")
flags.DEFINE_integer("grad_accum", 1, "Micro-batches per optimizer step (batch_size is the whole step's).")
flags.DEFINE_enum("remat", "none", ["none", "full", "dots", "dots_no_batch"], "Per-layer activation "
                  "rematerialisation: none, full (keep layer inputs only), dots (keep matmul outputs), "
                  "dots_no_batch (keep weight-matmul outputs, recompute attention).")
flags.DEFINE_enum("multiprocess", "auto", ["auto", "on", "off"], "jax.distributed: auto starts it when "
                  "--coordinator is given or SLURM/Open MPI say there are several processes; on: always "
                  "(a TPU pod); off: never.")
flags.DEFINE_string("coordinator", None, "host:port of process 0, for runs started by hand (with "
                    "--num_processes and --process_id).")
flags.DEFINE_integer("num_processes", None, "Number of processes of a run started by hand.")
flags.DEFINE_integer("process_id", None, "This process's index in a run started by hand.")
flags.DEFINE_integer("log_every", 10, "Log and write metrics every N steps.")
flags.DEFINE_integer("save_every", 100, "Checkpoint every N steps (and at the end).")
flags.DEFINE_integer("fail_at_step", None, "Testing: exit abruptly after this step, as a crash would.")
flags.mark_flag_as_required("workdir")

# Refused while the command line is parsed, before anything is loaded (one line each, see kvp_jax/cli.py).
for _name in ("steps", "num_qa_docs", "max_code_files", "warmup_steps"):
  cli.at_least(_name, 0)
for _name in ("seq_len", "batch_size", "qa_questions_per_doc", "log_every", "save_every"):
  cli.at_least(_name, 1)
for _name in ("w_base", "w_aux", "lambda_c", "z_loss", "qk_weight", "weight_decay"):
  cli.finite_above(_name, 0.0, inclusive=True)
for _name in ("lr", "clip"):
  cli.finite_above(_name, 0.0)
cli.fraction("lp_keep_fraction")
cli.finite_above("swiftkv_temperature", 0.0)
cli.finite_above("swiftkv_hidden_weight", 0.0, inclusive=True)
flags.register_validator("swiftkv_cutoff", lambda v: math.isfinite(v) and 0 < v < 1,
                         message="must be in (0, 1): at 1 every prompt token runs every layer and SwiftKV has "
                         "nothing to train")
flags.register_validator("b2", lambda v: math.isfinite(v) and 0 <= v < 1, message="must be in [0, 1)")
cli.fraction("min_lr_ratio", zero=True)
cli.int_pair("qa_num_facts", 1)
cli.ints("lp_keep_layers", 0)
cli.ints("layer_map", 0)


def _mesh_ok(spec: str) -> bool:
  """--mesh's syntax and sizes (whether the devices can form it is known only once jax starts)."""
  if not spec:
    return True
  from kvp_jax.training import sharding  # only when --mesh is given: keeps --help fast
  try:
    sizes = sharding.parse_mesh(spec)
  except ValueError as e:
    raise flags.ValidationError(str(e).replace(f"--mesh={spec!r}: ", "")) from None
  if any(v != -1 and v < 1 for v in sizes.values()) or list(sizes.values()).count(-1) > 1:
    raise flags.ValidationError("sizes must be >= 1, with at most one -1 (every device the others leave)")
  return True


flags.register_validator("mesh", _mesh_ok)
cli.conflict(["stage", "base_checkpoint"], lambda f: f["stage"] in ("kvp", "swiftkv") and not f["base_checkpoint"],
             "--stage=kvp and --stage=swiftkv need --base_checkpoint (a pretrain workdir or a Hugging Face directory)")
cli.conflict(["stage", "model", "init_checkpoint"],
             lambda f: f["stage"] == "pretrain" and bool(f["model"]) == bool(f["init_checkpoint"]),
             "--stage=pretrain needs exactly one of --model (a fresh JSON config) and --init_checkpoint")
cli.conflict(["stage", "aux", "aux_checkpoint", "aux_model"],
             lambda f: f["stage"] == "kvp" and f["aux"] == "c" and bool(f["aux_checkpoint"]) == bool(f["aux_model"]),
             "--aux=c needs exactly one of --aux_checkpoint and --aux_model")
cli.conflict(["aux", "aux_checkpoint", "aux_model"], lambda f: f["aux"] == "lp" and bool(f["aux_checkpoint"] or f["aux_model"]),
             "--aux_checkpoint and --aux_model are for --aux=c; --aux=lp prunes the base")
cli.conflict(["freeze_aux", "aux_model"], lambda f: f["freeze_aux"] and bool(f["aux_model"]),
             "--freeze_aux would freeze the randomly initialised aux of --aux_model; pass --aux_checkpoint or drop "
             "--freeze_aux")

# Flags that only some stages read; given to another stage they would be ignored without a word (say a forgotten
# --stage=swiftkv: the run would pretrain). Every other flag is read by every stage.
STAGE_FLAGS = {
    "model": ("pretrain",), "init_checkpoint": ("pretrain",), "tokenizer": ("pretrain",),
    "lp_keep_fraction": ("pretrain", "kvp"), "lp_keep_layers": ("pretrain", "kvp"), "z_loss": ("pretrain", "kvp"),
    "base_checkpoint": ("kvp", "swiftkv"),
    **{name: ("kvp",) for name in ("aux", "aux_checkpoint", "aux_model", "predictor", "predictor_init", "layer_map",
                                   "freeze_aux", "w_base", "w_aux", "lambda_c", "kv_reduce", "qk_weight",
                                   "attention_mode")},
    **{name: ("swiftkv",) for name in ("swiftkv_cutoff", "swiftkv_temperature", "swiftkv_hidden_weight")},
}


def _check_stage_flags():
  for name, stages in STAGE_FLAGS.items():
    if F[name].present and F.stage not in stages:
      raise ValueError(f"--{name} is read by --stage={' and --stage='.join(stages)} only, and this run is "
                       f"--stage={F.stage}; fix --stage or drop --{name}")


def _json_flag(name):
  v = getattr(F, name)
  if v is None:
    return None
  try:
    return json.loads(v)
  except json.JSONDecodeError as e:
    raise ValueError(f"--{name} is not valid JSON ({e.msg}); example: --{name}='{{\"hidden_size\": 128}}'") from None


def _ints(v):
  return None if v is None else tuple(int(x) for x in v)


def run():
  from kvp_jax.kvp import aux_models, losses  # after flag parsing: keeps --help fast
  from kvp_jax.training import distributed, loop, sharding, stages
  from kvp_jax.training import step as step_lib
  distributed.initialize(F.multiprocess, F.coordinator, F.num_processes, F.process_id)
  mesh = sharding.mesh_from_spec(F.mesh)
  optim = loop.OptimConfig(lr=F.lr, min_lr_ratio=F.min_lr_ratio, warmup_steps=F.warmup_steps, b2=F.b2,
                           weight_decay=F.weight_decay, clip=F.clip)
  data = stages.DataConfig(source=F.data, num_qa_docs=F.num_qa_docs, qa_num_facts=_ints(F.qa_num_facts),
                           max_code_files=F.max_code_files, qa_questions_per_doc=F.qa_questions_per_doc,
                           qa_distractors=F.qa_distractors, qa_answer_style=F.qa_answer_style,
                           qa_recap=F.qa_recap, qa_context_loss=F.qa_context_loss,
                           seq_len=F.seq_len, batch_size=F.batch_size, seed=F.seed, packing=F.packing,
                           qa_format=F.qa_format, add_bos=F.add_bos, data_shards=F.data_shards)
  compute = step_lib.ComputeConfig(compute_dtype=F.compute_dtype, frozen_dtype=F.frozen_dtype,
                                   grad_accum=F.grad_accum, remat=F.remat)
  common = dict(workdir=F.workdir, data=data, steps=F.steps, optim=optim, mesh=mesh, save_every=F.save_every,
                log_every=F.log_every, seed=F.seed, fail_at_step=F.fail_at_step, compute=compute)
  if F.stage == "pretrain":
    keep = _ints(F.lp_keep_layers)
    if keep is None and F.lp_keep_fraction is not None:
      from kvp_jax.models import checkpoints
      if not F.init_checkpoint:
        raise ValueError("--lp_keep_fraction in pretraining prunes --init_checkpoint; pass one")
      n = checkpoints.load_model(F.init_checkpoint)[0].num_layers
      keep = aux_models.lp_keep_layers(n, F.lp_keep_fraction)
    _, rows = stages.pretrain(model=_json_flag("model"), init_checkpoint=F.init_checkpoint, lp_keep=keep,
                              tokenizer=F.tokenizer, z_loss=F.z_loss, **common)
  elif F.stage == "swiftkv":
    from kvp_jax.baselines import swiftkv
    loss = swiftkv.SwiftKVLossConfig(temperature=F.swiftkv_temperature, hidden_weight=F.swiftkv_hidden_weight)
    _, rows = stages.swiftkv(base_checkpoint=F.base_checkpoint, cutoff=F.swiftkv_cutoff, loss=loss, **common)
  else:
    aux = aux_models.AuxSpec(kind=F.aux, lp_keep_fraction=F.lp_keep_fraction or 0.5,
                             lp_keep_layers=_ints(F.lp_keep_layers), checkpoint=F.aux_checkpoint,
                             model=_json_flag("aux_model"))
    loss = losses.KVPLossConfig(w_base=F.w_base, w_aux=F.w_aux, lambda_c=F.lambda_c, kv_reduce=F.kv_reduce,
                                z_loss=F.z_loss, qk_weight=F.qk_weight, attention_mode=F.attention_mode)
    _, rows = stages.kvp(base_checkpoint=F.base_checkpoint, aux=aux, predictor_kind=F.predictor,
                         predictor_init=F.predictor_init, layer_map=_ints(F.layer_map), loss=loss,
                         freeze_aux=F.freeze_aux, lstsq_tokens=F.lstsq_tokens, lstsq_ridge=F.lstsq_ridge,
                         init_from=F.init_from, **common)
  if rows:
    logging.info("done: first logged loss %.4f, last %.4f (%s/metrics.jsonl)", rows[0]["loss"], rows[-1]["loss"],
                 F.workdir)


def main():
  _check_stage_flags()
  cli.writable_dir(F.workdir, "--workdir")
  run()


if __name__ == "__main__":
  cli.run(main, outputs=lambda: [F.workdir])
