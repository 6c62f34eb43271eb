"""Tests for kvp_jax.data.benchmarks on hand-written samples of the official SQuAD v2, TriviaQA and HumanEval files."""

import sys
import types
from pathlib import Path

import pytest

from kvp_jax.data import benchmarks, qa_synthetic

TESTDATA = Path(__file__).parents[1] / "testdata"
SQUAD = TESTDATA / "squad_v2_sample.json"
TRIVIA = TESTDATA / "triviaqa_sample.json"
HUMANEVAL = TESTDATA / "humaneval_sample.jsonl"


def test_squad_v2_records():
  records = benchmarks.load_squad_v2(SQUAD)
  assert [r["id"] for r in records] == ["56ddde6b9a695914005b9628", "56ddde6b9a695914005b962a"]
  first = records[0]
  assert first["answers"] == ["France"]  # duplicate annotations collapse
  assert first["prompt"] == first["context"] + "\nQuestion: In what country is Normandy located?\nAnswer:"
  assert first["context"].startswith("The Normans were")
  assert qa_synthetic.exact_match(" France.\n", first["answers"])
  with_impossible = benchmarks.load_squad_v2(SQUAD, include_impossible=True)
  assert len(with_impossible) == 3 and with_impossible[2]["answers"] == [""]


def test_triviaqa_records_inline_evidence_and_question_only(tmp_path):
  records = benchmarks.load_triviaqa(TRIVIA)
  assert [r["id"] for r in records] == ["tc_33", "tc_2"]
  assert records[0]["answers"] == ["Sunset Boulevard", "Sunset Blvd", "sunset boulevard", "sunset blvd"]
  assert records[0]["context"].startswith("Sunset Boulevard is a musical")
  assert "Shubert Theatre" in records[0]["context"]  # search results follow entity pages
  assert records[1]["context"] == ""
  assert records[1]["prompt"] == "Question: Who was the man behind The Chipmunks?\nAnswer:"
  (tmp_path / "wikipedia").mkdir()
  (tmp_path / "wikipedia" / "The_Chipmunks.txt").write_text("Ross Bagdasarian created the Chipmunks as David Seville.")
  records = benchmarks.load_triviaqa(TRIVIA, evidence_dir=tmp_path, max_context_chars=20)
  assert records[1]["context"] == "Ross Bagdasarian cre"
  assert len(records[0]["context"]) == 20


def test_humaneval_records_and_canonical_solutions_pass_their_tests():
  records = benchmarks.load_humaneval(HUMANEVAL)
  assert [r["id"] for r in records] == ["HumanEval/0", "HumanEval/2"]
  for r in records:
    assert set(r) == {"prompt", "canonical_solution", "test", "entry_point", "id"}
    scope = {}
    exec(r["prompt"] + r["canonical_solution"] + r["test"], scope)  # trusted hand-written sample
    scope["check"](scope[r["entry_point"]])
  broken = {"check": None}
  exec(records[1]["prompt"] + "    return number\n" + records[1]["test"], broken)
  with pytest.raises(AssertionError):
    broken["check"](broken["truncate_number"])


def test_loader_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such file"):
    benchmarks.load_squad_v2(tmp_path / "nope.json")
  bad = tmp_path / "bad.json"
  bad.write_text('{"data": [')
  with pytest.raises(ValueError, match="malformed JSON"):
    benchmarks.load_squad_v2(bad)
  with pytest.raises(ValueError, match="not SQuAD JSON"):
    benchmarks.load_squad_v2(TRIVIA)
  with pytest.raises(ValueError, match="not TriviaQA rc JSON"):
    benchmarks.load_triviaqa(SQUAD)
  partial = tmp_path / "partial.jsonl"
  partial.write_text('{"task_id": "X/0", "prompt": "def f():\\n"}\n')
  with pytest.raises(ValueError, match="not a HumanEval problem"):
    benchmarks.load_humaneval(partial)


def test_hf_rows_map_to_the_same_records(monkeypatch):
  rows = {
      "rajpurkar/squad_v2": [
          {"id": "a", "title": "t", "context": "Paris is in France.", "question": "Where is Paris?",
           "answers": {"text": ["France", "France"], "answer_start": [12, 12]}},
          {"id": "b", "title": "t", "context": "x", "question": "?", "answers": {"text": [], "answer_start": []}}],
      "mandarjoshi/trivia_qa": [
          {"question": "Q?", "question_id": "q1", "answer": {"value": "V", "aliases": ["V", "Vee"],
                                                             "normalized_aliases": ["v", "vee"]},
           "entity_pages": {"wiki_context": ["wiki text"]}, "search_results": {"search_context": ["web text"]}}],
  }
  calls = []

  def load_dataset(name, config, split):
    calls.append((name, config, split))
    return rows[name]

  monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
  squad = benchmarks.load_squad_v2("hf:rajpurkar/squad_v2")
  assert calls[-1] == ("rajpurkar/squad_v2", None, "validation")
  assert [(r["id"], r["answers"]) for r in squad] == [("a", ["France"])]
  trivia = benchmarks.load_triviaqa("hf:mandarjoshi/trivia_qa:rc")
  assert calls[-1] == ("mandarjoshi/trivia_qa", "rc", "validation")
  assert trivia[0]["answers"] == ["V", "Vee", "v", "vee"]
  assert trivia[0]["context"] == "wiki text\n\nweb text"
