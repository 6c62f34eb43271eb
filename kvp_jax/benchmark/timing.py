"""How the benchmark times and measures a compiled call: ahead-of-time compilation, interleaved runs with
`block_until_ready`, XLA's and the process's memory figures, a float32 matmul roofline, and the machine record.

Memory, two figures per row:
- `peak_mem_bytes` (JAX rows): XLA's buffer assignment for the compiled call, `memory_analysis()`:
  its peak where the backend reports one, else arguments (weights, tokens, cache) + outputs + temporaries
  - aliased bytes. Static, so noise-free.
- `rss_peak_delta_bytes` (every row, also torch): the process's resident-set high-water mark during one call
  minus the resident set before it (Linux `/proc/self/clear_refs` reset). Allocator caching makes it a lower
  bound on what the call allocates.
"""

from __future__ import annotations

import os
import platform
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


def aot_compile(jitted, *args, **kwargs):
  """(compiled, seconds) of an ahead-of-time `lower(...).compile()`."""
  t0 = time.perf_counter()
  compiled = jitted.lower(*args, **kwargs).compile()
  return compiled, time.perf_counter() - t0


def xla_peak_bytes(compiled) -> int | None:
  try:
    m = compiled.memory_analysis()
  except Exception:  # some backends do not report
    return None
  if m is None:
    return None
  peak = int(getattr(m, "peak_memory_in_bytes", 0) or 0)
  if peak:
    return peak
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def _proc_status_kb(field: str) -> int | None:
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1])
  except OSError:
    pass
  return None


def rss_peak_delta(call: Callable[[], Any]) -> tuple[Any, int | None]:
  """Runs call() once: (its output, resident-set high-water mark during it minus the resident set before)."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")  # resets VmHWM to the current VmRSS
  except OSError:
    return jax.block_until_ready(call()), None
  before = _proc_status_kb("VmRSS")
  out = jax.block_until_ready(call())
  peak = _proc_status_kb("VmHWM")
  return out, None if before is None or peak is None else max(0, peak - before) * 1024


def time_interleaved(calls: dict[str, Callable[[], Any]], runs: int, warmup: int) -> dict[str, list[float]]:
  """Seconds of each call, run by run in turn (every call's run r happens between everyone's r-1 and r+1).

  The order rotates by one each run, so no call always runs first (after the others have evicted its
  weights from the caches) or always right after the same neighbour.
  """
  for _ in range(warmup):
    for c in calls.values():
      jax.block_until_ready(c())
  keys = list(calls)
  times = {k: [] for k in calls}
  for r in range(runs):
    for k in keys[r % len(keys):] + keys[:r % len(keys)]:
      t0 = time.perf_counter()
      jax.block_until_ready(calls[k]())
      times[k].append(time.perf_counter() - t0)
  return times


def stats(ts: list[float]) -> dict[str, float]:
  return {"median": float(np.median(ts)), "min": float(np.min(ts)), "max": float(np.max(ts))}


def matmul_call(n: int, dtype=jnp.float32):
  """(call, flops, compile_s) of an n x n x n matmul: the roofline that prefill's FLOP/s is measured against."""
  a = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
  b = jax.random.normal(jax.random.PRNGKey(2), (n, n), dtype)
  compiled, cs = aot_compile(jax.jit(jnp.matmul), a, b)
  return (lambda: compiled(a, b)), 2 * n ** 3, cs


def read_bandwidth_call(nbytes: int, dtype=jnp.float32):
  """(call, bytes read) of the memory half of the roofline: a [1, 1024] x [1024, n] product over `nbytes` of
  matrix, the kind of kernel a decode step runs (each element read once; far larger than the caches). A flat
  `jnp.sum` over as many bytes read 0.7x as fast on this 2-core CPU, so it would understate the bandwidth."""
  itemsize = jnp.dtype(dtype).itemsize
  n = max(1, nbytes // itemsize // 1024)
  w = jnp.ones((1024, n), dtype)
  v = jnp.ones((1, 1024), dtype)
  compiled, _ = aot_compile(jax.jit(jnp.matmul), v, w)
  return (lambda: compiled(v, w)), 1024 * n * itemsize


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def env_record() -> dict[str, Any]:
  import jaxlib
  env = {
      "jax": jax.__version__, "jaxlib": jaxlib.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "jax_platforms": os.environ.get("JAX_PLATFORMS", ""), "backend": jax.default_backend(),
      "devices": [str(d) for d in jax.devices()], "device_kind": jax.devices()[0].device_kind,
      "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
      "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
      "python": platform.python_version(), "platform": platform.platform(),
      "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
  }
  try:
    env["loadavg_start"] = list(os.getloadavg())
  except OSError:
    pass
  try:
    import torch
    import transformers
    env.update(torch=torch.__version__, torch_threads=torch.get_num_threads(), transformers=transformers.__version__)
  except ImportError:
    env["torch"] = None
  return env
