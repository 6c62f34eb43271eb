"""Loaders for real benchmark files: SQuAD v2 and TriviaQA (QA) and HumanEval (code), local or `hf:` names.

QA records share one form with kvp_jax.data.qa_synthetic, so one evaluator scores both:
  {"prompt": f"{context}\\nQuestion: {question}\\nAnswer:", "answers": [str, ...], "id": str,
   "context": str, "question": str}
HumanEval records: {"prompt", "canonical_solution", "test", "entry_point", "id"}.

A source is a local path or "hf:NAME[:CONFIG][:SPLIT]" (e.g. hf:rajpurkar/squad_v2, hf:mandarjoshi/trivia_qa:rc,
hf:openai/openai_humaneval); hub names need network access or a local Hugging Face cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvp_jax.data.pipeline import load_hf_rows, read_json_file, read_jsonl_file


def qa_prompt(context: str, question: str) -> str:
  question_part = f"Question: {question.strip()}\nAnswer:"
  return f"{context}\n{question_part}" if context else question_part


def _unique(xs) -> list[str]:
  return list(dict.fromkeys(x for x in xs if x))


def _qa_record(id_: str, context: str, question: str, answers: list[str]) -> dict:
  return dict(prompt=qa_prompt(context, question), answers=answers, id=str(id_), context=context,
              question=question)


# ---------------------------------------------------------------------------------------------------------------
# SQuAD v2

def load_squad_v2(source: str | Path, split: str = "validation", include_impossible: bool = False) -> list[dict]:
  """QA records from the official SQuAD v2 JSON or an hf: name.

  Unanswerable questions are skipped unless include_impossible, in which case their answers are [""] (the
  official scorer's convention: the right prediction is the empty string).
  """
  records = []
  if str(source).startswith("hf:"):
    for row in load_hf_rows(str(source), split):
      answers = _unique(row["answers"]["text"])
      if answers or include_impossible:
        records.append(_qa_record(row["id"], row["context"], row["question"], answers or [""]))
    return records
  data = read_json_file(source)
  if not isinstance(data, dict) or not isinstance(data.get("data"), list):
    raise ValueError(f"{source}: not SQuAD JSON (expected a top-level 'data' list of articles)")
  for article in data["data"]:
    for para in article.get("paragraphs", []):
      for qa in para.get("qas", []):
        answers = _unique(a.get("text", "") for a in qa.get("answers", []))
        impossible = qa.get("is_impossible", False) or not answers
        if impossible and not include_impossible:
          continue
        records.append(_qa_record(qa["id"], para["context"], qa["question"], [""] if impossible else answers))
  return records


# ---------------------------------------------------------------------------------------------------------------
# TriviaQA

def _trivia_answers(answer: dict[str, Any]) -> list[str]:
  # Both the rc JSON keys and the Hugging Face lowercase keys.
  value = answer.get("Value", answer.get("value", ""))
  aliases = answer.get("Aliases", answer.get("aliases", []))
  normalized = answer.get("NormalizedAliases", answer.get("normalized_aliases", []))
  return _unique([value, *aliases, *normalized])


def _trivia_context_json(item: dict[str, Any], evidence_dir: Path | None) -> list[str]:
  """Evidence texts of one rc JSON question: inline SearchContext/Text fields, else files under evidence_dir."""
  texts = []
  for key, subdir in (("EntityPages", "wikipedia"), ("SearchResults", "web")):
    for doc in item.get(key, []) or []:
      inline = doc.get("SearchContext") or doc.get("Text")
      if inline:
        texts.append(inline)
      elif evidence_dir is not None and doc.get("Filename"):
        path = evidence_dir / subdir / doc["Filename"]
        if path.is_file():
          texts.append(path.read_text(encoding="utf-8"))
  return texts


def load_triviaqa(source: str | Path, split: str = "validation", evidence_dir: str | Path | None = None,
                  max_context_chars: int | None = None) -> list[dict]:
  """QA records from a TriviaQA rc JSON file (`{"Data": [...]}`) or an hf: name (e.g. hf:mandarjoshi/trivia_qa:rc).

  The context joins the question's evidence documents (entity pages first) with blank lines, cut to
  max_context_chars. The rc JSON names evidence files without holding them: their text is read from inline
  "SearchContext"/"Text" fields, else from evidence_dir/{wikipedia,web}/Filename; with neither, the record is
  question-only (context "").
  """
  if str(source).startswith("hf:"):
    rows = [(r["question_id"], r["question"], _trivia_answers(r["answer"]),
             list((r.get("entity_pages") or {}).get("wiki_context", []))
             + list((r.get("search_results") or {}).get("search_context", [])))
            for r in load_hf_rows(str(source), split)]
  else:
    data = read_json_file(source)
    if not isinstance(data, dict) or not isinstance(data.get("Data"), list):
      raise ValueError(f"{source}: not TriviaQA rc JSON (expected a top-level 'Data' list of questions)")
    ev = Path(evidence_dir) if evidence_dir is not None else None
    rows = [(item.get("QuestionId", str(i)), item["Question"], _trivia_answers(item.get("Answer", {})),
             _trivia_context_json(item, ev)) for i, item in enumerate(data["Data"])]
  records = []
  for id_, question, answers, contexts in rows:
    context = "\n\n".join(c.strip() for c in contexts if c and c.strip())
    records.append(_qa_record(id_, context[:max_context_chars], question, answers))
  return records


# ---------------------------------------------------------------------------------------------------------------
# HumanEval

HUMANEVAL_FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")


def load_humaneval(source: str | Path, split: str = "test") -> list[dict]:
  """HumanEval problems from the official JSONL (HumanEval.jsonl) or hf:openai/openai_humaneval."""
  if str(source).startswith("hf:"):
    rows = list(load_hf_rows(str(source), split))
  else:
    rows = read_jsonl_file(source)
  out = []
  for i, row in enumerate(rows):
    missing = [f for f in HUMANEVAL_FIELDS if f not in row]
    if missing:
      raise ValueError(f"{source}: record {i} is not a HumanEval problem (missing {missing})")
    out.append(dict(prompt=row["prompt"], canonical_solution=row["canonical_solution"], test=row["test"],
                    entry_point=row["entry_point"], id=row["task_id"]))
  return out
