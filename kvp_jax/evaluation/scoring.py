"""Scoring one TTFT method on the tasks: greedy answers, teacher-forced token accuracy, and the first token's
agreement with the base's (per example, so the report can give standard errors and paired differences).

Generation stops once a row has emitted more newlines than its prompt's lead holds, or its task's stop token.
Prompts are batched, left-padded to a bucket (generation.pad_prompts); every batch of a task has the same row
count and every cache the same headroom, so each method compiles one program per bucket.
Shape legend: see kvp_jax/models/config.py; here also C gold tokens.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from kvp_jax.data import qa_synthetic
from kvp_jax.evaluation import stats
from kvp_jax.evaluation.tasks import EvalConfig, Example, Task
from kvp_jax.models import generation
from kvp_jax.ttft import method as ttft


def greedy_lines(method: ttft.Method, tokens_BT, starts_B, max_len: int, max_new_tokens: int,
                 newlines_allowed_B, nl_counts, stop_ids=(), *, first_logits: list | None = None) -> np.ndarray:
  """[B, n] greedy tokens; a row is done once it has emitted more newlines than newlines_allowed_B[row], or one
  of `stop_ids`. first_logits: a list the first step's logits [B, V] are appended to (for fidelity)."""
  logits, state = method.prefill(jnp.asarray(tokens_BT), jnp.asarray(starts_B), max_len)
  if first_logits is not None:
    first_logits.append(np.asarray(logits, np.float32))
  out, seen = [], np.zeros(tokens_BT.shape[0], np.int32)
  stopped = np.zeros(tokens_BT.shape[0], bool)
  stops = np.asarray(list(stop_ids), np.int32)
  for i in range(max_new_tokens):
    nxt = np.asarray(jnp.argmax(logits, -1)).astype(np.int32)
    out.append(nxt)
    seen += nl_counts[nxt]
    stopped |= np.isin(nxt, stops)
    if ((seen > newlines_allowed_B) | stopped).all() or i == max_new_tokens - 1:
      break
    logits, state = method.step(jnp.asarray(nxt[:, None]), state)
  return np.stack(out, 1)


def teacher_forced(method: ttft.Method, tokens_BT, starts_B, max_len: int, gold_BC, *,
                   first_logits: list | None = None) -> np.ndarray:
  """[B, C] argmax predictions of each gold token given the prompt and the gold prefix (cache of max_len)."""
  logits, state = method.prefill(jnp.asarray(tokens_BT), jnp.asarray(starts_B), max_len)
  if first_logits is not None:
    first_logits.append(np.asarray(logits, np.float32))
  preds = [np.asarray(jnp.argmax(logits, -1))]
  for j in range(gold_BC.shape[1] - 1):
    logits, state = method.step(jnp.asarray(gold_BC[:, j:j + 1]), state)
    preds.append(np.asarray(jnp.argmax(logits, -1)))
  return np.stack(preds, 1)


def _prediction(tok, ex: Example, gen_ids, stop_ids=()) -> str | None:
  """The generated target (first line after the lead, up to a stop token), or None when the lead itself was not
  reproduced."""
  ids = [int(t) for t in gen_ids]
  cut = next((i for i, t in enumerate(ids) if t in stop_ids), len(ids))
  text = tok.decode(ids[:cut])
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


def _log_softmax(x_BV):
  x = x_BV.astype(np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


@dataclasses.dataclass
class Scores:
  """Per-example scores of one method, in each task's example order: `values` metric -> [n] (for a ratio metric
  the numerators), `den` ratio metric -> [n] denominators, `first` task -> [n, V] first-token log-probabilities
  (only when asked for: the base's, the reference of every other method's fidelity)."""
  values: dict[str, np.ndarray]
  den: dict[str, np.ndarray]
  first: dict[str, np.ndarray] | None = None

  def summary(self) -> tuple[dict[str, float], dict[str, float], dict[str, int]]:
    """(metric -> value, metric -> standard error, metric -> number of examples)."""
    est = {k: stats.estimate(v, self.den.get(k)) for k, v in self.values.items()}
    return ({k: e[0] for k, e in est.items()}, {k: e[1] for k, e in est.items()},
            {k: int(len(v)) for k, v in self.values.items()})


def score_method(method: ttft.Method, tasks: list[Task], tok, ec: EvalConfig, pad_id: int, nl_counts, *,
                 reference: dict[str, np.ndarray] | None = None, keep_first: bool = False) -> Scores:
  """Every task's per-example scores. reference: task -> the base's first-token log-probabilities [n, V]; with
  it, fidelity (first_token_agree, first_token_kl) is scored over the prompts of every task."""
  headroom = max(ec.qa_max_new_tokens, ec.code_max_new_tokens)  # one cache size per bucket across tasks
  values, den, first = {}, {}, {}
  agree, kl = [], []
  for task in tasks:
    n = len(task.examples)
    hits, right, total, agree_t, kl_t = (np.zeros(n) for _ in range(5))
    first_task = np.zeros((0,), np.float32)
    greedy = task.name != "code" or ec.code_line_em
    for idx, padded in _batches(task, ec.batch_size):
      exs = [task.examples[i] for i in padded]
      bucket = generation.bucket_length(max(len(e.prompt_ids) for e in exs), ec.buckets)
      tokens, starts = generation.pad_prompts([e.prompt_ids for e in exs], pad_id, bucket)
      firsts = []
      if greedy:
        allowed = np.array([e.lead.count("\n") for e in exs], np.int32)
        gen = greedy_lines(method, tokens, starts, bucket + headroom, task.max_new_tokens, allowed, nl_counts,
                           task.stop_ids, first_logits=firsts)
        for b, i in enumerate(idx):
          pred = _prediction(tok, exs[b], gen[b], task.stop_ids)
          if task.name == "code":
            hits[i] = pred == exs[b].target
          else:
            # either answer style: the value a generation ends on must be the gold value
            hits[i] = pred is not None and qa_synthetic.exact_match(qa_synthetic.extract_value(pred),
                                                                    qa_synthetic.extract_value(exs[b].target))
      if task.name == "code":
        gold = _pad([e.gold_ids for e in exs], headroom, pad_id)
        preds = teacher_forced(method, tokens, starts, bucket + headroom, gold,
                               first_logits=None if greedy else firsts)
        for b, i in enumerate(idx):
          c = min(len(exs[b].gold_ids), headroom)
          right[i], total[i] = int((preds[b, :c] == gold[b, :c]).sum()), c
      logp = _log_softmax(firsts[0][:len(idx)])
      if keep_first:
        if first_task.size == 0:
          first_task = np.zeros((n, logp.shape[-1]), np.float32)
        first_task[idx] = logp
      if reference is not None:
        ref = reference[task.name][idx].astype(np.float64)
        agree_t[idx] = np.argmax(logp, -1) == np.argmax(ref, -1)
        kl_t[idx] = np.sum(np.exp(ref) * (ref - logp), -1)
    if task.name == "code":
      if ec.code_line_em:
        values["code_line_em"] = hits
      values["code_token_acc"], den["code_token_acc"] = right, total
    else:
      values[f"{task.name}_em"] = hits
    if keep_first:
      first[task.name] = first_task
    agree.append(agree_t)
    kl.append(kl_t)
  if reference is not None:
    values["first_token_agree"] = np.concatenate(agree)
    values["first_token_kl"] = np.maximum(np.concatenate(kl), 0.0)  # >= 0 up to rounding
  return Scores(values, den, first if keep_first else None)


def evaluate_method(method: ttft.Method, tasks: list[Task], tok, ec: EvalConfig, pad_id: int,
                    nl_counts) -> dict[str, float]:
  """Every metric's value (the per-example scores and their errors: `score_method`)."""
  return score_method(method, tasks, tok, ec, pad_id, nl_counts).summary()[0]
