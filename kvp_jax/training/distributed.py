"""Many processes, one program: when and how `jax.distributed` starts, and the few things only one process does.

Every process runs the same `python -m kvp_jax.train ...`; after `initialize`, `jax.devices()` lists the devices of
all of them and one mesh spans them. The coordinator (process 0's host:port), the process count and this
process's id come from flags (`--coordinator/--num_processes/--process_id`, e.g. two processes on 127.0.0.1 in
the tests) or from the cluster: JAX itself reads SLURM's, Open MPI's and Cloud TPU's environment. On CPU the
collectives between processes go through gloo.
"""

from __future__ import annotations

import os

import jax
from absl import logging

MODES = ("auto", "on", "off")


def cluster_says_multiprocess(environ=os.environ) -> bool:
  """True when the launcher started several processes: SLURM (srun), Open MPI (mpirun), or a TPU pod's workers."""
  if int(environ.get("SLURM_NTASKS", environ.get("SLURM_NPROCS", "1"))) > 1 and "SLURM_PROCID" in environ:
    return True
  if int(environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return True
  return "," in environ.get("TPU_WORKER_HOSTNAMES", "")


def initialize(mode: str = "auto", coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Starts jax.distributed if this is one of several processes; returns whether it did.

  mode: "auto" starts it when a coordinator is given or the cluster environment says so; "on" always (JAX
  then detects the cluster itself, e.g. on a TPU pod whose workers only the metadata server knows); "off" never.
  Must run before anything touches a JAX device.
  """
  if mode not in MODES:
    raise ValueError(f"--multiprocess must be one of {MODES}, got {mode!r}")
  explicit = coordinator is not None or num_processes is not None or process_id is not None
  if explicit and None in (coordinator, num_processes, process_id):
    raise ValueError("--coordinator, --num_processes and --process_id go together (e.g. --coordinator="
                     "10.0.0.1:1234 --num_processes=2 --process_id=0); pass all three or none")
  if mode == "off" or (mode == "auto" and not explicit and not cluster_says_multiprocess()):
    return False
  if explicit:
    if not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id={process_id} is not in [0, --num_processes={num_processes})")
    jax.distributed.initialize(coordinator, num_processes, process_id)
  else:
    jax.distributed.initialize()
  logging.info("process %d of %d; %d local devices of %d", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  return True


def is_main() -> bool:
  """Process 0: the one that writes the files every process would otherwise write alike."""
  return jax.process_index() == 0


def barrier(name: str):
  """Every process waits here until all have arrived (a no-op for one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
