"""Accuracy against TTFT FLOPs for every method on the embedded tasks (kvp_jax/eval.py is the entry point).

`evaluate` builds each method from its spec (registry.py), scores it on every task (tasks.py, scoring.py),
counts its TTFT FLOPs at each task's mean prompt length, ours (aux, predictor, the base's last-token step,
attention) and the paper's (N x aux cost per token), and writes report.json / report.md (report.py) and the
plots (plots.py). Every metric comes with its standard error and number of examples (stats.py), and its
per-example scores, so two rows compare by paired differences.
Every method is built before any is scored, so a bad spec fails in seconds. Each scored row is appended to
`scored_rows.jsonl` as soon as it is done, with the stamp of its checkpoint, and the file is kept: a rerun with
the same settings and base (an interrupted one, or one that adds methods) reuses every row whose method spec
and checkpoint are unchanged (and says so); other settings or another base start over.
Shape legend: see kvp_jax/models/config.py.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from kvp_jax import partial_results
from kvp_jax.data import tokenizer as tok_lib
from kvp_jax.evaluation import plots
from kvp_jax.evaluation.registry import BUILDERS, MethodSpec, Models, spec_label
from kvp_jax.evaluation.report import equal_flops, gap_recovered, rivals, write_report
from kvp_jax.evaluation.scoring import score_method
from kvp_jax.evaluation.tasks import METRICS, TASK_OF_METRIC, EvalConfig, Task, make_tasks, newline_counts
from kvp_jax.kvp import inference
from kvp_jax.models import checkpoints, generation


def kv_errors(models: Models, specs: list[MethodSpec], task: Task, pad_id: int, n: int) -> dict[str, dict]:
  """Per-layer mean |K_pred - K_base| and |V_pred - V_base| over n prompts of `task`, per kvp spec."""
  exs = task.examples[:n]
  bucket = generation.bucket_length(max(len(e.prompt_ids) for e in exs))
  tokens, starts = generation.pad_prompts([e.prompt_ids for e in exs], pad_id, bucket)
  out = {}
  for s in specs:
    kcfg, base, kp = models.kvp(s.path)
    pred, true = inference.predicted_and_true_cache(kcfg, base, kp, jnp.asarray(tokens), jnp.asarray(starts), bucket)
    err = inference.layer_errors(pred, true)
    out[spec_label(s)] = {"k": np.asarray(err["k"]).tolist(), "v": np.asarray(err["v"]).tolist()}
  return out


SCORED = "scored_rows.jsonl"


def _stamp(path) -> list:
  """What identifies a checkpoint's weights on disk (files of its latest step, or its safetensors), so rows
  scored before a checkpoint was retrained are not reused."""
  p = Path(path)
  steps = [c for c in (p / "checkpoints").glob("*") if c.name.isdigit()] if p.is_dir() else []
  where = max(steps, key=lambda c: int(c.name)) if steps else p
  files = sorted(f for f in where.rglob("*") if f.is_file()) if steps else (
      sorted(p.glob("*.safetensors")) + sorted(p.glob("*.json")) if p.is_dir() else [])
  return [[str(f.relative_to(p)), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def _build(spec: MethodSpec, models: Models):
  """The method of one spec; a bad setting is a ValueError naming the spec."""
  try:
    return BUILDERS[spec.method](spec, models)
  except TypeError as e:
    if "keyword argument" not in str(e) and "positional argument" not in str(e):
      raise
    raise ValueError(f"method spec {str(spec)!r}: {e}; check its ;KEY=VALUE settings") from None
  except ValueError as e:
    if str(spec) in str(e):
      raise
    raise ValueError(f"method spec {str(spec)!r}: {e}") from None


def evaluate(base_checkpoint: str, specs: list[MethodSpec], ec: EvalConfig, out_dir, *, tokenizer=None,
             log: Callable[[str], None] = print, extra_config: dict | None = None) -> dict:
  """Evaluates every spec, writes report.json, report.md, pareto.png and kv_error.png; returns the report.

  extra_config: recorded under report["config"] (the quickstart's stage fingerprints, to know when to rerun, and
    its machine record); not part of what decides whether a scored row is reused (its checkpoint's stamp is).
  """
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  tok = tok_lib.load_tokenizer(tokenizer or checkpoints.tokenizer_dir(base_checkpoint))
  models = Models(base_checkpoint)
  pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
  tasks = make_tasks(tok, ec)
  nl_counts = newline_counts(tok, models.base[0].vocab_size)
  mean_len = {t.name: t.mean_prompt_len for t in tasks}
  overall = float(np.mean([len(e.prompt_ids) for t in tasks for e in t.examples]))
  log("eval prompts: " + ", ".join(f"{t.name} {len(t.examples)} x {mean_len[t.name]:.0f} tokens" for t in tasks))
  if ec.fidelity and not any(s.method == "base" and not s.path for s in specs):
    raise ValueError("fidelity metrics compare every method with the base: add the method 'base'")
  built = [_build(spec, models) for spec in specs]
  scored = out_dir / SCORED
  fingerprint = json.loads(json.dumps({
      "eval": ec.to_dict(), "base_checkpoint": str(base_checkpoint), "tokenizer": str(tokenizer),
      "base": _stamp(base_checkpoint)}))  # not extra_config: it records the machine, measured anew each run
  # a row is reused only if its method's checkpoint is the one on disk now (not retrained since)
  stamps = {str(s): json.loads(json.dumps(_stamp(s.path))) if s.path else None for s in specs}
  rows = partial_results.load(scored, fingerprint, lambda o: o.get("spec"),
                              "an evaluation with other settings or another base", log)
  done = {k: {f: v for f, v in row.items() if f != "checkpoint"} for k, row in rows.items()
          if k in stamps and row.get("checkpoint") == stamps[k]}
  if done:
    log(f"resuming: {len(done)} of {len(specs)} methods already scored in {scored}")
  # The base first: its first-token distributions are the reference of every other row's fidelity.
  is_ref = lambda i: ec.fidelity and specs[i].method == "base" and not specs[i].path
  order = sorted(range(len(specs)), key=lambda i: not is_ref(i))
  todo = [i for i in order if str(specs[i]) not in done]
  results, reference, t_begin = [None] * len(specs), None, time.time()
  for k, i in enumerate(order):
    spec, m = specs[i], built[i]
    if str(spec) in done:
      results[i] = done[str(spec)]
      if is_ref(i) and reference is None and todo:  # a reused base row: its distributions are not on disk
        reference = score_method(m, tasks, tok, ec, pad_id, nl_counts, keep_first=True).first
      continue
    t0 = time.time()
    is_reference = ec.fidelity and reference is None
    scores = score_method(m, tasks, tok, ec, pad_id, nl_counts, reference=reference, keep_first=is_reference)
    if is_reference:
      reference = scores.first
      n_all = sum(len(t.examples) for t in tasks)
      # the reference itself: agreement 1 and KL 0 by definition (the same program's own logits)
      scores.values.update(first_token_agree=np.ones(n_all), first_token_kl=np.zeros(n_all))
    metrics, stderr, n = scores.summary()
    row = {"method": m.name, "label": m.label, "ttft_flops": m.ttft_flops(round(overall)),
           "ttft_flops_paper": m.ttft_flops_paper(round(overall)),
           "ttft_flops_by_task": {**{k_: m.ttft_flops(round(v)) for k_, v in mean_len.items()},
                                  "all": m.ttft_flops(round(overall))},
           "ttft_flops_paper_by_task": {**{k_: m.ttft_flops_paper(round(v)) for k_, v in mean_len.items()},
                                        "all": m.ttft_flops_paper(round(overall))},
           "metrics": metrics, "stderr": stderr, "n": n,
           "per_example": {k_: np.asarray(v).tolist() for k_, v in scores.values.items()},
           "per_example_den": {k_: np.asarray(v).tolist() for k_, v in scores.den.items()},
           "eval_s": time.time() - t0, "spec": str(spec)}
    if m.aux is not None:
      row["aux"] = m.aux
    if m.settings:
      row["settings"] = m.settings
    results[i] = row
    partial_results.append(scored, {**row, "checkpoint": stamps[str(spec)]})
    n_done = todo.index(i) + 1
    eta = (time.time() - t_begin) / n_done * (len(todo) - n_done)
    log(f"  [{k + 1}/{len(specs)}] {m.label}: " + " ".join(f"{k_} {v:.3f}" for k_, v in metrics.items())
        + f" ({row['eval_s']:.1f}s, eval ETA {int(eta) // 60}m{int(eta) % 60:02d}s)")
  kvp_specs = [s for s in specs if s.method == "kvp"]
  qa = next(t for t in tasks if t.name.startswith("qa"))
  report = {
      "tasks": [k for k in METRICS if any(k in r["metrics"] for r in results)],
      "results": results,
      "gap_recovered": gap_recovered(results),
      "equal_flops": equal_flops(results),
      "rivals": rivals(results),
      "kv_error": kv_errors(models, kvp_specs, qa, pad_id, ec.kv_error_examples) if kvp_specs else {},
      "prompt_len_mean": mean_len,
      "prompt_len_mean_all": overall,
      "config": {"eval": ec.to_dict(), "base_checkpoint": str(base_checkpoint), "methods": [str(s) for s in specs],
                 **(extra_config or {})},
      "env": {"jax": jax.__version__, "backend": jax.default_backend(), "python": sys.version.split()[0]},
  }
  write_report(report, out_dir)
  plots.pareto(report, out_dir / "pareto.png", TASK_OF_METRIC)
  plots.kv_error(report, out_dir / "kv_error.png")
  return report
