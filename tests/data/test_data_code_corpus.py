"""Tests for kvp_jax.data.code_corpus: stable, disjoint splits and deterministic next-line examples."""

import pytest

from kvp_jax.data import code_corpus


def test_splits_are_disjoint_and_cover_the_corpus():
  files = {s: code_corpus.code_files(s) for s in code_corpus.SPLITS}
  sets = {s: set(f) for s, f in files.items()}
  assert not sets["train"] & sets["validation"]
  assert not sets["train"] & sets["test"]
  assert not sets["validation"] & sets["test"]
  total = sum(len(f) for f in files.values())
  assert len(set().union(*sets.values())) == total
  assert all(files[s] for s in code_corpus.SPLITS)
  assert 0.8 < len(files["train"]) / total < 0.97


def test_split_is_a_pure_function_of_the_relative_path():
  # Golden values of the sha1 bucketing; update only if the split rule is changed on purpose (it reshuffles which
  # files are held out, so old evaluation numbers stop being comparable).
  assert code_corpus.split_of("os.py") == "train"
  assert code_corpus.split_of("functools.py") == "validation"
  root = code_corpus.stdlib_root()
  for split in code_corpus.SPLITS:
    for path in code_corpus.code_files(split)[:20]:
      assert code_corpus.split_of(path.relative_to(root).as_posix()) == split


def test_file_list_is_sorted_and_filtered():
  root = code_corpus.stdlib_root()
  for split in code_corpus.SPLITS:
    files = code_corpus.code_files(split)
    rel = [p.relative_to(root).as_posix() for p in files]
    assert rel == sorted(rel)
    for p in files:
      parts = set(p.relative_to(root).parts[:-1])
      assert not parts & code_corpus.EXCLUDED_DIRS, p
      assert p.suffix == ".py" and p.stat().st_size <= code_corpus.MAX_FILE_BYTES
  with pytest.raises(ValueError, match="split"):
    code_corpus.code_files("dev")


def test_code_documents_reads_the_first_files():
  docs = code_corpus.code_documents("validation", max_files=3)
  files = code_corpus.code_files("validation")[:3]
  assert docs == [f.read_text(encoding="utf-8") for f in files]


def test_next_line_examples_are_deterministic_and_come_from_held_out_files():
  a = code_corpus.next_line_examples("test", n=12, seed=3, min_context_chars=200, max_context_chars=600)
  b = code_corpus.next_line_examples("test", n=12, seed=3, min_context_chars=200, max_context_chars=600)
  c = code_corpus.next_line_examples("test", n=12, seed=4, min_context_chars=200, max_context_chars=600)
  assert a == b and a != c
  texts = code_corpus.code_documents("test")
  for context, target in a:
    assert 200 <= len(context) <= 600 and context.endswith("\n")
    assert target.strip() and "\n" not in target
    assert any(context + target + "\n" in t for t in texts)
  with pytest.raises(ValueError, match="held-out"):
    code_corpus.next_line_examples("train", n=1)
