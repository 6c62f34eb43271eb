"""Language-model input pipeline on grain's Dataset API, plus the text sources that feed it.

Shapes: B batch, T sequence length. A batch is {"inputs": int32[B, T], "targets": int32[B, T]} with
targets[:, t] == inputs[:, t + 1] within each packed window of T + 1 tokens.

Pipeline: texts -> MapDataset.source -> shuffle(seed) -> repeat(num_epochs) (each epoch reshuffled) ->
tokenize ([bos] + ids + [eos]) -> to_iter_dataset -> packing into windows of T + 1, either
ConcatThenSplitIterDataset (packing="concat": documents cross window edges; drop the zero-padded final window of
a finite run) or FirstFitPackIterDataset (packing="documents": whole documents, padding, and a "weights" mask)
-> split into inputs/targets -> batch(B, drop_remainder=True) -> a pass-through whose set_state works
around a grain 0.2.18 restore bug (see _JsonStateIterator).

Sharding: `shard=(i, n)` reads every n-th document starting at i (the Dataset API's slice, before shuffling),
so n shards see disjoint documents; several processes each build their own shard(s), and `concat_rows` joins
the batches of several shards row-wise when one process feeds more than one (kvp_jax/training/stages.py).

Checkpointing: the returned `grain.DatasetIterator` has get_state()/set_state(); the state is a JSON-able dict
and restoring it replays exactly the same batches. With orbax, save it next to the train state:

  import grain, orbax.checkpoint as ocp
  mngr = ocp.CheckpointManager(directory, item_names=("state", "data"))
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          data=grain.checkpoint.CheckpointSave(it)))
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                        data=grain.checkpoint.CheckpointRestore(it)))
  # `it` (a freshly built iterator with the same arguments) now continues where the saved one stopped.

Sources (`load_texts`): a file or directory (.txt/.md/.py: one document per file; .jsonl and .json: records
with a text field; .parquet: a text column), `glob:PATTERN`, or `hf:NAME[:CONFIG][:SPLIT]` through
`datasets.load_dataset` (needs network access or a local Hugging Face cache).
"""

from __future__ import annotations

import glob as globlib
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np

TEXT_SUFFIXES = (".txt", ".md", ".py")
RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")


# ---------------------------------------------------------------------------------------------------------------
# Sources

def _first_line(e: BaseException) -> str:
  msg = str(e).strip()
  return msg.splitlines()[0] if msg else type(e).__name__


def read_json_file(path: str | Path) -> Any:
  """Parsed JSON, with one-line errors for a missing file or malformed JSON."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such file")
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: malformed JSON ({e.msg} at line {e.lineno} column {e.colno})") from None


def read_jsonl_file(path: str | Path) -> list[dict]:
  """One JSON object per non-blank line."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such file")
  records = []
  with path.open(encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: malformed JSON line ({e.msg} at column {e.colno})") from None
  return records


def parse_hf_spec(spec: str, default_split: str = "train") -> tuple[str, str | None, str]:
  """"hf:NAME[:CONFIG][:SPLIT]" -> (name, config or None, split)."""
  parts = spec.removeprefix("hf:").split(":")
  if not parts[0] or len(parts) > 3:
    raise ValueError(f"{spec!r} is not of the form hf:NAME[:CONFIG][:SPLIT]")
  name = parts[0]
  config = parts[1] if len(parts) > 1 and parts[1] else None
  split = parts[2] if len(parts) > 2 and parts[2] else default_split
  return name, config, split


def load_hf_rows(spec: str, default_split: str = "train"):
  """A `datasets.Dataset` for an hf: spec; an unreachable or unknown dataset is a one-line ValueError."""
  name, config, split = parse_hf_spec(spec, default_split)
  try:
    import datasets  # imported here: slow to import and only needed for hub names
    return datasets.load_dataset(name, config, split=split)
  except Exception as e:  # datasets raises many types (ConnectionError, DatasetNotFoundError, ...)
    raise ValueError(f"could not load Hugging Face dataset {name!r} (config={config}, split={split}): "
                     f"{type(e).__name__}: {_first_line(e)}; this needs network access or a local HF cache, "
                     f"or pass a local file instead") from None


def _texts_from_records(records: Sequence[Any], field: str, where: str) -> list[str]:
  texts = []
  for i, r in enumerate(records):
    if isinstance(r, str):
      texts.append(r)
    elif isinstance(r, dict) and isinstance(r.get(field), str):
      texts.append(r[field])
    else:
      raise ValueError(f"{where}: record {i} has no string field {field!r} (set text_field to the right name)")
  return texts


def _texts_from_file(path: Path, field: str) -> list[str]:
  suffix = path.suffix.lower()
  if suffix in TEXT_SUFFIXES:
    return [path.read_text(encoding="utf-8")]
  if suffix == ".jsonl":
    return _texts_from_records(read_jsonl_file(path), field, str(path))
  if suffix == ".json":
    data = read_json_file(path)
    return _texts_from_records(data if isinstance(data, list) else [data], field, str(path))
  if suffix == ".parquet":
    import pyarrow.parquet as pq
    table = pq.read_table(path)
    if field not in table.column_names:
      raise ValueError(f"{path}: no column {field!r} (columns: {table.column_names}); set text_field")
    return [t for t in table.column(field).to_pylist() if t is not None]
  raise ValueError(f"{path}: unsupported file type {suffix!r}; expected one of {TEXT_SUFFIXES + RECORD_SUFFIXES}")


def load_texts(spec: str, text_field: str = "text") -> list[str]:
  """Documents from a file, a directory (recursively, sorted), `glob:PATTERN` or `hf:NAME[:CONFIG][:SPLIT]`."""
  if spec.startswith("hf:"):
    rows = load_hf_rows(spec)
    if text_field not in rows.column_names:
      raise ValueError(f"{spec}: no column {text_field!r} (columns: {rows.column_names}); set text_field")
    return list(rows[text_field])
  if spec.startswith("glob:"):
    files = sorted(Path(p) for p in globlib.glob(spec.removeprefix("glob:"), recursive=True) if Path(p).is_file())
    if not files:
      raise FileNotFoundError(f"{spec}: the pattern matches no files")
  else:
    path = Path(spec).expanduser()
    if not path.exists():
      raise FileNotFoundError(f"{spec}: no such file or directory")
    if path.is_dir():
      files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES + RECORD_SUFFIXES)
      if not files:
        raise FileNotFoundError(f"{spec}: no {TEXT_SUFFIXES + RECORD_SUFFIXES} files in this directory")
    else:
      files = [path]
  return [t for f in files for t in _texts_from_file(f, text_field)]


def mixed_pretraining_texts(num_qa_docs: int = 2000, seed: int = 0, max_code_files: int | None = None,
                            num_facts_range: tuple[int, int] = (16, 136), hops: tuple[int, ...] = (1, 2),
                            questions_per_doc: int = 1, distractors: str = "shared",
                            answer_style: str = "bare", recap: bool = False) -> list[str]:
  """The embedded default corpus: stdlib train-split code plus synthetic QA training docs, in a seeded order."""
  from kvp_jax.data import code_corpus, qa_synthetic
  texts = code_corpus.code_documents("train", max_code_files)
  texts += qa_synthetic.training_documents(num_qa_docs, seed, num_facts_range=num_facts_range, hops=hops,
                                          questions_per_doc=questions_per_doc, distractors=distractors,
                                          answer_style=answer_style, recap=recap)
  random.Random(seed).shuffle(texts)
  return texts


# ---------------------------------------------------------------------------------------------------------------
# Pipeline

class TokenizeDocument(grain.transforms.Map):
  """text -> {"tokens": int32[n]} = [bos] + ids + [eos]. A class, not a closure, so it pickles for worker processes.

  loss_start: text -> character offset or None; when given, every document also gets "loss": int32[n], 1 for
  the tokens that count as targets: those starting at or after its offset (every token where it gives None).
  """

  def __init__(self, tokenizer, add_bos: bool = True, loss_start: Callable[[str], int | None] | None = None):
    if tokenizer.eos_token_id is None:
      raise ValueError("the tokenizer has no eos token; the pipeline separates documents with it")
    if add_bos and tokenizer.bos_token_id is None:
      raise ValueError("the tokenizer has no bos token; pass add_bos=False")
    self._tokenizer = tokenizer
    self._prefix = [tokenizer.bos_token_id] if add_bos else []
    self._eos = tokenizer.eos_token_id
    self._loss_start = loss_start

  def map(self, text: str) -> dict[str, np.ndarray]:
    if self._loss_start is None:
      ids = self._tokenizer.encode(text, add_special_tokens=False)
      return {"tokens": np.asarray(self._prefix + ids + [self._eos], dtype=np.int32)}
    enc = self._tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    start = self._loss_start(text) or 0
    counts = [int(s >= start) for s, _ in enc["offset_mapping"]]
    return {"tokens": np.asarray(self._prefix + enc["input_ids"] + [self._eos], dtype=np.int32),
            "loss": np.asarray([0] * len(self._prefix) + counts + [1], dtype=np.int32)}


def _is_full_window(x: dict[str, np.ndarray]) -> bool:
  # Packing pads only the last window of a finite stream; its padding has segment id 0.
  return bool(np.all(x["tokens_segment_ids"] > 0))


def _shift(x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  t = x["tokens"].astype(np.int32)
  out = {"inputs": t[:-1], "targets": t[1:]}
  if "loss" in x:
    out["weights"] = x["loss"][1:].astype(np.float32)
  return out


def _slices_as_tuples(state: Any) -> Any:
  """Grain 0.2.18's ConcatThenSplit state after a JSON round trip, with its slices back as tuples."""
  if isinstance(state, dict):
    return {k: ({f: tuple(v) for f, v in s.items()} if k == "remainder_slices" else _slices_as_tuples(s))
            for k, s in state.items()}
  return state


class _JsonStateIterator(grain.DatasetIterator):
  """Passes elements through; set_state accepts a state that went through JSON.

  ConcatThenSplitIterDataset marks "no remainder" with the tuple (-1, -1) and compares with `!=`; JSON (what
  grain.checkpoint.CheckpointHandler writes) turns it into the list [-1, -1], so a restore would read one
  parent document as a remainder, slice it to nothing and silently skip it.
  """

  def __next__(self):
    return next(self._parent)

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]):
    self._parent.set_state(_slices_as_tuples(state))


class _JsonStateDataset(grain.IterDataset):

  def __iter__(self) -> grain.DatasetIterator:
    return _JsonStateIterator(self._parent.__iter__())


class SplitIntoWindows(grain.experimental.FlatMapTransform):
  """{"tokens": int32[n]} -> pieces of at most `window` tokens, so that packing never has to drop a document."""

  max_fan_out = 1 << 20  # a bound grain asks for; pieces are produced lazily, so a large one costs nothing

  def __init__(self, window: int):
    self._window = window

  def flat_map(self, x: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    n = len(x["tokens"])
    # Pieces start every `window` tokens; a last piece of a single token holds no (input, target) pair.
    return [{k: v[i:i + self._window] for k, v in x.items()} for i in range(0, n - 1, self._window)]


def _shift_packed(x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  t, seg = x["tokens"].astype(np.int32), x["tokens_segment_ids"]
  # A target counts if it is a real token of the same document as its input (not padding, not the next document).
  weights = (seg[1:] > 0) & (seg[1:] == seg[:-1])
  if "loss" in x:
    weights &= x["loss"][1:] > 0
  return {"inputs": t[:-1], "targets": t[1:], "weights": weights.astype(np.float32)}


PACKINGS = ("concat", "documents")
SHUFFLE_WINDOW = 512  # pieces shuffled together before document packing


def make_lm_dataset(texts_or_source: Sequence[str] | str, tokenizer, seq_len: int, batch_size: int, seed: int,
                    num_epochs: int | None = None, *, text_field: str = "text", add_bos: bool = True,
                    packing: str = "concat", loss_start: Callable[[str], int | None] | None = None,
                    shard: tuple[int, int] = (0, 1)) -> grain.IterDataset:
  """The batched grain IterDataset; `make_lm_iterator` is `iter()` of it. num_epochs=None repeats forever.

  shard: (index, count): this dataset reads documents index, index + count, ... (see the module doc).

  loss_start: text -> character offset where its loss starts, or None for all of it (e.g.
    qa_synthetic.loss_start: a QA document's questions, not its randomly drawn context); batches then carry
    "weights" with either packing, 0 for targets before a document's offset. A module-level function, so it
    pickles.

  packing="concat": concat-then-split, no padding; documents cross window edges.
  packing="documents": a document of at most T + 1 tokens always lies whole in one window (longer ones are cut
    into T + 1 pieces first), windows are filled first-fit and zero-padded, and batches carry "weights"
    float32[B, T] (1 where the target is a real token of the input's document). Needed when a document's end
    depends on its start, as in the synthetic QA: split at a window edge, a question loses its context and the
    model can only learn to guess.
  """
  texts = load_texts(texts_or_source, text_field) if isinstance(texts_or_source, str) else list(texts_or_source)
  if not texts:
    raise ValueError("no documents to train on")
  if seq_len < 1 or batch_size < 1:
    raise ValueError(f"seq_len and batch_size must be positive, got {seq_len}, {batch_size}")
  if packing not in PACKINGS:
    raise ValueError(f"packing must be one of {PACKINGS}, got {packing!r}")
  index, count = shard
  if not 0 <= index < count:
    raise ValueError(f"data shard {index} of {count} does not exist")
  if count > len(texts):
    raise ValueError(f"{count} data shards need at least as many documents; there are {len(texts)}")
  ds = grain.MapDataset.source(texts)
  ds = (ds[index::count] if count > 1 else ds).shuffle(seed=seed).repeat(num_epochs)
  ds = ds.map(TokenizeDocument(tokenizer, add_bos, loss_start)).to_iter_dataset()
  lengths = {"tokens": seq_len + 1} | ({} if loss_start is None else {"loss": seq_len + 1})
  if packing == "concat":
    ds = grain.experimental.ConcatThenSplitIterDataset(ds, length_struct=lengths)
    ds = ds.filter(_is_full_window).map(_shift)
  else:
    ds = grain.experimental.FlatMapIterDataset(ds, SplitIntoWindows(seq_len + 1))
    # A long file gives many pieces in a row; shuffling them among others keeps one file from filling a batch.
    ds = grain.experimental.WindowShuffleIterDataset(ds, window_size=SHUFFLE_WINDOW, seed=seed)
    ds = grain.experimental.FirstFitPackIterDataset(ds, length_struct=lengths,
                                                    num_packing_bins=max(batch_size, 8), seed=seed)
    ds = ds.map(_shift_packed)
  return _JsonStateDataset(ds.batch(batch_size, drop_remainder=True))


def make_lm_iterator(texts_or_source: Sequence[str] | str, tokenizer, seq_len: int, batch_size: int, seed: int,
                     num_epochs: int | None = None, *, text_field: str = "text", add_bos: bool = True,
                     packing: str = "concat", loss_start: Callable[[str], int | None] | None = None,
                     shard: tuple[int, int] = (0, 1)) -> grain.DatasetIterator:
  """A checkpointable iterator of {"inputs": int32[B, T], "targets": int32[B, T]} batches (see module doc)."""
  return iter(make_lm_dataset(texts_or_source, tokenizer, seq_len, batch_size, seed, num_epochs,
                              text_field=text_field, add_bos=add_bos, packing=packing, loss_start=loss_start,
                              shard=shard))


class _RowConcatIterator(grain.DatasetIterator):
  """Batches of several iterators joined along the rows (axis 0); the state holds each one's state."""

  def __iter__(self):
    return self

  def __next__(self):
    parts = [next(it) for it in self._parents]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def get_state(self) -> dict[str, Any]:
    return {"shards": [it.get_state() for it in self._parents]}

  def set_state(self, state: dict[str, Any]):
    if len(state["shards"]) != len(self._parents):
      raise ValueError(f"the saved data state holds {len(state['shards'])} shards, this run reads "
                       f"{len(self._parents)}; resume with the same --data_shards and process count")
    for it, s in zip(self._parents, state["shards"]):
      it.set_state(s)


def concat_rows(iterators: Sequence[grain.DatasetIterator]) -> grain.DatasetIterator:
  """One iterator whose batches are those of `iterators` stacked row-wise, in order (one: itself)."""
  return iterators[0] if len(iterators) == 1 else _RowConcatIterator(list(iterators))
