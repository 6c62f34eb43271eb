"""Tests for kvp_jax.data.qa_synthetic: determinism, a unique answer in context, two-hop chains, EM scoring."""

import random
import re

import pytest

from kvp_jax.data import qa_synthetic as qa

ONE_HOP_Q = re.compile(r"What is the (.+) of (\w+ \w+)\?")
TWO_HOP_Q = re.compile(r"What is the (.+) of the place where (\w+ \w+) works\?")


def test_same_seed_same_examples():
  a = qa.make_dataset(5, seed=7, num_facts_range=(10, 30))
  b = qa.make_dataset(5, seed=7, num_facts_range=(10, 30))
  c = qa.make_dataset(5, seed=8, num_facts_range=(10, 30))
  assert a == b
  assert a != c


@pytest.mark.parametrize("seed", range(5))
def test_one_hop_answer_appears_once_for_the_asked_pair(seed):
  ex = qa.make_example(random.Random(seed), num_facts=60, hops=1)
  attribute, person = ONE_HOP_Q.fullmatch(ex["question"]).groups()
  lines = ex["context"].split("\n")
  assert lines.count(f"The {attribute} of {person} is {ex['answer']}.") == 1
  assert len([l for l in lines if l.startswith(f"The {attribute} of {person} is ")]) == 1
  assert len(re.findall(rf"\b{ex['answer']}\b", ex["context"])) == 1
  # Distractors: the same attribute for others, and the same person with other attributes.
  assert any(l.startswith(f"The {attribute} of ") and person not in l for l in lines)
  assert any(l.startswith("The ") and l.endswith(".") and f" of {person} is " in l and attribute not in l
             for l in lines)
  assert ex["prompt"] == f"{ex['context']}\nQuestion: {ex['question']}\nAnswer:"
  assert ex["completion"] == " " + ex["answer"] and re.fullmatch(r"\d{4}", ex["answer"])


@pytest.mark.parametrize("seed", range(5))
def test_two_hop_answer_follows_the_chain(seed):
  ex = qa.make_example(random.Random(seed), num_facts=40, hops=2)
  attribute, person = TWO_HOP_Q.fullmatch(ex["question"]).groups()
  lines = ex["context"].split("\n")
  works = [l for l in lines if l.startswith(f"{person} works at ")]
  assert len(works) == 1
  place = works[0].removeprefix(f"{person} works at ").removesuffix(".")
  assert lines.count(f"The {attribute} of {place} is {ex['answer']}.") == 1
  assert len(re.findall(rf"\b{ex['answer']}\b", ex["context"])) == 1
  # The first hop is needed: other places carry the asked attribute too.
  assert len([l for l in lines if l.startswith(f"The {attribute} of ")]) > 1
  assert ex["hops"] == 2


def test_length_grows_with_num_facts_and_bad_arguments_fail():
  rng = random.Random(0)
  short, long = qa.make_example(rng, 16)["prompt"], qa.make_example(rng, 136)["prompt"]
  assert 5 * len(short) < len(long)
  with pytest.raises(ValueError, match="hops"):
    qa.make_example(rng, 10, hops=3)
  with pytest.raises(ValueError, match="num_facts"):
    qa.make_example(rng, 3, hops=2)


def test_training_documents_are_prompt_plus_answer_and_alternate_hops():
  docs = qa.training_documents(4, seed=1, num_facts_range=(8, 12))
  assert len(docs) == 4 and all(re.search(r"\nAnswer: \d{4}\n\Z", d) for d in docs)
  assert "works at" not in docs[0] and "where" in docs[1].rsplit("Question:", 1)[1]
  assert docs == qa.training_documents(4, seed=1, num_facts_range=(8, 12))


def test_exact_match_normalisation():
  assert qa.exact_match(" 4827\nQuestion: next", "4827")
  assert qa.exact_match("4827.", " 4827")
  assert qa.exact_match("  The Stone Harbor! ", "stone harbor")
  assert qa.exact_match("sunset blvd", ["Sunset Boulevard", "Sunset Blvd"])
  assert not qa.exact_match("48271", "4827")
  assert not qa.exact_match("\n4827", "4827")  # the prediction is cut at its first newline
  assert not qa.exact_match("", "4827")


@pytest.mark.parametrize("hops", [1, 2])
def test_distinct_sentence_examples_answer_from_the_context(hops):
  import random
  for seed in range(20):
    ex = qa.make_example(random.Random(seed), 12, hops=hops, distractors="distinct",
                                   answer_style="sentence")
    sentence = ex["completion"].strip()
    # the restated fact(s) are lines of the context, and the value extracted is the answer
    for part in sentence.replace(". ", ".\n").split("\n"):
      assert part in ex["context"].split("\n"), (part, ex["context"])
    assert qa.extract_value(sentence) == ex["answer"]
    names = [l.split(" of ")[-1].split(" is ")[0] for l in ex["context"].split("\n") if l.startswith("The ")
             and " of " in l and " is " in l]
    assert len(set(n.split()[0] for n in names)) == len(names)  # no shared first words in distinct mode


def test_training_documents_with_several_questions_are_answerable():
  docs = qa.training_documents(5, seed=3, num_facts_range=(6, 10), questions_per_doc=4,
                                         distractors="distinct", answer_style="sentence")
  for d in docs:
    context, *pairs = d.split("\nQuestion: ")
    assert len(pairs) == 4
    for pair in pairs:
      answer_sentence = pair.split("\nAnswer: ")[1].strip()
      assert qa.extract_value(answer_sentence) in context


# ---------------------------------------------------------------------------------------------- chat format


@pytest.mark.parametrize("level", sorted(qa.CHAT_LEVELS))
def test_chat_levels_have_their_settings_and_the_answer_in_context(level):
  distractors, (lo, hi), hops = qa.CHAT_LEVELS[level]
  exs = qa.chat_examples(12, seed=3, level=level)
  assert exs == qa.chat_examples(12, seed=3, level=level)
  for ex in exs:
    (msg,) = ex["messages"]
    assert msg["role"] == "user" and ex["hops"] == hops
    context, question = msg["content"].rsplit("\nQuestion: ", 1)
    facts = [l for l in context.split("\n") if l not in qa.FILLER]
    assert lo <= len(facts) <= hi
    assert (TWO_HOP_Q if hops == 2 else ONE_HOP_Q).fullmatch(question)
    assert qa.extract_value(ex["completion"]) == ex["answer"] and ex["answer"] in context
    if distractors == "distinct" and hops == 1:  # every person named once, no name part shared
      people = [l.split(" of ", 1)[1].rsplit(" is ", 1)[0] for l in facts]
      assert len({p.split()[0] for p in people}) == len({p.split()[1] for p in people}) == len(people)
  with pytest.raises(ValueError, match="unknown QA level"):
    qa.chat_examples(1, 0, "hard")


def test_chat_conversations_alternate_levels_and_answer_every_question():
  convs = qa.chat_conversations(8, seed=1, num_facts_range=(8, 40), questions_per_doc=3, distractors="mixed")
  for i, msgs in enumerate(convs):
    assert [m["role"] for m in msgs] == ["user", "assistant"] * 3
    context = msgs[0]["content"].rsplit("\nQuestion: ", 1)[0]
    n_facts = len([l for l in context.split("\n") if l not in qa.FILLER])
    if (i // 2) % 2 == 1:  # distinct documents are capped at 24 facts
      assert n_facts <= qa.MAX_DISTINCT_FACTS
    for q, a in zip(msgs[0::2], msgs[1::2]):
      assert q["content"].split("Question: ")[-1].startswith("What is the ")
      assert qa.extract_value(a["content"]) in context
  text = "<|im_start|>user\nfacts<|im_end|>\n<|im_start|>assistant\nThe x of y is 1.<|im_end|>\n"
  assert text[qa.chat_loss_start(text):].startswith("The x of y is 1.")
  assert qa.any_loss_start(text) == qa.chat_loss_start(text) and qa.chat_loss_start("def f(): pass") is None
