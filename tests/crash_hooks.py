"""Runs a kvp_jax main with a pause inserted, so a crash test can signal or kill it at an exact point:

  python tests/crash_hooks.py HOOK STEP MARK MODULE [FLAGS...]

HOOK is one of
- pause_after_log: once the metrics row of STEP is written, create the file MARK and wait until a SIGTERM has
  been taken by the training loop's handler (the test sends it after seeing MARK), then carry on;
- pause_in_finalize: when orbax is about to finalize checkpoint STEP (its temporary directory is complete,
  the rename to `checkpoints/STEP` not yet done), create MARK and sleep (the test kills the process -9).
The main itself runs unchanged (runpy, as `python -m MODULE` would run it).
"""

import runpy
import sys
import time
from pathlib import Path

hook, step, mark, module, *flags = sys.argv[1:]
step = int(step)

if hook == "pause_after_log":
  from kvp_jax.training import loop

  write = loop.MetricsWriter.write

  def write_then_pause(self, row):
    write(self, row)
    if row["step"] == step:
      Path(mark).touch()
      while not loop._SIGTERM.got:
        time.sleep(0.01)

  loop.MetricsWriter.write = write_then_pause
elif hook == "pause_in_finalize":
  from orbax.checkpoint._src.path import atomicity

  finalize = atomicity.AtomicRenameTemporaryPath.finalize

  async def pause_then_finalize(self, *args, **kwargs):
    if self.get_final().name == str(step):
      Path(mark).touch()
      time.sleep(3600)  # on orbax's commit thread: the test kills the process here
    return await finalize(self, *args, **kwargs)

  atomicity.AtomicRenameTemporaryPath.finalize = pause_then_finalize
else:
  raise SystemExit(f"unknown hook {hook!r}")

sys.argv = [module, *flags]
runpy.run_module(module, run_name="__main__", alter_sys=True)
