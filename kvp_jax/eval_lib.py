"""Accuracy against TTFT FLOPs for every method on the embedded tasks (kvp_jax/eval.py is the entry point).

Tasks (names are report.json's metric keys)
- qa_em / qa_2hop_em: exact match of the greedy answer on synthetic one-hop / two-hop QA (qa_synthetic).
- code_line_em: the greedy next line of a held-out stdlib file equals the true line, indentation included.
- code_token_acc: teacher-forced argmax accuracy over the true next line's tokens.

Prompts end on a token boundary: a code context ends with "\\n" but the tokenizer merges a newline with the
next line's indentation ("\\n    "), so the prompt is cut before that whitespace run and the model must emit it
(`Example.lead`) before the line. Generation stops once a row has emitted more newlines than its lead holds.
Prompts are batched, left-padded to a bucket (generation.pad_prompts); every batch of a task has the same
row count and every cache the same headroom, so each method compiles one program per bucket.

Methods are named by a `MethodSpec` ("kvp:lp0.50@runs/q/kvp_lp0.50;kv_reduce=sum") and built by `BUILDERS`;
adding a method is one entry there. TTFT FLOPs are counted at each task's mean prompt length, ours (aux,
predictor, the base's last-token step, attention) and the paper's (N x aux cost per token).

report.json: `tasks` (metric names); `results`, one per method: method, aux (absent for the base), label,
settings (if any), ttft_flops / ttft_flops_paper (at the mean length of all prompts), ttft_flops_by_task /
ttft_flops_paper_by_task (keyed qa, qa_2hop, code), metrics (metric -> [0, 1]), eval_s, spec; `gap_recovered`
(aux -> metric -> share of the aux-to-base gap, null where there is no gap); `equal_flops`; `kv_error`
(kvp label -> per-layer K and V L1 error); `prompt_len_mean`; `config`; `env`.
Shape legend: see kvp_jax/config.py.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from kvp_jax import checkpointing, generation, kvp, methods, stages
from kvp_jax.data import code_corpus, qa_synthetic
from kvp_jax.data import tokenizer as tok_lib

METRICS = ("qa_em", "qa_2hop_em", "code_line_em", "code_token_acc")
TASK_OF_METRIC = {"qa_em": "qa", "qa_2hop_em": "qa_2hop", "code_line_em": "code", "code_token_acc": "code"}
# Rows compared against the base to get "the aux-to-base gap": the aux model alone, else the pruned model alone.
BASELINE_METHODS = ("aux_only", "lp_alone")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  num_qa: int = 32  # examples per QA task (one-hop and two-hop each)
  qa_num_facts: tuple[int, int] = (8, 24)
  qa_distractors: str = "shared"  # the QA level the models were trained on (data/qa_synthetic.py)
  qa_answer_style: str = "bare"
  num_code: int = 32
  code_context_chars: tuple[int, int] = (256, 1024)
  qa_max_new_tokens: int = 6
  code_max_new_tokens: int = 24  # also the teacher-forced window of code_token_acc
  batch_size: int = 16
  buckets: tuple[int, ...] | None = None  # prompt lengths padded to; None: powers of two from 64
  kv_error_examples: int = 8
  seed: int = 1234  # far from the training seeds, so eval QA documents are unseen

  def to_dict(self) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(self)))


# ---------------------------------------------------------------------------------------------- tasks


@dataclasses.dataclass
class Example:
  prompt_ids: list[int]
  lead: str  # whitespace cut off the end of the context: the model must emit it before the target
  target: str  # the QA answer, or the code line
  gold_ids: list[int]  # tokens of lead + target, for teacher forcing


@dataclasses.dataclass
class Task:
  name: str  # qa | qa_2hop | code
  examples: list[Example]
  max_new_tokens: int

  @property
  def mean_prompt_len(self) -> float:
    return float(np.mean([len(e.prompt_ids) for e in self.examples]))


def make_example(tok, context: str, target: str) -> Example:
  """Tokenizes context + target together and cuts the prompt at the last token boundary before the context's
  trailing whitespace, so prompt and continuation are tokenized exactly as in training text."""
  text = context + target + "\n"
  enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
  ids, offsets = enc["input_ids"], enc["offset_mapping"]
  keep = len(context.rstrip())
  k = sum(1 for _, end in offsets if end <= keep)
  cut = offsets[k - 1][1] if k else 0
  end = len(context) + len(target)
  gold = [i for i, (start, _) in zip(ids[k:], offsets[k:]) if start < end]
  bos = [tok.bos_token_id] if tok.bos_token_id is not None else []  # training documents start with BOS
  return Example(prompt_ids=bos + ids[:k], lead=context[cut:], target=target, gold_ids=gold)


def make_tasks(tok, ec: EvalConfig) -> list[Task]:
  tasks = []
  for name, hops in (("qa", 1), ("qa_2hop", 2)):
    data = qa_synthetic.make_dataset(ec.num_qa, ec.seed + hops, ec.qa_num_facts, hops=hops,
                                     distractors=ec.qa_distractors, answer_style=ec.qa_answer_style)
    tasks.append(Task(name, [make_example(tok, d["prompt"], d["completion"]) for d in data], ec.qa_max_new_tokens))
  lo, hi = ec.code_context_chars
  code = code_corpus.next_line_examples("test", ec.num_code, ec.seed, min_context_chars=lo, max_context_chars=hi)
  tasks.append(Task("code", [make_example(tok, c, line) for c, line in code], ec.code_max_new_tokens))
  return tasks


def newline_counts(tok, vocab_size: int) -> np.ndarray:
  """Newlines in each token's text. Byte-level BPE never splits '\\n', so counts of a sequence add up."""
  out = np.zeros(vocab_size, np.int32)
  for i in range(min(len(tok), vocab_size)):
    out[i] = tok.decode([i]).count("\n")
  return out


# ---------------------------------------------------------------------------------------------- decoding


def greedy_lines(method: methods.Method, tokens_BT, starts_B, max_len: int, max_new_tokens: int,
                 newlines_allowed_B, nl_counts) -> np.ndarray:
  """[B, n] greedy tokens; a row is done once it has emitted more newlines than newlines_allowed_B[row]."""
  logits, state = method.prefill(jnp.asarray(tokens_BT), jnp.asarray(starts_B), max_len)
  out, seen = [], np.zeros(tokens_BT.shape[0], np.int32)
  for i in range(max_new_tokens):
    nxt = np.asarray(jnp.argmax(logits, -1)).astype(np.int32)
    out.append(nxt)
    seen += nl_counts[nxt]
    if (seen > newlines_allowed_B).all() or i == max_new_tokens - 1:
      break
    logits, state = method.step(jnp.asarray(nxt[:, None]), state)
  return np.stack(out, 1)


def teacher_forced(method: methods.Method, tokens_BT, starts_B, max_len: int, gold_BC) -> np.ndarray:
  """[B, C] argmax predictions of each gold token given the prompt and the gold prefix (cache of max_len)."""
  logits, state = method.prefill(jnp.asarray(tokens_BT), jnp.asarray(starts_B), max_len)
  preds = [np.asarray(jnp.argmax(logits, -1))]
  for j in range(gold_BC.shape[1] - 1):
    logits, state = method.step(jnp.asarray(gold_BC[:, j:j + 1]), state)
    preds.append(np.asarray(jnp.argmax(logits, -1)))
  return np.stack(preds, 1)


def _prediction(tok, ex: Example, gen_ids) -> str | None:
  """The generated target (first line after the lead), or None when the lead itself was not reproduced."""
  text = tok.decode([int(t) for t in gen_ids])
  if not text.startswith(ex.lead):
    return None
  return text[len(ex.lead):].split("\n", 1)[0]


def _batches(task: Task, batch_size: int):
  """Index batches of equal row count (short last batch padded by repeating its first row), shortest first."""
  order = sorted(range(len(task.examples)), key=lambda i: len(task.examples[i].prompt_ids))
  for s in range(0, len(order), batch_size):
    idx = order[s:s + batch_size]
    yield idx, idx + [idx[0]] * (batch_size - len(idx))


def _pad(rows: list[list[int]], width: int, pad_id: int) -> np.ndarray:
  out = np.full((len(rows), width), pad_id, np.int32)
  for b, r in enumerate(rows):
    out[b, :min(len(r), width)] = r[:width]
  return out


def evaluate_method(method: methods.Method, tasks: list[Task], tok, ec: EvalConfig, pad_id: int,
                    nl_counts) -> dict[str, float]:
  headroom = max(ec.qa_max_new_tokens, ec.code_max_new_tokens)  # one cache size per bucket across tasks
  metrics = {}
  for task in tasks:
    hits, tok_right, tok_total = 0, 0, 0
    for idx, padded in _batches(task, ec.batch_size):
      exs = [task.examples[i] for i in padded]
      bucket = generation.bucket_length(max(len(e.prompt_ids) for e in exs), ec.buckets)
      tokens, starts = generation.pad_prompts([e.prompt_ids for e in exs], pad_id, bucket)
      allowed = np.array([e.lead.count("\n") for e in exs], np.int32)
      gen = greedy_lines(method, tokens, starts, bucket + headroom, task.max_new_tokens, allowed, nl_counts)
      for b in range(len(idx)):
        pred = _prediction(tok, exs[b], gen[b])
        if task.name == "code":
          hits += pred == exs[b].target
        else:
          # either answer style: the value a generation ends on must be the gold value
          hits += pred is not None and qa_synthetic.exact_match(qa_synthetic.extract_value(pred),
                                                                qa_synthetic.extract_value(exs[b].target))
      if task.name == "code":
        gold = _pad([e.gold_ids for e in exs], headroom, pad_id)
        preds = teacher_forced(method, tokens, starts, bucket + headroom, gold)
        for b in range(len(idx)):
          n = min(len(exs[b].gold_ids), headroom)
          tok_right += int((preds[b, :n] == gold[b, :n]).sum())
          tok_total += n
    n = len(task.examples)
    if task.name == "code":
      metrics["code_line_em"] = hits / n
      metrics["code_token_acc"] = tok_right / max(tok_total, 1)
    else:
      metrics[f"{task.name}_em"] = hits / n
  return metrics


# ---------------------------------------------------------------------------------------------- methods


@dataclasses.dataclass(frozen=True)
class MethodSpec:
  """`METHOD[:AUX][@PATH][;KEY=VALUE]...`: which builder, which aux label, which checkpoint, which settings.

  Settings go to the row's `settings` (for kvp they describe a trained variant; other builders may read them
  as arguments). Values are parsed as JSON where they can be (so 2 is an int), else kept as strings.
  """
  method: str
  aux: str | None = None
  path: str | None = None
  settings: tuple[tuple[str, Any], ...] = ()

  @classmethod
  def parse(cls, text: str) -> "MethodSpec":
    head, *pairs = text.strip().split(";")
    head, _, path = head.partition("@")
    method, _, aux = head.partition(":")
    settings = []
    for p in pairs:
      k, eq, v = p.partition("=")
      if not eq or not k:
        raise ValueError(f"method spec {text!r}: setting {p!r} is not KEY=VALUE")
      try:
        v = json.loads(v)
      except json.JSONDecodeError:
        pass
      settings.append((k.strip(), v))
    if method not in BUILDERS:
      raise ValueError(f"method spec {text!r}: unknown method {method!r}; known: {sorted(BUILDERS)}")
    return cls(method, aux or None, path or None, tuple(settings))

  def __str__(self) -> str:
    s = self.method + (f":{self.aux}" if self.aux else "") + (f"@{self.path}" if self.path else "")
    return s + "".join(f";{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in self.settings)


class Models:
  """Loads each checkpoint once; every kvp workdir must have been trained against this base."""

  def __init__(self, base_checkpoint: str):
    self.base_path = str(base_checkpoint)
    self.base = checkpointing.load_model(base_checkpoint)
    self._models, self._kvps = {}, {}

  def model(self, path: str):
    if path not in self._models:
      self._models[path] = checkpointing.load_model(path)
    return self._models[path]

  def kvp(self, path: str):
    if path not in self._kvps:
      kcfg, base, kp = checkpointing.load_kvp(path, base_params=self.base[1])
      if kcfg.base != self.base[0]:
        raise ValueError(f"{path} was trained against another base than {self.base_path}")
      self._kvps[path] = (kcfg, base, kp)
    return self._kvps[path]


def _needs_path(spec: MethodSpec) -> str:
  if not spec.path:
    raise ValueError(f"method {spec.method!r} needs a checkpoint: write it as {spec.method}:AUX@PATH")
  return spec.path


def _settings(spec: MethodSpec) -> dict:
  return dict(spec.settings)


def _lazyllm(spec: MethodSpec, models: Models) -> methods.Method:
  from kvp_jax import pruning  # imported when used: a method's module never slows or breaks the others
  kw = _settings(spec)
  if isinstance(kw.get("schedule"), str):
    kw["schedule"] = pruning.parse_schedule(kw["schedule"])
  return pruning.lazyllm_method(*models.base, **kw)


def _pruned(fn: str) -> Callable[[MethodSpec, Models], methods.Method]:
  def build(spec: MethodSpec, models: Models) -> methods.Method:
    from kvp_jax import pruning
    return getattr(pruning, fn)(*models.base, **_settings(spec))
  return build


def _recompute(spec: MethodSpec, models: Models) -> methods.Method:
  from kvp_jax import recompute
  return recompute.recompute_method(*models.kvp(_needs_path(spec)), aux=spec.aux, **_settings(spec))


def _described(m: methods.Method, spec: MethodSpec) -> methods.Method:
  return dataclasses.replace(m, settings={**m.settings, **dict(spec.settings)})


BUILDERS: dict[str, Callable[[MethodSpec, Models], methods.Method]] = {
    "base": lambda s, ms: methods.model_method("base", *(ms.model(s.path) if s.path else ms.base)),
    "aux_only": lambda s, ms: _described(methods.model_method("aux_only", *ms.model(_needs_path(s)), aux=s.aux), s),
    "lp_alone": lambda s, ms: _described(methods.model_method("lp_alone", *ms.model(_needs_path(s)), aux=s.aux), s),
    "kvp": lambda s, ms: _described(methods.kvp_method(*ms.kvp(_needs_path(s)), aux=s.aux), s),
    # These read their settings as arguments (e.g. "random_prune;keep=0.5", "kvp_recompute:lp0.50@DIR;
    # num_intervals=2;interval_size=16", "lazyllm;schedule=1:0.7,2:0.5").
    "kvp_recompute": _recompute,
    "lazyllm": _lazyllm,
    "random_prune": _pruned("random_prune_method"),
    "static_prune": _pruned("static_prune_method"),
}


# ---------------------------------------------------------------------------------------------- report


def kv_errors(models: Models, specs: list[MethodSpec], task: Task, pad_id: int, n: int) -> dict[str, dict]:
  """Per-layer mean |K_pred - K_base| and |V_pred - V_base| over n prompts of `task`, per kvp spec."""
  exs = task.examples[:n]
  bucket = generation.bucket_length(max(len(e.prompt_ids) for e in exs))
  tokens, starts = generation.pad_prompts([e.prompt_ids for e in exs], pad_id, bucket)
  out = {}
  for s in specs:
    kcfg, base, kp = models.kvp(s.path)
    pred, true = kvp.predicted_and_true_cache(kcfg, base, kp, jnp.asarray(tokens), jnp.asarray(starts), bucket)
    err = kvp.layer_errors(pred, true)
    out[_label(s)] = {"k": np.asarray(err["k"]).tolist(), "v": np.asarray(err["v"]).tolist()}
  return out


def _label(spec: MethodSpec) -> str:
  extra = ",".join(f"{k}={v}" for k, v in spec.settings)
  return spec.method + (f"[{spec.aux}]" if spec.aux else "") + (f"({extra})" if extra else "")


def gap_recovered(results: list[dict]) -> dict[str, dict[str, float | None]]:
  """Per aux and metric: (kvp - aux alone) / (base - aux alone), for the plain kvp rows (no settings).

  'aux alone' is the aux_only row of that aux, else its lp_alone row; None where base equals it.
  """
  base = next((r for r in results if r["method"] == "base"), None)
  out = {}
  for r in results:
    if r["method"] != "kvp" or r.get("settings") or base is None:
      continue
    ref = next((b for m in BASELINE_METHODS for b in results if b["method"] == m and b.get("aux") == r["aux"]
                and not b.get("settings")), None)
    if ref is None:
      continue
    out[r["aux"]] = {}
    for t in r["metrics"]:
      den = base["metrics"][t] - ref["metrics"][t]
      out[r["aux"]][t] = None if abs(den) < 1e-12 else (r["metrics"][t] - ref["metrics"][t]) / den
  return out


def equal_flops(results: list[dict]) -> list[dict]:
  """For every kvp row and metric: its value, its own aux alone (the paper's equal FLOPs), and the best of base /
  aux_only / lp_alone spending at most the kvp row's TTFT FLOPs (ours)."""
  baselines = [r for r in results if r["method"] in ("base",) + BASELINE_METHODS and not r.get("settings")]
  out = []
  for r in results:
    if r["method"] != "kvp":
      continue
    ref = next((b for b in baselines if b["method"] in BASELINE_METHODS and b.get("aux") == r["aux"]), None)
    for t, v in r["metrics"].items():
      task = TASK_OF_METRIC[t]
      f = r["ttft_flops_by_task"][task]
      cheaper = [b for b in baselines if b["ttft_flops_by_task"][task] <= f]
      best = max(cheaper, key=lambda b: b["metrics"][t], default=None)
      out.append({"label": r["label"], "aux": r["aux"], "metric": t, "kvp": v, "ttft_flops": f,
                  "aux_alone": None if ref is None else ref["metrics"][t],
                  "aux_alone_method": None if ref is None else ref["method"],
                  "best_baseline_at_most_flops": None if best is None else best["metrics"][t],
                  "best_baseline_label": None if best is None else best["label"]})
  return out


def evaluate(base_checkpoint: str, specs: list[MethodSpec], ec: EvalConfig, out_dir, *, tokenizer=None,
             log: Callable[[str], None] = print, extra_config: dict | None = None) -> dict:
  """Evaluates every spec, writes report.json, report.md, pareto.png and kv_error.png; returns the report.

  extra_config: recorded under report["config"] (the quickstart's stage fingerprints, to know when to rerun).
  """
  from kvp_jax import plots
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  tok = tok_lib.load_tokenizer(tokenizer or stages.tokenizer_dir(base_checkpoint))
  models = Models(base_checkpoint)
  pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
  tasks = make_tasks(tok, ec)
  nl_counts = newline_counts(tok, models.base[0].vocab_size)
  mean_len = {t.name: t.mean_prompt_len for t in tasks}
  overall = float(np.mean([len(e.prompt_ids) for t in tasks for e in t.examples]))
  log("eval prompts: " + ", ".join(f"{t.name} {len(t.examples)} x {mean_len[t.name]:.0f} tokens" for t in tasks))
  results = []
  for i, spec in enumerate(specs):
    t0 = time.time()
    m = BUILDERS[spec.method](spec, models)
    metrics = evaluate_method(m, tasks, tok, ec, pad_id, nl_counts)
    row = {"method": m.name, "label": m.label, "ttft_flops": m.ttft_flops(round(overall)),
           "ttft_flops_paper": m.ttft_flops_paper(round(overall)),
           "ttft_flops_by_task": {k: m.ttft_flops(round(n)) for k, n in mean_len.items()},
           "ttft_flops_paper_by_task": {k: m.ttft_flops_paper(round(n)) for k, n in mean_len.items()},
           "metrics": metrics, "eval_s": time.time() - t0, "spec": str(spec)}
    if m.aux is not None:
      row["aux"] = m.aux
    if m.settings:
      row["settings"] = m.settings
    results.append(row)
    log(f"  [{i + 1}/{len(specs)}] {m.label}: " + " ".join(f"{k} {v:.3f}" for k, v in metrics.items())
        + f" ({row['eval_s']:.1f}s)")
  kvp_specs = [s for s in specs if s.method == "kvp"]
  qa = next(t for t in tasks if t.name == "qa")
  report = {
      "tasks": [k for k in METRICS if any(k in r["metrics"] for r in results)],
      "results": results,
      "gap_recovered": gap_recovered(results),
      "equal_flops": equal_flops(results),
      "kv_error": kv_errors(models, kvp_specs, qa, pad_id, ec.kv_error_examples) if kvp_specs else {},
      "prompt_len_mean": mean_len,
      "prompt_len_mean_all": overall,
      "config": {"eval": ec.to_dict(), "base_checkpoint": str(base_checkpoint), "methods": [str(s) for s in specs],
                 **(extra_config or {})},
      "env": {"jax": jax.__version__, "backend": jax.default_backend(), "python": sys.version.split()[0]},
  }
  write_report(report, out_dir)
  plots.pareto(report, out_dir / "pareto.png")
  plots.kv_error(report, out_dir / "kv_error.png")
  return report


def write_report(report: dict, out_dir: Path):
  checkpointing.write_json(out_dir / "report.json", report)
  (out_dir / "report.md").write_text(markdown(report) + "\n")


def _fmt(v) -> str:
  return "-" if v is None else f"{v:.3f}"


def markdown(report: dict) -> str:
  """The main table (one row per method), then the closing figures: equal-FLOPs comparison and gap recovered."""
  tasks, rows = report["tasks"], report["results"]
  base = next((r for r in rows if r["method"] == "base"), None)
  lines = [f"TTFT FLOPs per prompt at the mean prompt length ({report['prompt_len_mean_all']:.0f} tokens); "
           "speed-up = base FLOPs / method FLOPs (ours).", "",
           "| method | aux | settings | TTFT GFLOPs (ours) | TTFT GFLOPs (paper) | speed-up | "
           + " | ".join(tasks) + " |", "|" + "---|" * (6 + len(tasks))]
  for r in rows:
    settings = ",".join(f"{k}={v}" for k, v in r.get("settings", {}).items()) or "-"
    speed = f"{base['ttft_flops'] / r['ttft_flops']:.2f}x" if base else "-"
    lines.append(f"| {r['method']} | {r.get('aux', '-')} | {settings} | {r['ttft_flops'] / 1e9:.4g} | "
                 f"{r['ttft_flops_paper'] / 1e9:.4g} | {speed} | "
                 + " | ".join(_fmt(r["metrics"].get(t)) for t in tasks) + " |")
  eq = report.get("equal_flops", [])
  if eq:
    lines += ["", "At equal TTFT FLOPs: KV Prediction, its aux alone (equal FLOPs as the paper counts them), and "
              "the best of base / aux alone / LP alone spending no more FLOPs than it (ours).", "",
              "| kvp | metric | kvp | aux alone | best baseline at <= FLOPs |", "|---|---|---|---|---|"]
    for e in eq:
      best = "-" if e["best_baseline_label"] is None else (
          f"{_fmt(e['best_baseline_at_most_flops'])} ({e['best_baseline_label']})")
      alone = "-" if e["aux_alone"] is None else f"{_fmt(e['aux_alone'])} ({e['aux_alone_method']})"
      lines.append(f"| {e['label']} | {e['metric']} | {_fmt(e['kvp'])} | {alone} | {best} |")
  gap = report.get("gap_recovered", {})
  if gap:
    lines += ["", "Share of the aux-to-base gap KV Prediction recovers, (kvp - aux alone) / (base - aux alone):", "",
              "| aux | " + " | ".join(tasks) + " |", "|" + "---|" * (1 + len(tasks))]
    for aux, g in gap.items():
      lines.append(f"| {aux} | " + " | ".join(_fmt(g.get(t)) for t in tasks) + " |")
  return "\n".join(lines)
