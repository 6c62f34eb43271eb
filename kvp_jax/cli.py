"""What every absl main shares: a bad flag or a bad input ends in one line on stderr, never a traceback; a
preempted training run exits cleanly once its checkpoint is written; a command that fails on bad input leaves
no half-made output directory behind.

Exit codes: 0 done, or preempted after a checkpoint (rerunning the same command resumes); 1 training diverged
(the last good checkpoint is kept); 2 bad input (a flag, a path, a checkpoint, a mismatch).
Flag validators (`at_least`, `finite_above`, `fraction`, `ints`, `int_pair`, `floats_in`) run while absl parses
the command line, so a wrong value is refused before anything is loaded.
"""

from __future__ import annotations

import logging as pylogging
import math
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterable

from absl import app, flags, logging

DIVERGED, BAD_INPUT = 1, 2


def one_line(message) -> str:
  text = " ".join(l.strip() for l in str(message).splitlines() if l.strip())
  return text if len(text) <= 600 else text[:597] + "..."


def fail(message, code: int = BAD_INPUT):
  print(f"error: {one_line(message)}", file=sys.stderr, flush=True)
  sys.exit(code)


def parse_flags(argv):
  """absl's parser, but a bad flag is one `error:` line and exit 2 (absl prints two lines and exits 1)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:  # absl puts one failed check per line: the first is the one to fix first
    first = next((l.strip() for l in str(e).splitlines() if l.strip()), type(e).__name__)
    fail(f"{first.replace('ERROR:: ', '')} (see --helpshort)")


def run(main: Callable[[], None], *, outputs: Callable[[], Iterable] = lambda: ()):
  """`app.run` for a main that takes no arguments (every setting is a flag).

  outputs: the directories the command writes into, read after flag parsing; one this command creates is
  removed again if the command then fails on bad input before any result (a finished checkpoint, an
  evaluated row, a report) is in it.
  """
  app.run(lambda argv: _guarded(main, argv, outputs), flags_parser=parse_flags)


def _guarded(main, argv, outputs):
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}; every setting is a --flag (see --helpshort)")
  logging.get_absl_handler().addFilter(_keep_record)
  fresh = [Path(p) for p in outputs() if p and not Path(p).exists()]
  try:
    main()
  except Exception as e:  # noqa: BLE001 - sorted below; anything else keeps its traceback
    # The training loop's own exceptions; if it was never imported, neither can have been raised.
    loop = sys.modules.get("kvp_jax.training.loop")
    if loop is not None and isinstance(e, loop.Preempted):
      print(f"preempted: {e}", file=sys.stderr, flush=True)
      sys.exit(0)
    if loop is not None and isinstance(e, loop.Diverged):
      fail(e, DIVERGED)
    if isinstance(e, (ValueError, OSError)):  # CheckpointError is a ValueError
      for p in fresh:
        if p.is_dir() and not _holds_results(p):
          shutil.rmtree(p, ignore_errors=True)
      fail(_describe(e))
    raise


def _keep_record(r: pylogging.LogRecord) -> bool:
  """Keeps the log to our own lines: orbax logs every step of every save and restore at INFO, and jax's
  xla_bridge logs its backend probe ("Unable to initialize backend 'tpu'") at INFO on some machines, which would
  make a bad-input error two lines on stderr. Their warnings and errors still pass."""
  if "orbax" in r.pathname:
    return False
  return r.levelno >= pylogging.WARNING or not ("xla_bridge" in r.pathname or r.name.endswith("xla_bridge"))


def _describe(e: Exception) -> str:
  if isinstance(e, OSError) and e.strerror and e.filename:
    return f"{e.strerror}: {e.filename}"
  return str(e) or type(e).__name__


def _holds_results(p: Path) -> bool:
  for f in p.rglob("*"):
    if f.name.isdigit() and f.parent.name == "checkpoints" and f.is_dir():  # a finished orbax step
      return True
    if f.name in ("report.json",) or f.name.endswith(".partial.jsonl"):
      return True
  return False


# ---------------------------------------------------------------------------------------------- validators


def at_least(name: str, lo: int):
  flags.register_validator(name, lambda v: v is None or v >= lo, message=f"must be >= {lo}")


def finite_above(name: str, lo: float, *, inclusive: bool = False):
  ok = lambda v: v is None or (math.isfinite(v) and (v >= lo if inclusive else v > lo))
  flags.register_validator(name, ok, message=f"must be a finite number {'>=' if inclusive else '>'} {lo}")


def fraction(name: str, *, zero: bool = False):
  """A value in (0, 1] (or [0, 1] with zero=True); absl's own bounds would let nan through."""
  ok = lambda v: v is None or (math.isfinite(v) and (0 <= v if zero else 0 < v) and v <= 1)
  flags.register_validator(name, ok, message=f"must be in {'[' if zero else '('}0, 1]")


def _all(parse, values, test) -> bool:
  try:
    return all(test(parse(x)) for x in values)
  except ValueError:
    return False


def ints(name: str, lo: int):
  """A list flag of integers, each >= lo."""
  flags.register_validator(name, lambda v: v is None or _all(int, v, lambda x: x >= lo),
                           message=f"must be comma-separated integers >= {lo}")


def floats_in(name: str, lo: float, hi: float):
  """A list flag of numbers, each in (lo, hi]."""
  flags.register_validator(name, lambda v: v is None or _all(float, v, lambda x: lo < x <= hi),
                           message=f"must be comma-separated numbers in ({lo}, {hi}]")


def int_pair(name: str, lo: int):
  """A list flag MIN,MAX of integers with lo <= MIN <= MAX."""
  ok = lambda v: v is None or (len(v) == 2 and _all(int, v, lambda x: x >= lo) and int(v[0]) <= int(v[1]))
  flags.register_validator(name, ok, message=f"must be MIN,MAX with {lo} <= MIN <= MAX")


def conflict(names: list[str], bad: Callable[[dict], bool], message: str):
  """A rule over several flags (absl runs it after every flag is parsed)."""
  flags.register_multi_flags_validator(names, lambda d: not bad(d), message=message)


def writable_dir(path, what: str) -> Path:
  """Creates `path` if needed and checks that a file can be written there, before any long work starts."""
  p = Path(path)
  if p.exists() and not p.is_dir():
    raise ValueError(f"{what} {p} is a file; pass a directory")
  try:
    p.mkdir(parents=True, exist_ok=True)
    probe = p / ".kvp_jax_write_probe"
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    raise ValueError(f"cannot write to {what} {p} ({e.strerror}); pass a writable directory") from None
  return p
