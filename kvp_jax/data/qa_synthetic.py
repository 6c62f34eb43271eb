"""Seeded long-context question answering where the answer must be copied out of the context.

A stand-in for TriviaQA/SQuAD that a model unable to attend precisely over the whole context must fail.
(Learning it needs in-context retrieval, which the quickstart's 1M-parameter models do not acquire in their
~500-step budget; `launch/probe_recall.py` measures this on a bare synthetic recall task.) Its design:
- entity names and attributes come from small fixed vocabularies, so they are learnable;
- values are uniformly random 4-digit numbers, unique within a document, so no prior guesses them;
- distractors reuse the asked attribute for other people, give the asked person other attributes, and give
  other people the asked person's first or last name, so only the exact (person, attribute) pair answers.

One hop:  "The vault code of Mira Holt is 4827." ... "Question: What is the vault code of Mira Holt?\\nAnswer:"
Two hops: "Mira Holt works at Stone Harbor." ... "The door code of Stone Harbor is 9912." ...
          "Question: What is the door code of the place where Mira Holt works?\\nAnswer:"

`num_facts` sets the length. With a 2048-token byte-level BPE trained on the default mix and the default
filler share, a prompt is about 15 tokens per fact for one hop and 13 for two (measured: 20 facts ~ 300
tokens, 160 facts ~ 2370 one-hop / 2080 two-hop), so the default range (16, 136) spans ~256-2048 tokens.
"""

from __future__ import annotations

import random
import re
import string

FIRST_NAMES = ("Mira", "Lena", "Omar", "Ravi", "Tess", "Ivan", "Nora", "Jude", "Kai", "Zara", "Milo", "Ines",
               "Hugo", "Aya", "Theo", "Lila", "Sven", "Noor", "Elio", "Ruth", "Axel", "Yuki", "Dara", "Finn")
LAST_NAMES = ("Holt", "Stone", "Reyes", "Park", "Moss", "Vance", "Quinn", "Lowe", "Hart", "Shaw", "Frey",
              "Dunn", "Kerr", "Nash", "Pike", "Webb", "Rhee", "Salo", "Marsh", "Cole", "Ives", "Lund", "Baird",
              "Oakes")
PERSON_ATTRIBUTES = ("vault code", "locker number", "badge number", "room number", "phone extension",
                     "bike lock code", "seat number", "desk number")
PLACE_FIRST = ("Stone", "Red", "North", "Silver", "Cedar", "Iron", "Clear", "Blue", "Oak", "East", "Gold", "Fox")
PLACE_SECOND = ("Harbor", "Mill", "Point", "Bridge", "Hall", "Yard", "Gate", "Works", "Court", "Depot", "Field",
                "Tower")
PLACE_ATTRIBUTES = ("door code", "gate number", "alarm code", "dock number", "mailbox number", "vault code")
FILLER = (
    "The weather stayed mild for most of the week.",
    "Nobody remembered who had painted the fence.",
    "A delivery truck passed by just after noon.",
    "The meeting was moved to the following Tuesday.",
    "Several lamps in the hallway needed new bulbs.",
    "The old clock in the lobby ran a little fast.",
    "Someone left a green umbrella by the entrance.",
    "The coffee machine on the second floor was broken again.",
    "Rain was expected later in the evening.",
    "The parking lot was almost empty on Sunday.",
    "A new poster about fire safety went up in the kitchen.",
    "The library closed early because of the holiday.",
    "Two pigeons nested under the roof of the garage.",
    "The printer ran out of paper twice that morning.",
    "A quiet tune played from a radio down the street.",
    "The elevator inspection took most of the afternoon.",
)


def _person_name(rng: random.Random, first: str | None = None, last: str | None = None) -> str:
  return f"{first or rng.choice(FIRST_NAMES)} {last or rng.choice(LAST_NAMES)}"


def _distinct_people(rng: random.Random, k: int, anchor: str) -> list[str]:
  """`anchor` first, then k-1 other people, half of them sharing its first or last name."""
  first, last = anchor.split(" ")
  people = [anchor]
  taken = {anchor}
  tries = 0
  while len(people) < k:
    tries += 1
    if tries > 100 * k:
      raise ValueError(f"cannot draw {k} distinct people from {len(FIRST_NAMES) * len(LAST_NAMES)} names")
    r = rng.random()
    name = _person_name(rng, first=first if r < 0.25 else None, last=last if 0.25 <= r < 0.5 else None)
    if name not in taken:
      taken.add(name)
      people.append(name)
  return people


def _place_names(rng: random.Random, k: int) -> list[str]:
  names = [f"{a} {b}" for a in PLACE_FIRST for b in PLACE_SECOND]
  if k > len(names):
    raise ValueError(f"cannot draw {k} distinct places from {len(names)}")
  return rng.sample(names, k)


DISTRACTORS = ("shared", "distinct")


def _distinct_names(rng: random.Random, k: int, firsts, seconds, what: str) -> list[str]:
  """k names sharing no first and no second word, so one word of a name already identifies it."""
  if k > min(len(firsts), len(seconds)):
    raise ValueError(f"{k} {what} with distinct words need at most {min(len(firsts), len(seconds))}; "
                     "lower num_facts or raise filler_ratio for longer prompts")
  return [f"{a} {b}" for a, b in zip(rng.sample(firsts, k), rng.sample(seconds, k))]


def _make_distinct(rng: random.Random, num_facts: int, hops: int, values) -> tuple[list[str], str, str]:
  """Easy level: every entity is named once, with one fact; retrieval is a lookup on the entity's name."""
  if hops == 1:
    people = _distinct_names(rng, num_facts, FIRST_NAMES, LAST_NAMES, "people")
    facts = [(p, rng.choice(PERSON_ATTRIBUTES), next(values)) for p in people]
    lines = [f"The {what} of {who} is {v}." for who, what, v in facts]
    who, what, answer = facts[0]
    return lines, f"What is the {what} of {who}?", answer
  n = num_facts // 2
  people = _distinct_names(rng, n, FIRST_NAMES, LAST_NAMES, "people")
  places = _distinct_names(rng, n, PLACE_FIRST, PLACE_SECOND, "places")
  attribute = rng.choice(PLACE_ATTRIBUTES)
  values = [next(values) for _ in places]
  lines = [f"{p} works at {q}." for p, q in zip(people, places)]
  lines += [f"The {attribute} of {q} is {v}." for q, v in zip(places, values)]
  return lines, f"What is the {attribute} of the place where {people[0]} works?", values[0]


ANSWER_STYLES = ("bare", "sentence")


def _answer_sentence(context: str, question: str, answer: str) -> str:
  """The fact(s) the question needs, restated: 'The seat number of Axel Shaw is 7634.' (two hops: the
  'works at' sentence first). Generating them step by step is how a small model learns to answer by copying."""
  lines = context.split("\n")
  if m := re.match(r"What is the (.+) of the place where (.+) works\?$", question):
    what, person = m.groups()
    works = next(l for l in lines if l.startswith(f"{person} works at "))
    place = works[len(f"{person} works at "):-1]
    return f"{works} The {what} of {place} is {answer}."
  what, who = re.match(r"What is the (.+) of (.+)\?$", question).groups()
  return f"The {what} of {who} is {answer}."


def extract_value(generated: str) -> str:
  """The answer value in a generation of either style: the last number on its first line ('' if none)."""
  nums = re.findall(r"\d+", generated.split("\n")[0])
  return nums[-1] if nums else ""


def make_example(rng: random.Random, num_facts: int, hops: int = 1, filler_ratio: float = 0.3,
                 distractors: str = "shared", answer_style: str = "bare") -> dict:
  """One example: dict(context, question, answer, completion, prompt, hops).

  num_facts: fact sentences in the context, the one or two needed facts included; the rest are distractors.
  filler_ratio: filler sentences per fact sentence (0.3 adds 3 fillers per 10 facts).
  distractors: "shared" (the hard level above: distractors share the asked attribute and name parts) or
    "distinct" (every entity named once with one fact, no name parts shared: a one-token lookup that a small
    model learns in minutes, while two hops still need depth; at most 24 facts for one hop, 24 for two).
  `prompt + completion` is the exact text a model should produce; `answer` is the bare value.
  """
  if hops not in (1, 2):
    raise ValueError(f"hops must be 1 or 2, got {hops}")
  if num_facts < 2 * hops:
    raise ValueError(f"num_facts={num_facts} is too small for {hops} hop(s); need at least {2 * hops}")
  if answer_style not in ANSWER_STYLES:
    raise ValueError(f"answer_style must be one of {ANSWER_STYLES}, got {answer_style!r}")
  if distractors not in DISTRACTORS:
    raise ValueError(f"distractors must be one of {DISTRACTORS}, got {distractors!r}")
  values = iter(str(v) for v in rng.sample(range(1000, 10000), num_facts))
  target = _person_name(rng)
  if distractors == "distinct":
    lines, question, answer = _make_distinct(rng, num_facts, hops, values)
  elif hops == 1:
    attribute = rng.choice(PERSON_ATTRIBUTES)
    # Each distractor is a (person, attribute) pair other than the asked one; about a third of them use the asked
    # attribute, a third the asked person, the rest anything.
    people = _distinct_people(rng, max(2, num_facts // 2), target)
    pairs = {(target, attribute)}
    lines = []
    answer = next(values)
    lines.append(f"The {attribute} of {target} is {answer}.")
    while len(lines) < num_facts:
      r = rng.random()
      who = target if r < 0.3 else rng.choice(people[1:])
      what = attribute if 0.3 <= r < 0.65 else rng.choice(PERSON_ATTRIBUTES)
      if (who, what) in pairs:
        continue
      pairs.add((who, what))
      lines.append(f"The {what} of {who} is {next(values)}.")
    question = f"What is the {attribute} of {target}?"
  else:
    attribute = rng.choice(PLACE_ATTRIBUTES)
    # Half the facts say who works where (every person at a different place), half give place attributes;
    # every place named in a "works at" line gets the asked attribute too, so the first hop is necessary.
    n_people = max(2, num_facts // 2)
    people = _distinct_people(rng, n_people, target)
    places = _place_names(rng, min(n_people, len(PLACE_FIRST) * len(PLACE_SECOND)))
    work = list(zip(people, places))
    lines = [f"{p} works at {q}." for p, q in work]
    answer = next(values)
    lines.append(f"The {attribute} of {places[0]} is {answer}.")
    pairs = {(places[0], attribute)}
    for q in places[1:]:
      if len(lines) >= num_facts:
        break
      pairs.add((q, attribute))
      lines.append(f"The {attribute} of {q} is {next(values)}.")
    while len(lines) < num_facts:
      q, what = rng.choice(places), rng.choice(PLACE_ATTRIBUTES)
      if (q, what) in pairs:
        continue
      pairs.add((q, what))
      lines.append(f"The {what} of {q} is {next(values)}.")
    question = f"What is the {attribute} of the place where {target} works?"
  lines += [rng.choice(FILLER) for _ in range(int(round(filler_ratio * num_facts)))]
  rng.shuffle(lines)
  context = "\n".join(lines)
  completion = " " + (_answer_sentence(context, question, answer) if answer_style == "sentence" else answer)
  return dict(context=context, question=question, answer=answer, completion=completion,
              prompt=f"{context}\nQuestion: {question}\nAnswer:", hops=hops)


def make_dataset(n: int, seed: int, num_facts_range: tuple[int, int] = (16, 136), hops: int = 1,
                 filler_ratio: float = 0.3, distractors: str = "shared", answer_style: str = "bare") -> list[dict]:
  """n examples; each draws num_facts uniformly from the inclusive range. Same seed, same examples."""
  lo, hi = num_facts_range
  rng = random.Random(seed)
  return [make_example(rng, rng.randint(lo, hi), hops=hops, filler_ratio=filler_ratio, distractors=distractors,
                       answer_style=answer_style) for _ in range(n)]


_FACT = re.compile(r"^The (.+) of (.+) is (\d+)\.$")
_WORKS = re.compile(r"^(.+) works at (.+)\.$")


def _context_questions(context: str) -> list[tuple[str, str]]:
  """Every (question, answer) the context supports: one hop about each fact, two hops through each employer."""
  facts, works = {}, []
  for line in context.split("\n"):
    if m := _FACT.match(line):
      facts[(m.group(2), m.group(1))] = m.group(3)
    elif m := _WORKS.match(line):
      works.append((m.group(1), m.group(2)))
  qs = [(f"What is the {what} of {who}?", v) for (who, what), v in facts.items()]
  for person, place in works:
    qs += [(f"What is the {what} of the place where {person} works?", v)
           for (who, what), v in facts.items() if who == place]
  return qs


def training_documents(n: int, seed: int, num_facts_range: tuple[int, int] = (16, 136),
                       hops: tuple[int, ...] = (1, 2), filler_ratio: float = 0.3,
                       questions_per_doc: int = 1, distractors: str = "shared",
                       answer_style: str = "bare", recap: bool = False) -> list[str]:
  """Pretraining texts: the context, then `questions_per_doc` question/answer pairs, hop counts alternating.

  One question per document gives one retrieval target per few hundred tokens, too sparse a signal for a small
  model to learn retrieval in minutes; extra questions (drawn from every fact the context states, the
  example's own question always among them) multiply that signal without changing the evaluation format.
  recap: after the context, restate its facts in a new order before the questions. Every recap token can be
  copied from the context, a dense signal in which copying heads form within a few hundred steps (as on a
  plain repeated-sequence task), where one answer per question alone took longer than the quickstart has.
  Use a different seed from the evaluation set's; with ~10^4 names and 9000 values, overlap is negligible.
  """
  rng = random.Random(seed)
  lo, hi = num_facts_range
  docs = []
  for i in range(n):
    ex = make_example(rng, rng.randint(lo, hi), hops=hops[i % len(hops)], filler_ratio=filler_ratio,
                      distractors=distractors, answer_style=answer_style)
    qa = [(ex["question"], ex["answer"])]
    if questions_per_doc > 1:
      others = [q for q in _context_questions(ex["context"]) if q[0] != ex["question"]]
      qa += rng.sample(others, min(questions_per_doc - 1, len(others)))
      rng.shuffle(qa)
    say = (lambda q, a: _answer_sentence(ex["context"], q, a)) if answer_style == "sentence" else (lambda q, a: a)
    text = ex["context"]
    if recap:
      facts = [l for l in ex["context"].split("\n") if l not in FILLER]
      text += "\nRecap:\n" + "\n".join(rng.sample(facts, len(facts)))
    docs.append(text + "".join(f"\nQuestion: {q}\nAnswer: {say(q, a)}" for q, a in qa) + "\n")
  return docs


# ---------------------------------------------------------------------------------------------- chat format
# For an instruction-tuned model (e.g. SmolLM2-135M-Instruct): the context and question are one user turn, the
# answer the assistant's sentence. The caller renders the messages with its tokenizer's chat template.

CHAT_LEVELS = {  # name -> (distractors, num_facts range, hops): the levels the real-model evaluation reports
    "easy": ("distinct", (8, 20), 1),
    "long": ("distinct", (20, 24), 1),
    "shared": ("shared", (16, 40), 1),
    "2hop": ("distinct", (8, 20), 2),
}
MAX_DISTINCT_FACTS = 24  # distinct names run out past this (FIRST_NAMES x LAST_NAMES without sharing, 12 places)


def chat_question(context: str, question: str) -> str:
  """The user turn of a chat-format QA example: the facts, then the question."""
  return f"{context}\nQuestion: {question}"


def chat_examples(n: int, seed: int, level: str) -> list[dict]:
  """n examples of one CHAT_LEVELS level: dict(messages (the user turn), answer, completion (the reference
  sentence), hops). Same seed, same examples."""
  if level not in CHAT_LEVELS:
    raise ValueError(f"unknown QA level {level!r}; choose one of {sorted(CHAT_LEVELS)}")
  distractors, facts, hops = CHAT_LEVELS[level]
  data = make_dataset(n, seed, facts, hops=hops, distractors=distractors, answer_style="sentence")
  return [dict(messages=[{"role": "user", "content": chat_question(d["context"], d["question"])}],
               answer=d["answer"], completion=d["completion"].strip(), hops=hops) for d in data]


def chat_conversations(n: int, seed: int, num_facts_range: tuple[int, int] = (8, 40), hops: tuple[int, ...] = (1, 2),
                       filler_ratio: float = 0.3, questions_per_doc: int = 1,
                       distractors: str = "mixed") -> list[list[dict]]:
  """Training conversations: the context and first question as a user turn, each answer (a sentence) as an
  assistant turn, each further question as its own user turn. distractors: "shared", "distinct" or "mixed"
  (alternating per document, hop counts alternating too; distinct documents hold at most 24 facts)."""
  if distractors not in DISTRACTORS + ("mixed",):
    raise ValueError(f"distractors must be one of {DISTRACTORS + ('mixed',)}, got {distractors!r}")
  rng = random.Random(seed)
  lo, hi = num_facts_range
  out = []
  for i in range(n):
    d = distractors if distractors != "mixed" else DISTRACTORS[(i // len(hops)) % 2]
    nf = rng.randint(lo, hi)
    if d == "distinct":
      nf = max(2 * hops[i % len(hops)], min(nf, MAX_DISTINCT_FACTS))
    ex = make_example(rng, nf, hops=hops[i % len(hops)], filler_ratio=filler_ratio, distractors=d,
                      answer_style="sentence")
    qa = [(ex["question"], ex["answer"])]
    if questions_per_doc > 1:
      others = [q for q in _context_questions(ex["context"]) if q[0] != ex["question"]]
      qa += rng.sample(others, min(questions_per_doc - 1, len(others)))
      rng.shuffle(qa)
    msgs = []
    for k, (q, a) in enumerate(qa):
      msgs.append({"role": "user", "content": chat_question(ex["context"], q) if k == 0 else f"Question: {q}"})
      msgs.append({"role": "assistant", "content": _answer_sentence(ex["context"], q, a)})
    out.append(msgs)
  return out


CHATML_ASSISTANT = "<|im_start|>assistant\n"


def chat_loss_start(text: str) -> int | None:
  """Where a ChatML-rendered training conversation's first assistant reply starts (None for other texts): its
  loss then covers the answers and later questions, not the randomly drawn context (as `loss_start`)."""
  if not text.startswith("<|im_start|>"):
    return None
  i = text.find(CHATML_ASSISTANT)
  return None if i < 0 else i + len(CHATML_ASSISTANT)


def any_loss_start(text: str) -> int | None:
  """`loss_start` for plain QA documents, `chat_loss_start` for ChatML ones, None for anything else."""
  return chat_loss_start(text) if text.startswith("<|im_start|>") else loss_start(text)


_BOUNDARY = re.compile(r"\n(?:Recap:\n|Question: )")


def loss_start(text: str) -> int | None:
  """Where a `training_documents` text stops stating its context: the character offset of its "\nRecap:" or
  first "\nQuestion:" line; None for any other text (every line before that must be one of this generator's
  fact, "works at" or filler sentences, so no code file or foreign text is mistaken for one).

  Training with the loss from here on only (`--qa_context_loss=false`) leaves out the context's tokens: their
  values, names and order are drawn at random, so their loss cannot fall, and its gradient noise drowns the
  retrieval signal. On the copy probe (`launch/probe_recall.py --task=copy --gap=60`) a 2-layer model trained on
  every token is still at chance-like 0.05 accuracy after 4000 steps; trained only on the copy, it reaches 0.70
  by step 800.
  """
  m = _BOUNDARY.search(text)
  if m is None or m.start() == 0:
    return None
  if not all(l in FILLER or _FACT.match(l) or _WORKS.match(l) for l in text[:m.start()].split("\n")):
    return None
  return m.start()


_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
  """SQuAD's normalisation: lowercase, drop punctuation and articles, collapse whitespace."""
  return " ".join(_ARTICLES.sub(" ", _PUNCT.sub("", text.lower())).split())


def exact_match(prediction: str, answer: str | list[str] | tuple[str, ...]) -> bool:
  """Whether the prediction, cut at its first newline, equals the answer (or any alias) after normalisation."""
  answers = [answer] if isinstance(answer, str) else list(answer)
  pred = normalize_answer(prediction.split("\n", 1)[0])
  return any(pred == normalize_answer(a) for a in answers)
