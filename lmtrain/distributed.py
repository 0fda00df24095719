"""Multi-host start-up with JAX's own multi-controller runtime (jax.distributed).

One process per host. The coordinator comes from, in order: the --coordinator_address /
--num_processes / --process_id flags; the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID environment; or jax's cluster detection (TPU pods, SLURM), tried when the
environment says the job spans several processes. A single process needs none of it.
"""
from __future__ import annotations

import os

import jax
from absl import flags

_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0, for multi-process runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in the job.")


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  return int(value) if value not in (None, "") else None


def multi_process_requested() -> bool:
  if _COORDINATOR.value or os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return True
  if (_env_int("SLURM_NTASKS") or 1) > 1:  # srun with several tasks
    return True
  return bool(os.environ.get("TPU_WORKER_HOSTNAMES", "").count(","))  # a multi-host TPU slice


def initialize() -> None:
  """Calls jax.distributed.initialize when the job spans several processes."""
  if not multi_process_requested():
    return
  address = _COORDINATOR.value or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if address:
    num = _NUM_PROCESSES.value or _env_int("JAX_NUM_PROCESSES")
    pid = _PROCESS_ID.value if _PROCESS_ID.value is not None else _env_int("JAX_PROCESS_ID")
    if num is None or pid is None:
      raise ValueError(f"--coordinator_address={address} needs --num_processes and --process_id "
                       "(or JAX_NUM_PROCESSES and JAX_PROCESS_ID)")
    if jax.config.jax_platforms == "cpu" or os.environ.get("JAX_PLATFORMS") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid)
  else:
    jax.distributed.initialize()  # TPU pod or SLURM: jax detects the cluster itself
