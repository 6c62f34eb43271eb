"""XLA:CPU compiler options for the jitted functions that write tokens into a KVCache and attend to it, and
`decode_jit`, which compiles a decode function with the options its batch size calls for.

They are DebugOptions fields, set per jitted function (`jax.jit(..., compiler_options=...)`), so nothing else
in the process changes; other backends ignore them. Measured on jax/jaxlib 0.10.2 (pinned in requirements.txt:
0.11.1 brought jax#40101, a dynamic-update-slice inside a loop rewriting its whole buffer each iteration on
CPU, which is the decode loop's shape of work) on the 125M benchmark base (12 layers, 512-slot cache) and
SmolLM2-135M's shapes, 2 shared CPU cores, ratios of interleaved medians:

- Copy-insertion region analysis. Without it, XLA:CPU's fusion pass duplicates layer i's dynamic-update-slice
  into the fusion that feeds layer i's attention; the old cache buffer then has two unordered users, and copy
  insertion copies the whole K cache after every layer: 12 copies of [12, B, 4, 513, 64] per `decode_step` at
  B >= 2 (605 MB at B=8), 12 per token in generation's while loop even at B=1, and 12 in KV Prediction's
  last-token step at B >= 2. With it none are left (tests/models/test_decode_hlo.py keeps it so), logits and
  caches bit-identical, the B=8 step 0.63x the time, B=1 unchanged.
- YNNPACK dots off from batch 8. jaxlib 0.10.2 sends every dot to YNNPACK; the decode step's [B, D] x [D, F]
  projections then run faster on XLA's own dot emitter at B=8 and much slower at B=2..4. Whole step, XLA's
  dots / YNNPACK's: 125M 1.08, 1.17, 0.75, 0.55 and SmolLM2-135M 0.99, 3.12, 2.02, 0.84 at B=1, 2, 4, 8.
  Logits move by ~2e-5 (another summation order).
"""

from __future__ import annotations

import functools

import jax

CACHE_WRITE = {"xla_cpu_copy_insertion_use_region_analysis": True}
NO_YNN_DOTS = {"xla_cpu_experimental_ynn_fusion_type": ""}  # an empty list: no dot goes to YNNPACK
NO_YNN_MIN_BATCH = 8


def decode_options(batch: int) -> dict:
  """Compiler options of a decode step over `batch` rows."""
  return {**CACHE_WRITE, **NO_YNN_DOTS} if batch >= NO_YNN_MIN_BATCH else dict(CACHE_WRITE)


def decode_jit(*, batch_argnum: int = 2, **jit_kwargs):
  """Decorator: `jax.jit(fn, **jit_kwargs)` with `decode_options(B)`, where B leads the shape of fn's positional
  argument `batch_argnum` (tokens [B, 1] or logits [B, V]: the third in most decode functions here)."""
  return lambda fn: _DecodeJit(fn, batch_argnum, jit_kwargs)


class _DecodeJit:
  """One jitted function per option set; calling, `lower`, `_cache_size` and `__wrapped__` behave as on a jitted
  function."""

  def __init__(self, fn, batch_argnum: int, jit_kwargs: dict):
    self._fn, self._batch_argnum, self._jit_kwargs, self._jits = fn, batch_argnum, jit_kwargs, {}
    functools.update_wrapper(self, fn)

  def __call__(self, *args, **kwargs):
    return self._jit(args)(*args, **kwargs)

  def lower(self, *args, **kwargs):
    return self._jit(args).lower(*args, **kwargs)

  def _cache_size(self) -> int:
    """Compiled variants over all option sets (as jax's private `_cache_size` of a jitted function)."""
    return sum(j._cache_size() for j in self._jits.values())

  def _jit(self, args):
    large = args[self._batch_argnum].shape[0] >= NO_YNN_MIN_BATCH
    if large not in self._jits:
      self._jits[large] = jax.jit(self._fn, compiler_options=decode_options(NO_YNN_MIN_BATCH if large else 1),
                                  **self._jit_kwargs)
    return self._jits[large]
