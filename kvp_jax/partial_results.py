"""The JSON-lines file a long run (eval, bench) appends each finished unit to, so that a rerun (after an
interruption, or eval's with more methods) reuses it: a header line {"fingerprint": ...} naming what the units
depend on, then one object per unit, written as soon as it is done (an interruption loses at most the unit
running)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable


def load(path: Path, fingerprint: dict, key: Callable[[dict], object | None], what: str,
         log: Callable[[str], None]) -> dict:
  """key(obj) -> obj of the units a previous run with the same fingerprint wrote (key None: not a unit). Else
  {}: a file from another run is said so and started over, a missing one begun."""
  path = Path(path)
  units, header = {}, None
  if path.exists():
    for line in path.read_text().splitlines():
      try:
        obj = json.loads(line)
      except json.JSONDecodeError:
        continue  # a line torn by the interruption
      if header is None:
        header = obj.get("fingerprint")
      elif (k := key(obj)) is not None:
        units[k] = obj
    if header == fingerprint:
      return units
    log(f"{path} is from {what}: starting over")
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps({"fingerprint": fingerprint}) + "\n")
  return {}


def append(path: Path, unit: dict):
  """One write per finished unit."""
  with open(path, "a") as f:
    f.write(json.dumps(unit) + "\n")
