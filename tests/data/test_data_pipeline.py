"""Tests for kvp_jax.data.pipeline: packing, shapes, seeded order, exact state restore and file sources."""

import json
import sys
import types

import grain
import numpy as np
import pytest

from kvp_jax.data import pipeline
from kvp_jax.data import tokenizer as tokenizer_lib

DOCS = [f"document {i}: " + " ".join(f"w{(i * 7 + j) % 23}" for j in range(5 + 3 * i)) for i in range(12)]


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.train_tokenizer(DOCS * 3, vocab_size=300)


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_shapes_dtypes_and_shift(tok):
  batch = next(pipeline.make_lm_iterator(DOCS, tok, seq_len=16, batch_size=3, seed=0))
  assert set(batch) == {"inputs", "targets"}
  for v in batch.values():
    assert v.shape == (3, 16) and v.dtype == np.int32
  np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])


def test_one_epoch_is_the_shuffled_documents_concatenated(tok):
  seq_len, seed = 8, 5
  batches = list(pipeline.make_lm_iterator(DOCS, tok, seq_len, batch_size=1, seed=seed, num_epochs=1))
  order = list(grain.MapDataset.source(DOCS).shuffle(seed=seed))
  assert sorted(order) == sorted(DOCS) and order != DOCS
  stream = np.concatenate([[tok.bos_token_id, *tok.encode(d, add_special_tokens=False), tok.eos_token_id]
                           for d in order])
  windows = stream[:len(stream) // (seq_len + 1) * (seq_len + 1)].reshape(-1, seq_len + 1)
  assert len(batches) == len(windows)  # only the zero-padded final window is dropped
  np.testing.assert_array_equal(np.concatenate([b["inputs"] for b in batches]), windows[:, :-1])
  np.testing.assert_array_equal(np.concatenate([b["targets"] for b in batches]), windows[:, 1:])


def _segments(batch, row):
  """The documents of one packed window, as token lists, read back through the weights mask."""
  toks = np.concatenate([batch["inputs"][row][:1], batch["targets"][row]])
  w = np.concatenate([[1.0], batch["weights"][row]])
  docs, cur = [], [toks[0]]
  for t, keep in zip(toks[1:], w[1:]):
    if keep:
      cur.append(t)
    else:
      docs.append(cur)
      cur = [t]
  docs.append(cur)
  return [d for d in docs if len(d) > 1 or d[0] != 0]  # runs of padding (id 0) are dropped


def test_document_packing_keeps_documents_whole(tok):
  seq_len = 40
  encoded = {tuple([tok.bos_token_id, *tok.encode(d, add_special_tokens=False), tok.eos_token_id]) for d in DOCS}
  assert max(map(len, encoded)) > seq_len + 1  # some documents must be cut, the rest must not
  batches = list(pipeline.make_lm_iterator(DOCS, tok, seq_len, batch_size=1, seed=0, num_epochs=1,
                                           packing="documents"))
  assert set(batches[0]) == {"inputs", "targets", "weights"} and batches[0]["weights"].dtype == np.float32
  pieces = [tuple(int(t) for t in d) for b in batches for d in _segments(b, 0)]
  for doc in encoded:
    if len(doc) <= seq_len + 1:
      assert doc in pieces  # whole, in one window
    else:  # cut into seq_len + 1 pieces, all present, in order
      chunks = [doc[i:i + seq_len + 1] for i in range(0, len(doc), seq_len + 1)]
      assert all(c in pieces for c in chunks if len(c) > 1)
  # (Padding marked as a target would glue zeros onto a document, which then would match nothing above.)


def test_document_packing_restore_replays_exactly(tok):
  it = pipeline.make_lm_iterator(DOCS, tok, 24, 2, seed=3, packing="documents")
  take(it, 3)
  state = json.loads(json.dumps(it.get_state()))
  expected = take(it, 5)
  fresh = pipeline.make_lm_iterator(DOCS, tok, 24, 2, seed=3, packing="documents")
  fresh.set_state(state)
  assert_same(take(fresh, 5), expected)
  with pytest.raises(ValueError, match="packing must be one of"):
    pipeline.make_lm_iterator(DOCS, tok, 24, 2, seed=3, packing="nope")


def test_seed_determinism_and_epochs(tok):
  a = take(pipeline.make_lm_iterator(DOCS, tok, 16, 2, seed=1), 4)
  b = take(pipeline.make_lm_iterator(DOCS, tok, 16, 2, seed=1), 4)
  c = take(pipeline.make_lm_iterator(DOCS, tok, 16, 2, seed=2), 4)
  assert_same(a, b)
  assert any(not np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, c))
  one = len(list(pipeline.make_lm_iterator(DOCS, tok, 16, 2, seed=1, num_epochs=1)))
  two = len(list(pipeline.make_lm_iterator(DOCS, tok, 16, 2, seed=1, num_epochs=2)))
  assert one >= 2 and 2 * one <= two <= 2 * one + 1
  assert len(take(pipeline.make_lm_iterator(DOCS, tok, 16, 2, seed=1), 3 * one)) == 3 * one  # repeats forever


@pytest.mark.parametrize("k", [0, 3, 7])
def test_state_restore_replays_exactly(tok, k):
  it = pipeline.make_lm_iterator(DOCS, tok, 16, 2, seed=3)
  assert isinstance(it, grain.DatasetIterator)
  take(it, k)
  state = json.loads(json.dumps(it.get_state()))  # what grain.checkpoint.CheckpointHandler writes and reads
  expected = take(it, 6)
  fresh = pipeline.make_lm_iterator(DOCS, tok, 16, 2, seed=3)
  fresh.set_state(state)
  assert_same(take(fresh, 6), expected)


def test_reads_txt_jsonl_json_parquet_and_glob(tmp_path, tok):
  import pyarrow as pa
  import pyarrow.parquet as pq
  (tmp_path / "d").mkdir()
  (tmp_path / "d" / "a.txt").write_text("alpha text\nline two")
  (tmp_path / "d" / "b.txt").write_text("beta")
  (tmp_path / "r.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "id": 2}\n')
  (tmp_path / "r.json").write_text(json.dumps([{"body": "x"}, {"body": "y"}]))
  pq.write_table(pa.table({"text": ["p1", "p2", "p3"], "n": [1, 2, 3]}), tmp_path / "r.parquet")
  assert pipeline.load_texts(str(tmp_path / "d")) == ["alpha text\nline two", "beta"]
  assert pipeline.load_texts(str(tmp_path / "r.jsonl")) == ["one", "two"]
  assert pipeline.load_texts(str(tmp_path / "r.json"), text_field="body") == ["x", "y"]
  assert pipeline.load_texts(str(tmp_path / "r.parquet")) == ["p1", "p2", "p3"]
  assert pipeline.load_texts(f"glob:{tmp_path}/d/*.txt") == ["alpha text\nline two", "beta"]
  batch = next(pipeline.make_lm_iterator(str(tmp_path / "r.parquet"), tok, 4, 1, seed=0))
  assert batch["inputs"].shape == (1, 4)


def test_source_errors_are_clear(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such file"):
    pipeline.load_texts(str(tmp_path / "missing.jsonl"))
  with pytest.raises(FileNotFoundError, match="matches no files"):
    pipeline.load_texts(f"glob:{tmp_path}/*.nothing")
  bad = tmp_path / "bad.json"
  bad.write_text('[{"text": "a"},')
  with pytest.raises(ValueError, match=r"bad.json: malformed JSON"):
    pipeline.load_texts(str(bad))
  (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": \n')
  with pytest.raises(ValueError, match=r"bad.jsonl:2: malformed JSON"):
    pipeline.load_texts(str(tmp_path / "bad.jsonl"))
  (tmp_path / "nofield.jsonl").write_text('{"content": "a"}\n')
  with pytest.raises(ValueError, match="no string field 'text'"):
    pipeline.load_texts(str(tmp_path / "nofield.jsonl"))


class _FakeRows(list):
  column_names = ["text"]

  def __getitem__(self, key):
    return [r[key] for r in self] if isinstance(key, str) else super().__getitem__(key)


def test_hf_specs_through_datasets(monkeypatch):
  calls = []

  def load_dataset(name, config, split):
    calls.append((name, config, split))
    if name == "offline/only":
      raise ConnectionError("Couldn't reach 'offline/only' on the Hub (LocalEntryNotFoundError)\nmore detail")
    return _FakeRows([{"text": "hub doc"}])

  monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
  assert pipeline.load_texts("hf:org/corpus:cfg:validation") == ["hub doc"]
  assert calls[-1] == ("org/corpus", "cfg", "validation")
  assert pipeline.parse_hf_spec("hf:org/corpus") == ("org/corpus", None, "train")
  assert pipeline.parse_hf_spec("hf:org/corpus::test") == ("org/corpus", None, "test")
  with pytest.raises(ValueError, match="could not load Hugging Face dataset 'offline/only'") as e:
    pipeline.load_texts("hf:offline/only")
  assert "\n" not in str(e.value) and "ConnectionError" in str(e.value)


def test_mixed_pretraining_texts_hold_code_and_qa():
  texts = pipeline.mixed_pretraining_texts(num_qa_docs=4, seed=0, max_code_files=3, num_facts_range=(6, 8))
  assert len(texts) == 7
  assert sum("\nAnswer: " in t for t in texts) == 4
  assert sum(("def " in t or "import " in t) and "Answer:" not in t for t in texts) == 3
  assert texts == pipeline.mixed_pretraining_texts(num_qa_docs=4, seed=0, max_code_files=3, num_facts_range=(6, 8))


def test_orbax_checkpoint_manager_round_trip(tok, tmp_path):
  # The trainer's path: grain.checkpoint args inside an orbax CheckpointManager. Saved at step 0, where grain
  # 0.2.18 alone would skip a document on restore.
  import orbax.checkpoint as ocp
  it = pipeline.make_lm_iterator(DOCS, tok, 16, 2, seed=3)
  mngr = ocp.CheckpointManager(tmp_path, item_names=("data",))
  mngr.save(0, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  mngr.wait_until_finished()
  expected = take(it, 5)
  fresh = pipeline.make_lm_iterator(DOCS, tok, 16, 2, seed=3)
  mngr.restore(0, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  assert_same(take(fresh, 5), expected)
  mngr.close()


def _qa_docs_and_tok():
  from kvp_jax.data import qa_synthetic
  docs = qa_synthetic.training_documents(6, seed=5, num_facts_range=(4, 6), questions_per_doc=2,
                                         distractors="distinct", answer_style="sentence", recap=True)
  return docs, tokenizer_lib.train_tokenizer(docs * 2 + DOCS, vocab_size=400)


@pytest.mark.parametrize("packing", ["documents", "concat"])
def test_loss_start_weighs_only_what_follows_each_offset(packing):
  """Targets before a document's offset weigh 0, every later target 1, and documents without one weigh all."""
  from kvp_jax.data import qa_synthetic
  docs, tok = _qa_docs_and_tok()
  starts = {d: qa_synthetic.loss_start(d) for d in docs}
  texts = docs + DOCS
  # Two epochs: concat packing drops the last partial window, which may hold the end of one epoch.
  batches = list(pipeline.make_lm_iterator(texts, tok, 256, 1, seed=0, num_epochs=2, packing=packing,
                                           loss_start=qa_synthetic.loss_start))
  weighted = "".join(tok.decode(b["targets"][0][b["weights"][0] > 0]) for b in batches)
  unweighted = "".join(tok.decode(b["targets"][0][b["weights"][0] == 0]) for b in batches)
  for d in docs:
    context, rest = d[:starts[d]], d[starts[d]:]
    assert rest.split("\nQuestion: ")[1].split("\n")[0] in weighted  # its questions are trained on
    assert context.split("\n")[0] in unweighted  # its context is not
  assert "document" not in unweighted and "Recap:" not in unweighted  # plain documents: every target counts
  if packing == "documents":  # (concat: a window's first token is no target, so a document may lose one)
    assert all(d in weighted for d in DOCS)


def test_loss_start_recognises_only_synthetic_qa_documents():
  from kvp_jax.data import code_corpus, qa_synthetic
  docs, _ = _qa_docs_and_tok()
  for d in docs:
    s = qa_synthetic.loss_start(d)
    assert s is not None and d[s:].startswith("\nRecap:\n")
  plain = qa_synthetic.training_documents(2, seed=1, num_facts_range=(4, 6))[0]
  assert plain[qa_synthetic.loss_start(plain):].startswith("\nQuestion: ")
  assert all(qa_synthetic.loss_start(c) is None for c in code_corpus.code_documents("train", 5))
  assert qa_synthetic.loss_start("Some notes.\nQuestion: What is x?\nAnswer: 1") is None


def test_qa_context_loss_off_needs_synthetic_qa_documents(tok):
  from kvp_jax.training import stages
  with pytest.raises(ValueError, match="no document is a synthetic QA document"):
    stages._data_iter(stages.DataConfig(source="some/dir", qa_context_loss=False, seq_len=16, batch_size=2), DOCS,
                      tok)
  docs, qa_tok = _qa_docs_and_tok()
  it = stages._data_iter(stages.DataConfig(qa_context_loss=False, seq_len=256, batch_size=1), docs, qa_tok)
  assert set(next(it)) == {"inputs", "targets", "weights"}


def test_shards_read_disjoint_documents_and_concat_rows_restores(tok):
  one_epoch = lambda shard: list(pipeline.make_lm_iterator(DOCS, tok, 8, 1, seed=0, num_epochs=1, shard=shard))
  tokens = lambda batches: {int(t) for b in batches for t in b["inputs"].ravel()}
  ids = lambda i: set(tok.encode(f"document {i}:", add_special_tokens=False))
  a, b = one_epoch((0, 2)), one_epoch((1, 2))
  # "document 0:" (even) is read by shard 0 only, "document 1:" by shard 1 only: docs i, i+2, ... per shard
  assert "".join(tok.decode(x["inputs"][0]) for x in a).count("document 1:") == 0
  assert "".join(tok.decode(x["inputs"][0]) for x in b).count("document 0:") == 0
  assert tokens(a) and tokens(b) and ids(0) <= tokens(a) | tokens(b)
  with pytest.raises(ValueError, match="data shard 2 of 2 does not exist"):
    pipeline.make_lm_iterator(DOCS, tok, 8, 1, seed=0, shard=(2, 2))
  # two shards joined row-wise: batches of 2 + 2 rows, and a JSON'd state replays exactly
  make = lambda: pipeline.concat_rows([pipeline.make_lm_iterator(DOCS, tok, 8, 2, seed=0, shard=(i, 2))
                                       for i in range(2)])
  it = make()
  take(it, 2)
  state = json.loads(json.dumps(it.get_state()))
  expected = take(it, 3)
  assert expected[0]["inputs"].shape == (4, 8)
  fresh = make()
  fresh.set_state(state)
  assert_same(take(fresh, 3), expected)
  with pytest.raises(ValueError, match="saved data state holds 2 shards"):
    pipeline.concat_rows([pipeline.make_lm_iterator(DOCS, tok, 8, 2, seed=0, shard=(i, 3)) for i in range(3)]
                         ).set_state(state)
