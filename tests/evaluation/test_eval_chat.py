"""The real-model evaluation on a tiny chat tokenizer: chat-template QA prompts, answers read up to the end-of-turn
token, fidelity to the base (first-token agreement and KL) against numbers computed by hand, standard errors and
paired differences by hand, and the report's columns for them."""

import functools

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import chat_tokenizer

from kvp_jax.data import qa_synthetic
from kvp_jax.evaluation import report as eval_report
from kvp_jax.evaluation import scoring, stats
from kvp_jax.evaluation import tasks as eval_tasks
from kvp_jax.evaluation.tasks import EvalConfig
from kvp_jax.ttft import method as ttft

EC = EvalConfig(num_qa=5, qa_levels=("easy", "2hop"), num_code=4, code_context_chars=(64, 160), qa_max_new_tokens=28,
                code_max_new_tokens=8, batch_size=4, buckets=(1024,), fidelity=True, code_line_em=False,
                add_bos=False)


@functools.lru_cache(maxsize=None)
def tok():
  return chat_tokenizer()


@functools.lru_cache(maxsize=None)
def tasks():
  return eval_tasks.make_tasks(tok(), EC)


def test_standard_errors_by_hand():
  assert stats.mean_se([1, 0, 1, 1]) == pytest.approx((0.75, 0.25))
  # clustered ratio: p = 3/8; residuals r - p t = .25, 1.25, -1.5; sqrt(3/2 * 3.875) / 8
  assert stats.ratio_se([1, 2, 0], [2, 2, 4]) == pytest.approx((3 / 8, np.sqrt(1.5 * 3.875) / 8))
  # paired: the differences 1, 0, 0, 1
  assert stats.paired_difference([1, 1, 0, 1], [0, 1, 0, 0]) == pytest.approx((0.5, np.sqrt(1 / 3) / 2))
  d, se = stats.paired_difference([1, 2, 0], [0, 2, 1], [2, 2, 4])
  assert d == pytest.approx(0.0) and se > 0
  with pytest.raises(ValueError, match="same examples"):
    stats.paired_difference([1, 0], [1])


def test_chat_prompts_go_through_the_template_and_stop_at_end_of_turn():
  t = tok()
  names = [x.name for x in tasks()]
  assert names == ["qa_easy", "qa_2hop", "code"]
  for task in tasks()[:2]:
    assert task.stop_ids == (t.eos_token_id,) and task.max_new_tokens == 28
    for e in task.examples:
      text = t.decode(e.prompt_ids)
      assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_end|>\n<|im_start|>assistant\n")
      assert e.prompt_ids[0] == t.bos_token_id and e.prompt_ids[1] != t.bos_token_id  # no extra BOS
      assert "\nQuestion: What is the " in text and e.lead == ""
      assert qa_synthetic.extract_value(e.target) in text  # the answer is in the context
  easy, two = tasks()[0].examples, tasks()[1].examples
  assert all(8 <= t.decode(e.prompt_ids).count(" is ") - 1 <= 20 for e in easy)  # 8-20 facts, "is" per fact
  assert all(" works at " in e.target for e in two)
  code = tasks()[2]
  assert code.stop_ids == () and all(e.prompt_ids[0] != t.bos_token_id for e in code.examples)  # add_bos=False
  with pytest.raises(ValueError, match="chat template"):
    from kvp_jax.data import tokenizer as tok_lib
    plain = tok_lib.train_tokenizer(["some text to train on, twice", "some text"], 300)
    eval_tasks.make_tasks(plain, EC)


def _onehot(ids, V, scale=30.0):
  return jnp.asarray(np.eye(V, dtype=np.float32)[np.asarray(ids)] * scale)


def replying(task, replies: dict, V: int) -> ttft.Method:
  """Emits, for example i, the token ids replies[i]; rows are identified by their unpadded prompt."""
  by_prompt = {tuple(e.prompt_ids): i for i, e in enumerate(task.examples)}

  def prefill(tokens, starts, max_len):
    tokens, starts = np.asarray(tokens), np.asarray(starts)
    seqs = [replies[by_prompt[tuple(tokens[b, starts[b]:].tolist())]] for b in range(tokens.shape[0])]
    return _onehot([s[0] for s in seqs], V), (seqs, 1)

  def step(tokens, state):
    seqs, j = state
    return _onehot([s[min(j, len(s) - 1)] for s in seqs], V), (seqs, j + 1)

  return ttft.Method("replying", None, prefill, step, lambda n: 1.0, lambda n: 1.0)


def test_chat_answers_are_read_up_to_the_end_of_turn_token():
  t = tok()
  task = tasks()[0]
  eos = t.eos_token_id
  enc = lambda s: t(s, add_special_tokens=False)["input_ids"]
  exs = task.examples
  value = lambda e: qa_synthetic.extract_value(e.target)
  replies = {
      0: enc(exs[0].target) + [eos] + enc(" 1234"),  # right; what follows the end of turn is never read
      1: enc(f"The answer is {value(exs[1])}") + [eos],  # right: the value is read from any sentence
      2: enc(f"{value(exs[2])} or maybe 1000") + [eos],  # wrong: the last number counts
      3: enc("I do not know.") + [eos],  # wrong: no number
      4: enc(f"Well,\n{value(exs[4])}") + [eos],  # wrong: only the first line is read
  }
  nl = eval_tasks.newline_counts(t, len(t))
  sc = scoring.score_method(replying(task, replies, len(t)), [task], t, EC, t.pad_token_id, nl)
  np.testing.assert_array_equal(sc.values["qa_easy_em"], [1, 1, 0, 0, 0])
  value_, se, n = (x["qa_easy_em"] for x in sc.summary())
  assert (value_, n) == (0.4, 5) and se == pytest.approx(np.std([1, 1, 0, 0, 0], ddof=1) / np.sqrt(5))


def test_fidelity_is_agreement_and_kl_of_the_first_token_against_the_base():
  t = tok()
  V = len(t)
  rng = np.random.default_rng(0)
  all_tasks = tasks()
  ref_logits = {x.name: rng.standard_normal((len(x.examples), V)).astype(np.float32) * 3 for x in all_tasks}
  mine = {x.name: ref_logits[x.name] + rng.standard_normal((len(x.examples), V)).astype(np.float32) for x in all_tasks}
  for x in all_tasks:  # make some rows agree for sure, others disagree for sure
    mine[x.name][0] = ref_logits[x.name][0]
    mine[x.name][1] = -ref_logits[x.name][1]

  def first_logits_method(table):
    by_prompt = {tuple(e.prompt_ids): (x.name, i) for x in all_tasks for i, e in enumerate(x.examples)}

    def prefill(tokens, starts, max_len):
      tokens, starts = np.asarray(tokens), np.asarray(starts)
      rows = [by_prompt[tuple(tokens[b, starts[b]:].tolist())] for b in range(tokens.shape[0])]
      return jnp.asarray(np.stack([table[n][i] for n, i in rows])), None

    return ttft.Method("m", None, prefill, lambda tok_, st: (_onehot([t.eos_token_id] * tok_.shape[0], V), st),
                       lambda n: 1.0, lambda n: 1.0)

  nl = eval_tasks.newline_counts(t, V)
  base = scoring.score_method(first_logits_method(ref_logits), all_tasks, t, EC, t.pad_token_id, nl, keep_first=True)
  got = scoring.score_method(first_logits_method(mine), all_tasks, t, EC, t.pad_token_id, nl, reference=base.first)
  logsm = lambda x: x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)
  want_agree, want_kl = [], []
  for x in all_tasks:
    p, q = logsm(ref_logits[x.name].astype(np.float64)), logsm(mine[x.name].astype(np.float64))
    want_agree.append(p.argmax(-1) == q.argmax(-1))
    want_kl.append((np.exp(p) * (p - q)).sum(-1))
  np.testing.assert_array_equal(got.values["first_token_agree"], np.concatenate(want_agree))
  np.testing.assert_allclose(got.values["first_token_kl"], np.concatenate(want_kl), rtol=1e-4, atol=1e-5)
  n_all = sum(len(x.examples) for x in all_tasks)
  assert got.summary()[2]["first_token_kl"] == n_all
  assert got.values["first_token_kl"][0] == pytest.approx(0.0, abs=1e-5)  # identical logits
  assert got.values["first_token_agree"][0] == 1 and got.values["first_token_agree"][1] == 0


def _row(method, aux, flops, per_example):
  r = {"method": method, "label": method + (f"[{aux}]" if aux else ""), "ttft_flops": flops,
       "ttft_flops_paper": flops, "ttft_flops_by_task": {"qa_easy": flops, "all": flops},
       "ttft_flops_paper_by_task": {"qa_easy": flops, "all": flops},
       "per_example": per_example, "per_example_den": {}}
  est = {k: stats.estimate(v) for k, v in per_example.items()}
  r.update(metrics={k: e[0] for k, e in est.items()}, stderr={k: e[1] for k, e in est.items()},
           n={k: len(v) for k, v in per_example.items()})
  if aux:
    r["aux"] = aux
  return r


def test_equal_flops_gives_paired_differences_and_gap_and_markdown_shows_errors():
  rows = [_row("base", None, 100.0, {"qa_easy_em": [1, 1, 1, 0], "first_token_kl": [0, 0, 0, 0]}),
          _row("lp_alone", "lp0.50", 50.0, {"qa_easy_em": [0, 0, 1, 0], "first_token_kl": [1.0, 2.0, 1.0, 2.0]}),
          _row("kvp", "lp0.50", 40.0, {"qa_easy_em": [1, 0, 1, 0], "first_token_kl": [0.5, 1.0, 0.5, 1.0]})]
  eq = {e["metric"]: e for e in eval_report.equal_flops(rows)}
  e = eq["qa_easy_em"]
  assert e["diff_vs_aux_alone"] == pytest.approx(0.25) and e["diff_se"] == pytest.approx(0.25)
  assert e["gap_recovered"] == pytest.approx((0.5 - 0.25) / (0.75 - 0.25))
  k = eq["first_token_kl"]
  assert k["diff_vs_aux_alone"] == pytest.approx(-0.75) and k["gap_recovered"] == pytest.approx(0.5)
  report = {"tasks": ["qa_easy_em", "first_token_kl"], "results": rows, "equal_flops": list(eq.values()),
            "gap_recovered": eval_report.gap_recovered(rows), "prompt_len_mean_all": 300.0}
  md = eval_report.markdown(report)
  assert "qa_easy_em (n=4)" in md and "0.500 ± 0.289" in md and "0.250 ± 0.250" in md and "lower is better" in md
