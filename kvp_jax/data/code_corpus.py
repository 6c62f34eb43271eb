"""An offline code corpus: the Python standard library of the running interpreter.

Every machine that runs kvp_jax has it, so the quickstart and tests need no download. Files are split into
train/validation/test by a stable hash of their path relative to the stdlib root, so a file's split never
depends on which other files exist and held-out files are never trained on. The corpus itself does depend
on the Python version (3.11 and 3.12 ship different files); record `sys.version` next to results.
"""

from __future__ import annotations

import functools
import hashlib
import random
import sysconfig
from pathlib import Path

SPLITS = ("train", "validation", "test")
# Percent of files per split, by hash bucket in [0, 100).
_SPLIT_BOUNDS = {"train": (0, 90), "validation": (90, 95), "test": (95, 100)}
# Test suites repeat themselves heavily and idlelib/lib2to3 are GUI/legacy code; site-packages is not stdlib.
EXCLUDED_DIRS = frozenset({"test", "tests", "idlelib", "lib2to3", "site-packages"})
MAX_FILE_BYTES = 200_000


def stdlib_root() -> Path:
  return Path(sysconfig.get_paths()["stdlib"])


def split_of(relative_path: str) -> str:
  """The split of a file, from sha1 of its POSIX path relative to the stdlib root."""
  bucket = int(hashlib.sha1(relative_path.encode("utf-8")).hexdigest(), 16) % 100
  return next(s for s, (lo, hi) in _SPLIT_BOUNDS.items() if lo <= bucket < hi)


@functools.lru_cache(maxsize=None)
def _all_files() -> tuple[tuple[Path, str], ...]:
  """(path, split) for every usable stdlib .py file, sorted by relative path."""
  root = stdlib_root()
  out = []
  for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
    rel = path.relative_to(root)
    if EXCLUDED_DIRS & set(rel.parts[:-1]) or path.stat().st_size > MAX_FILE_BYTES:
      continue
    try:
      path.read_bytes().decode("utf-8")
    except (UnicodeDecodeError, OSError):
      continue
    out.append((path, split_of(rel.as_posix())))
  return tuple(out)


def code_files(split: str) -> list[Path]:
  if split not in SPLITS:
    raise ValueError(f"split {split!r} is not one of {SPLITS}")
  return [p for p, s in _all_files() if s == split]


def code_documents(split: str, max_files: int | None = None) -> list[str]:
  """File texts of one split, in sorted-path order (the first `max_files` of them if given)."""
  files = code_files(split)[:max_files]
  return [p.read_text(encoding="utf-8") for p in files]


def next_line_examples(split: str = "test", n: int = 100, seed: int = 0, min_context_chars: int = 256,
                       max_context_chars: int = 2048) -> list[tuple[str, str]]:
  """(context, next_line) pairs for next-line exact match, drawn deterministically from one split.

  The context ends at a line boundary (it ends with "\\n") and starts at a line boundary, holding at least
  `min_context_chars` and at most `max_context_chars` characters of the file just before the cut. The
  target is the line after the cut, without its newline but with its indentation; cuts are only placed
  before non-blank lines, so it is the next non-empty line. Compare a prediction cut at its first newline.
  """
  if split == "train":
    raise ValueError("next_line_examples draws held-out files; use split='validation' or 'test'")
  if not 0 < min_context_chars <= max_context_chars:
    raise ValueError(f"need 0 < min_context_chars <= max_context_chars, got {min_context_chars}, {max_context_chars}")
  files = code_files(split)
  rng = random.Random(seed)
  seen: set[tuple[int, int]] = set()
  out: list[tuple[str, str]] = []
  cache: dict[int, tuple[str, list[int], list[int]]] = {}
  for _ in range(50 * n + 1000):
    if len(out) == n:
      break
    fi = rng.randrange(len(files))
    if fi not in cache:
      text = files[fi].read_text(encoding="utf-8")
      lines = text.splitlines(keepends=True)
      starts = [0]
      for line in lines:
        starts.append(starts[-1] + len(line))
      # Cut before line i: enough text above it and a non-blank line i that ends with a newline.
      cuts = [i for i in range(1, len(lines)) if starts[i] >= min_context_chars and lines[i].strip()
              and lines[i].endswith("\n")]
      cache[fi] = (text, starts, cuts)
    text, starts, cuts = cache[fi]
    if not cuts:
      continue
    i = cuts[rng.randrange(len(cuts))]
    if (fi, i) in seen:
      continue
    seen.add((fi, i))
    # Earliest line start that keeps the context within max_context_chars.
    first = next(j for j in range(i + 1) if starts[i] - starts[j] <= max_context_chars)
    context = text[starts[first]:starts[i]]
    if len(context) < min_context_chars:  # one line longer than the budget; skip this cut
      continue
    out.append((context, text[starts[i]:starts[i + 1]].rstrip("\n")))
  if len(out) < n:
    raise ValueError(f"found only {len(out)} of {n} next-line examples in split {split!r}; lower min_context_chars")
  return out
