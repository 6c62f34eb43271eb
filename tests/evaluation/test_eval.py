"""Evaluation metrics on a tiny tokenizer and model: prompts cut on token boundaries, batched greedy and
teacher-forced decoding equal to one-prompt-at-a-time decoding, EM / token accuracy equal to counts by hand
(through an oracle method with known right and wrong rows), method specs, the report's closing figures, plots."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvp_jax.data import code_corpus, qa_synthetic
from kvp_jax.data import tokenizer as tok_lib
from kvp_jax.evaluation import plots, registry
from kvp_jax.evaluation import report as eval_report
from kvp_jax.evaluation import scoring
from kvp_jax.evaluation import tasks as eval_tasks
from kvp_jax.evaluation.registry import MethodSpec
from kvp_jax.evaluation.tasks import EvalConfig
from kvp_jax.models import generation
from kvp_jax.models import params as P
from kvp_jax.models.config import tiny_config
from kvp_jax.ttft import method as ttft

EC = EvalConfig(num_qa=6, qa_num_facts=(4, 5), num_code=6, code_context_chars=(64, 160), qa_max_new_tokens=6,
                code_max_new_tokens=12, batch_size=4, buckets=(256,))


@functools.lru_cache(maxsize=None)
def tok():
  texts = qa_synthetic.training_documents(40, seed=0, num_facts_range=(4, 8)) + code_corpus.code_documents(
      "train", 10)
  return tok_lib.train_tokenizer(texts, 400)


@functools.lru_cache(maxsize=None)
def tasks():
  return eval_tasks.make_tasks(tok(), EC)


def test_code_prompt_ends_before_the_merged_newline_and_indent():
  context, line = "def f(a):\n    x = a + 1\n", "    return x"
  ex = eval_tasks.make_example(tok(), context, line)
  assert ex.prompt_ids[0] == tok().bos_token_id
  assert ex.lead == "\n"  # "\n    " is one token in training text, so the prompt stops before it
  assert tok().decode(ex.prompt_ids[1:]) + ex.lead == context
  assert tok().decode(ex.gold_ids) == ex.lead + line
  qa = eval_tasks.make_example(tok(), "Question: Who?\nAnswer:", " 4827")
  assert qa.lead == "" and tok().decode(qa.gold_ids) == " 4827"


def test_tasks_have_the_configured_sizes_and_fit_the_bucket():
  names = [t.name for t in tasks()]
  assert names == ["qa", "qa_2hop", "code"]
  for t in tasks():
    assert len(t.examples) == 6
    assert max(len(e.prompt_ids) for e in t.examples) <= EC.buckets[0]


# ---------------------------------------------------------------------------------------------- oracle


def _onehot(ids, V):
  return jnp.asarray(np.eye(V, dtype=np.float32)[np.asarray(ids)])


def oracle(task, wrong: set, V: int, bad_token: int, newline: int) -> ttft.Method:
  """Emits each example's gold tokens then a newline; rows of `wrong` examples emit `bad_token` throughout.

  It identifies a row by its unpadded prompt, so it also checks that batching hands every row its own prompt.
  """
  by_prompt = {tuple(e.prompt_ids): i for i, e in enumerate(task.examples)}

  def seq(i):
    e = task.examples[i]
    return [bad_token] * 64 if i in wrong else e.gold_ids + [newline] * 64

  def prefill(tokens, starts, max_len):
    tokens, starts = np.asarray(tokens), np.asarray(starts)
    seqs = [seq(by_prompt[tuple(tokens[b, starts[b]:].tolist())]) for b in range(tokens.shape[0])]
    return _onehot([s[0] for s in seqs], V), (seqs, 1)

  def step(tokens, state):
    seqs, j = state
    return _onehot([s[j] for s in seqs], V), (seqs, j + 1)

  return ttft.Method("oracle", None, prefill, step, lambda n: 1.0, lambda n: 1.0)


def test_em_and_token_accuracy_equal_counts_by_hand():
  V = len(tok())
  newline = tok().encode("\n")[0]
  bad = tok().encode("@")[0]
  nl = eval_tasks.newline_counts(tok(), V)
  assert nl[newline] == 1 and nl[bad] == 0
  wrong = {1, 4}
  for task in tasks():
    assert all(bad not in e.gold_ids for e in task.examples)
    m = oracle(task, wrong, V, bad, newline)
    got = scoring.evaluate_method(m, [task], tok(), EC, tok().pad_token_id, nl)
    n = len(task.examples)
    # A right row scores if its whole target fits the token budget (a newline after it is not needed).
    right = [i for i, e in enumerate(task.examples) if i not in wrong and len(e.gold_ids) <= task.max_new_tokens]
    if task.name == "code":
      assert 0 < len(right) < n - len(wrong)  # both cases occur: these lines run from 9 to 77 tokens
      assert got["code_line_em"] == pytest.approx(len(right) / n)
      cap = max(EC.qa_max_new_tokens, EC.code_max_new_tokens)
      lens = [min(len(e.gold_ids), cap) for e in task.examples]
      assert got["code_token_acc"] == pytest.approx(sum(l for i, l in enumerate(lens) if i not in wrong) / sum(lens))
    else:
      assert got == {f"{task.name}_em": pytest.approx(len(right) / n)}
      assert len(right) == n - len(wrong)

# ---------------------------------------------------------------------------------------------- a real model


@functools.lru_cache(maxsize=None)
def tiny():
  cfg = tiny_config(vocab_size=len(tok()), num_layers=2, max_position_embeddings=512)
  return cfg, P.init(cfg, jax.random.PRNGKey(3))


def _batch(exs, bucket):
  return generation.pad_prompts([e.prompt_ids for e in exs], tok().pad_token_id, bucket)


def test_batched_greedy_equals_one_prompt_at_a_time():
  cfg, params = tiny()
  m = ttft.model_method("base", cfg, params)
  exs = [tasks()[0].examples[0], tasks()[2].examples[0], tasks()[2].examples[1]]
  tokens, starts = _batch(exs, 256)
  n = 6
  nl = eval_tasks.newline_counts(tok(), cfg.vocab_size)
  gen = scoring.greedy_lines(m, tokens, starts, 256 + n, n, np.full(3, 99), nl)  # 99: never stop early
  assert gen.shape == (3, n)
  for b, e in enumerate(exs):
    # One row alone, through generation's own decode loop; one bucket, so one compile for all rows.
    alone = generation.generate(cfg, params, np.asarray([e.prompt_ids]), n, buckets=(256,))[0, len(e.prompt_ids):]
    np.testing.assert_array_equal(gen[b], alone)


def test_every_decode_step_donates_its_state():
  """A step that keeps its input state alive copies the whole cache per token (SmolLM2, B=16: 1.5x the step)."""
  from kvp_jax.baselines import pruning
  cfg, params = tiny()
  tokens = jnp.asarray(np.random.default_rng(0).integers(1, cfg.vocab_size, (2, 32)), jnp.int32)
  starts = jnp.asarray([0, 5], jnp.int32)
  methods = [ttft.model_method("base", cfg, params), pruning.lazyllm_method(cfg, params, ((1, 0.5),)),
             pruning.random_prune_method(cfg, params, 0.5), pruning.static_prune_method(cfg, params, 0.5)]
  for m in methods:
    logits, state = m.prefill(tokens, starts, 40)
    nxt = jnp.argmax(logits, -1).astype(jnp.int32)[:, None]
    _, after = m.step(nxt, state)
    big = [x for x in jax.tree.leaves(state) if x.size > 64]  # the caches, not the scalar end / positions
    assert big and all(x.is_deleted() for x in big), m.name
    assert not any(x.is_deleted() for x in jax.tree.leaves(after)), m.name


def test_batched_teacher_forcing_equals_full_forward_argmax():
  cfg, params = tiny()
  m = ttft.model_method("base", cfg, params)
  exs = tasks()[2].examples[:3]
  tokens, starts = _batch(exs, 256)
  C = 5
  gold = np.stack([np.asarray((e.gold_ids + [0] * C)[:C], np.int32) for e in exs])
  preds = scoring.teacher_forced(m, tokens, starts, 256 + C, gold)
  for b, e in enumerate(exs):
    # The plain forward pass over prompt + gold, one row alone (left-padded to one width: one compile).
    seq, start = generation.pad_prompts([e.prompt_ids + gold[b].tolist()], tok().pad_token_id, 256 + C)
    logits, _ = generation.prefill_jit(cfg, params, jnp.asarray(seq), jnp.asarray(start), max_len=256 + C,
                                       all_logits=True)
    want = np.asarray(jnp.argmax(logits[0], -1))[-C - 1:-1]
    np.testing.assert_array_equal(preds[b], want)


# ---------------------------------------------------------------------------------------------- specs, report


def test_method_spec_parses_and_round_trips():
  s = MethodSpec.parse("kvp:lp0.50@/runs/q/kvp_lp0.50;kv_reduce=sum;num_intervals=2")
  assert (s.method, s.aux, s.path) == ("kvp", "lp0.50", "/runs/q/kvp_lp0.50")
  assert dict(s.settings) == {"kv_reduce": "sum", "num_intervals": 2}
  assert MethodSpec.parse(str(s)) == s
  assert MethodSpec.parse("base") == MethodSpec("base")
  s = MethodSpec.parse("specprefill:c@/runs/q/aux_c;keep=0.3;keep_last=false")
  assert (s.aux, s.path, dict(s.settings)) == ("c", "/runs/q/aux_c", {"keep": 0.3, "keep_last": False})
  assert dict(MethodSpec.parse("lazyllm;schedule=1:0.7,2:0.5").settings) == {"schedule": "1:0.7,2:0.5"}
  with pytest.raises(ValueError, match="unknown method"):
    MethodSpec.parse("nope:c@x")
  with pytest.raises(ValueError, match="KEY=VALUE"):
    MethodSpec.parse("kvp:c@x;oops")


def _row(method, aux, flops, values, settings=None):
  label = method + (f"[{aux}]" if aux else "") + ("".join(f"({k}={v})" for k, v in (settings or {}).items()))
  r = {"method": method, "label": label, "ttft_flops": flops,
       "ttft_flops_paper": flops, "ttft_flops_by_task": {"qa": flops, "code": flops},
       "ttft_flops_paper_by_task": {"qa": flops, "code": flops},
       "metrics": dict(zip(("qa_em", "code_line_em"), values))}
  if aux:
    r["aux"] = aux
  if settings:
    r["settings"] = settings
  return r


def synthetic_report():
  results = [_row("base", None, 100.0, (0.8, 0.5)), _row("aux_only", "c", 30.0, (0.2, 0.5)),
             _row("lp_alone", "lp0.50", 50.0, (0.4, 0.3)), _row("kvp", "c", 35.0, (0.5, 0.4)),
             _row("kvp", "lp0.50", 55.0, (0.4, 0.45)), _row("kvp", "lp0.50", 55.0, (0.3, 0.1), {"kv_reduce": "sum"}),
             _row("swiftkv", None, 60.0, (0.6, 0.35), {"cutoff": 0.5})]
  return {"tasks": ["qa_em", "code_line_em"], "results": results, "gap_recovered": eval_report.gap_recovered(results),
          "equal_flops": eval_report.equal_flops(results), "rivals": eval_report.rivals(results),
          "prompt_len_mean_all": 100.0,
          "kv_error": {"kvp[c]": {"k": [0.1, 0.2, 0.2], "v": [0.1, 0.3, 0.5]}}}


def test_gap_recovered_by_hand():
  gap = synthetic_report()["gap_recovered"]
  assert set(gap) == {"c", "lp0.50"}  # the ablation row is not a main kvp row
  assert gap["c"]["qa_em"] == pytest.approx((0.5 - 0.2) / (0.8 - 0.2))
  assert gap["c"]["code_line_em"] is None  # base == aux alone: no gap to recover
  assert gap["lp0.50"]["qa_em"] == pytest.approx(0.0)
  assert gap["lp0.50"]["code_line_em"] == pytest.approx((0.45 - 0.3) / (0.5 - 0.3))


def test_equal_flops_compares_with_the_best_cheaper_baseline():
  eq = {(e["label"], e["metric"]): e for e in synthetic_report()["equal_flops"]}
  assert len(eq) == 3 * 2
  e = eq[("kvp[c]", "qa_em")]
  assert (e["aux_alone"], e["aux_alone_method"]) == (0.2, "aux_only")
  assert (e["best_baseline_at_most_flops"], e["best_baseline_label"]) == (0.2, "aux_only[c]")
  e = eq[("kvp[lp0.50]", "qa_em")]
  assert (e["best_baseline_at_most_flops"], e["best_baseline_label"]) == (0.4, "lp_alone[lp0.50]")


def test_a_fit_at_zero_steps_faces_the_pruned_model_at_zero_steps():
  """A preset that trains nothing (smollm2-quick) pairs KVP's least-squares fit with the pruned model untrained;
  where both are there, the trained KVP row with the trained LP alone and the gap is the trained row's."""
  zero = {"train_steps": 0}
  results = [_row("base", None, 100.0, (0.8, 0.5)), _row("lp_alone", "lp0.50", 50.0, (0.0, 0.1), zero),
             _row("kvp", "lp0.50", 55.0, (0.2, 0.3), zero)]
  e = {x["metric"]: x for x in eval_report.equal_flops(results)}["qa_em"]
  assert (e["aux_alone"], e["aux_alone_method"]) == (0.0, "lp_alone")
  assert eval_report.gap_recovered(results)["lp0.50"]["qa_em"] == pytest.approx(0.2 / 0.8)
  results += [_row("lp_alone", "lp0.50", 50.0, (0.4, 0.3)), _row("kvp", "lp0.50", 55.0, (0.6, 0.4))]
  eq = {(x["label"], x["metric"]): x for x in eval_report.equal_flops(results)}
  assert eq[("kvp[lp0.50](train_steps=0)", "qa_em")]["aux_alone"] == 0.0
  assert eq[("kvp[lp0.50]", "qa_em")]["aux_alone"] == 0.4
  assert eval_report.gap_recovered(results)["lp0.50"]["qa_em"] == pytest.approx((0.6 - 0.4) / (0.8 - 0.4))


def test_untrained_lp_alone_is_the_base_with_the_labels_layers():
  cfg = tiny_config(num_layers=4)
  models = registry.Models.__new__(registry.Models)  # no checkpoint on disk: the base given directly
  models.base_path, models.base, models._models = "-", (cfg, P.init(cfg, jax.random.PRNGKey(0))), {}
  m = registry.BUILDERS["lp_alone"](MethodSpec.parse("lp_alone:lp0.50;train_steps=0"), models)
  assert (m.label, m.settings) == ("lp_alone[lp0.50](train_steps=0)", {"train_steps": 0})
  pcfg, pparams = models.pruned("lp0.50")
  assert pcfg.num_layers == 2 and pparams.layers[1] is not None
  assert bool(jnp.all(pparams.layers[1].wq == models.base[1].layers[2].wq))  # layers 0 and 2 kept
  with pytest.raises(ValueError, match="label lpF"):
    models.pruned("c")


def test_pareto_legend_names_every_method_even_when_kvp_rows_all_carry_settings(tmp_path, monkeypatch):
  """The main job's only kvp row is the least-squares fit (settings train_steps=0): it must still be in the legend."""
  import matplotlib.figure
  drawn = []
  real = matplotlib.figure.Figure.legend
  monkeypatch.setattr(matplotlib.figure.Figure, "legend",
                      lambda self, handles, labels, **kw: drawn.append(list(labels)) or real(self, handles, labels, **kw))
  full = synthetic_report()
  only_variant = dict(full, results=[r for r in full["results"] if not (r["method"] == "kvp" and not r.get("settings"))])
  plots.pareto(full, tmp_path / "a.png", eval_tasks.TASK_OF_METRIC)
  plots.pareto(only_variant, tmp_path / "b.png", eval_tasks.TASK_OF_METRIC)
  assert drawn[0] == ["base", "aux_only", "lp_alone", "kvp", "kvp, settings at the point (open)", "swiftkv"]
  assert drawn[1] == ["base", "aux_only", "lp_alone", "kvp, settings at the point (open)", "swiftkv"]


def test_rivals_face_the_best_kvp_at_no_more_flops_and_the_nearest():
  riv = {(e["label"], e["metric"]): e for e in synthetic_report()["rivals"]}
  assert set(riv) == {("swiftkv(cutoff=0.5)", "qa_em"), ("swiftkv(cutoff=0.5)", "code_line_em")}
  e = riv[("swiftkv(cutoff=0.5)", "qa_em")]
  assert (e["value"], e["best_kvp_at_most_flops"], e["best_kvp_label"]) == (0.6, 0.5, "kvp[c]")
  assert (e["nearest_kvp"], e["nearest_kvp_label"]) == (0.4, "kvp[lp0.50]")
  assert e["nearest_kvp_flops_ratio"] == pytest.approx(60 / 55)


def test_markdown_and_plots_are_written(tmp_path):
  report = synthetic_report()
  md = eval_report.markdown(report)
  assert "| kvp | lp0.50 | kv_reduce=sum |" in md and "gap" in md and "0.500" in md
  assert "| swiftkv(cutoff=0.5) | qa_em | 0.600 | 0.500 (kvp[c]) | 0.400 (kvp[lp0.50], 1.09x) |" in md
  for path in (plots.pareto(report, tmp_path / "pareto.png", eval_tasks.TASK_OF_METRIC),
               plots.kv_error(report, tmp_path / "kv_error.png")):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
