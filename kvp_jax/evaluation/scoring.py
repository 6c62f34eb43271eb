"""Scoring one TTFT method on the tasks: greedy answers and teacher-forced token accuracy.

Generation stops once a row has emitted more newlines than its prompt's lead holds. Prompts are batched,
left-padded to a bucket (generation.pad_prompts); every batch of a task has the same row count and every cache
the same headroom, so each method compiles one program per bucket.
Shape legend: see kvp_jax/models/config.py; here also C gold tokens.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from kvp_jax.data import qa_synthetic
from kvp_jax.evaluation.tasks import EvalConfig, Example, Task
from kvp_jax.models import generation
from kvp_jax.ttft import method as ttft


def greedy_lines(method: ttft.Method, tokens_BT, starts_B, max_len: int, max_new_tokens: int,
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


def teacher_forced(method: ttft.Method, tokens_BT, starts_B, max_len: int, gold_BC) -> np.ndarray:
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


def evaluate_method(method: ttft.Method, tasks: list[Task], tok, ec: EvalConfig, pad_id: int,
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
