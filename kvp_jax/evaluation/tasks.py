"""The evaluation's tasks on the embedded data, as token prompts with their gold continuations.

Tasks (names are report.json's metric keys)
- qa_em / qa_2hop_em: exact match of the greedy answer on synthetic one-hop / two-hop QA (qa_synthetic).
- with `qa_levels` (a chat model): qa_easy_em, qa_long_em, qa_shared_em, qa_2hop_em, the levels of
  qa_synthetic.CHAT_LEVELS, each prompted as one user turn through the tokenizer's chat template; the model
  answers in a sentence until its end-of-turn token, and the value is read from the reply's first line
  (qa_synthetic.extract_value).
- code_line_em: the greedy next line of a held-out stdlib file equals the true line, indentation included.
- code_token_acc: teacher-forced argmax accuracy over the true next line's tokens.
- first_token_agree / first_token_kl (`fidelity`): over every prompt of the other tasks, whether the method's
  first generated token equals the base's, and KL(base || method) of the first-token distributions (nats).
  They need no task and no gold answer: how close a method's first step stays to the base it replaces.

Prompts end on a token boundary: a code context ends with "\\n" but the tokenizer merges a newline with the
next line's indentation ("\\n    "), so the prompt is cut before that whitespace run and the model must emit it
(`Example.lead`) before the line.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from kvp_jax.data import code_corpus, qa_synthetic

METRICS = ("qa_em", "qa_easy_em", "qa_long_em", "qa_shared_em", "qa_2hop_em", "code_line_em", "code_token_acc",
           "first_token_agree", "first_token_kl")
# metric -> the task whose mean prompt length its TTFT FLOPs are counted at ("all": every prompt of the run)
TASK_OF_METRIC = {"qa_em": "qa", "qa_2hop_em": "qa_2hop", "code_line_em": "code", "code_token_acc": "code",
                  **{f"qa_{lv}_em": f"qa_{lv}" for lv in qa_synthetic.CHAT_LEVELS},
                  "first_token_agree": "all", "first_token_kl": "all"}
LOWER_IS_BETTER = frozenset({"first_token_kl"})
# metrics whose value is a ratio of sums over examples (report.json keeps the per-example denominators)
RATIO_METRICS = frozenset({"code_token_acc"})


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
  qa_levels: tuple[str, ...] = ()  # chat QA levels (qa_synthetic.CHAT_LEVELS) instead of qa / qa_2hop
  fidelity: bool = False  # first_token_agree / first_token_kl against the base
  code_line_em: bool = True  # greedy next-line exact match (code_token_acc is always scored)
  add_bos: bool = True  # prompts start with BOS, as the training documents did (not for a chat model's BOS)

  def to_dict(self) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(self)))


@dataclasses.dataclass
class Example:
  prompt_ids: list[int]
  lead: str  # whitespace cut off the end of the context: the model must emit it before the target
  target: str  # the QA answer, or the code line
  gold_ids: list[int]  # tokens of lead + target, for teacher forcing


@dataclasses.dataclass
class Task:
  name: str  # qa | qa_2hop | code, or qa_easy | qa_long | qa_shared | qa_2hop with chat levels
  examples: list[Example]
  max_new_tokens: int
  stop_ids: tuple[int, ...] = ()  # a row is also done once it emits one of these (a chat model's end of turn)

  @property
  def mean_prompt_len(self) -> float:
    return float(np.mean([len(e.prompt_ids) for e in self.examples]))


def make_example(tok, context: str, target: str, add_bos: bool = True) -> Example:
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
  bos = [tok.bos_token_id] if tok.bos_token_id is not None and add_bos else []  # as training documents start
  return Example(prompt_ids=bos + ids[:k], lead=context[cut:], target=target, gold_ids=gold)


def make_chat_example(tok, messages: list[dict], target: str) -> Example:
  """The prompt is the conversation through the tokenizer's chat template, ending on the assistant's header."""
  text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  ids = tok(text, add_special_tokens=False)["input_ids"]
  return Example(prompt_ids=list(ids), lead="", target=target,
                 gold_ids=tok(target, add_special_tokens=False)["input_ids"])


def make_tasks(tok, ec: EvalConfig) -> list[Task]:
  tasks = []
  if ec.qa_levels:
    if not getattr(tok, "chat_template", None):
      raise ValueError("qa_levels prompt through the chat template, and this tokenizer has none; use qa_num_facts "
                       "(plain prompts) for a base model")
    stops = tuple(t for t in (tok.eos_token_id,) if t is not None)
    for i, level in enumerate(ec.qa_levels):
      data = qa_synthetic.chat_examples(ec.num_qa, ec.seed + 10 + i, level)
      tasks.append(Task(f"qa_{level}", [make_chat_example(tok, d["messages"], d["completion"]) for d in data],
                        ec.qa_max_new_tokens, stops))
  else:
    for name, hops in (("qa", 1), ("qa_2hop", 2)):
      data = qa_synthetic.make_dataset(ec.num_qa, ec.seed + hops, ec.qa_num_facts, hops=hops,
                                       distractors=ec.qa_distractors, answer_style=ec.qa_answer_style)
      tasks.append(Task(name, [make_example(tok, d["prompt"], d["completion"], ec.add_bos) for d in data],
                        ec.qa_max_new_tokens))
  lo, hi = ec.code_context_chars
  code = code_corpus.next_line_examples("test", ec.num_code, ec.seed, min_context_chars=lo, max_context_chars=hi)
  tasks.append(Task("code", [make_example(tok, c, line, ec.add_bos) for c, line in code], ec.code_max_new_tokens))
  return tasks


def newline_counts(tok, vocab_size: int) -> np.ndarray:
  """Newlines in each token's text. Byte-level BPE never splits '\\n', so counts of a sequence add up."""
  out = np.zeros(vocab_size, np.int32)
  for i in range(min(len(tok), vocab_size)):
    out[i] = tok.decode([i]).count("\n")
  return out
