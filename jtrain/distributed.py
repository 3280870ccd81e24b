"""Joining a multi-process JAX job, before the first JAX computation.

One process per host (or per GPU) runs the same program; `jax.distributed.initialize` connects
them through a coordinator so that `jax.devices()` lists every device of the job and one jitted
step runs over all of them. Where the three facts come from, first match wins:

1. explicit arguments (`python -m jtrain.run --coordinator_address H:P --num_processes N --process_id I`);
2. the environment: `JAX_COORDINATOR_ADDRESS` (which JAX itself reads), `JAX_NUM_PROCESSES` and
   `JAX_PROCESS_ID` (which `python -m jtrain.launch` sets);
3. a cluster JAX detects by itself: a multi-task SLURM step or Open MPI job is joined
   automatically; `--coordinator_address auto` asks JAX to detect any cluster it knows (Cloud
   TPU slices, Kubernetes, mpi4py).

With none of these the run stays a single process and nothing is initialised.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from jtrain.errors import ConfigError

AUTO = "auto"


@dataclass(frozen=True)
class JobSpec:
    """What `maybe_initialize` resolved: None fields are left to JAX's cluster detection."""

    coordinator_address: str | None
    num_processes: int | None
    process_id: int | None

    @property
    def auto_detect(self) -> bool:
        return self.coordinator_address == AUTO


def _int_or_none(value: int | str | None, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"`{name}` must be an integer, got {value!r}") from err


def cluster_launched() -> bool:
    """True inside a multi-task SLURM step or Open MPI job (JAX reads their variables itself)."""
    env = os.environ
    slurm = "SLURM_JOB_ID" in env and "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1
    ompi = int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    return slurm or ompi


def resolve_job(coordinator_address: str | None = None, num_processes: int | str | None = None,
                process_id: int | str | None = None) -> JobSpec | None:
    """The job to join, or None for a single-process run. Pure apart from reading the environment."""
    env = os.environ
    address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
    n = _int_or_none(num_processes if num_processes is not None else env.get("JAX_NUM_PROCESSES"), "num_processes")
    pid = _int_or_none(process_id if process_id is not None else env.get("JAX_PROCESS_ID"), "process_id")
    if address == AUTO or (address is None and n is None and pid is None and cluster_launched()):
        return JobSpec(AUTO, n, pid)
    if address is None and n is None and pid is None:
        return None
    if n is not None and n < 1:
        raise ConfigError(f"`num_processes` must be >= 1, got {n}")
    if n == 1 and address is None:
        return None
    missing = [name for name, v in (("coordinator_address", address), ("num_processes", n),
                                    ("process_id", pid)) if v is None]
    if missing:
        raise ConfigError(f"a multi-process run needs --coordinator_address, --num_processes and --process_id; "
                          f"missing: {', '.join('--' + m for m in missing)}")
    if not 0 <= pid < n:
        raise ConfigError(f"`process_id` must be in [0, num_processes={n}), got {pid}")
    if ":" not in address:
        raise ConfigError(f"`coordinator_address` must be HOST:PORT, got {address!r}")
    return JobSpec(address, n, pid)


def maybe_initialize(coordinator_address: str | None = None, num_processes: int | str | None = None,
                     process_id: int | str | None = None, *, initialization_timeout: int = 300) -> bool:
    """Join the multi-process job described by the arguments or environment; True if one was joined.

    Must run before any JAX computation (JAX fixes its device list when the backend starts).
    On CPU, cross-process collectives use gloo. Calling it again in the same process is a no-op.

    Example::

        maybe_initialize("10.0.0.1:1234", num_processes=2, process_id=0)   # on host 0
        maybe_initialize()                        # from JAX_* variables, SLURM or Open MPI
    """
    import jax

    if jax.distributed.is_initialized():
        return True
    job = resolve_job(coordinator_address, num_processes, process_id)
    if job is None:
        return False
    # gloo is JAX's default CPU implementation today; naming it keeps a CPU job working if that changes.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if job.auto_detect:
        jax.distributed.initialize(num_processes=job.num_processes, process_id=job.process_id,
                                   initialization_timeout=initialization_timeout)
    else:
        # All three were given: no cluster detection, which under SLURM would also pin each process to
        # one device (JAX's one-process-per-GPU default) and hide the others of a one-process-per-host job.
        jax.distributed.initialize(job.coordinator_address, job.num_processes, job.process_id,
                                   cluster_detection_method="deactivate",
                                   initialization_timeout=initialization_timeout)
    return True


def is_main_process() -> bool:
    """Process 0 prints, logs and writes every file that is not a checkpoint shard."""
    import jax

    return jax.process_index() == 0


_HOST_RANKS: tuple[int, int] | None = None  # (this process's rank on its host, hosts in the job), once known


def _host_ranks() -> tuple[int, int]:
    """(local process index, number of hosts), from every process's host name, gathered once.

    JAX names no host of a process, so the job compares `socket.gethostname()`s (as CRC32s).
    The first call is a collective: every process of the job must make it (the Trainer's
    constructor does); later calls read the cached answer. A single-process run needs no gather.
    """
    global _HOST_RANKS
    if _HOST_RANKS is None:
        import socket
        import zlib

        import jax
        import numpy as np

        if jax.process_count() == 1:
            _HOST_RANKS = (0, 1)
        else:
            from jax.experimental import multihost_utils

            mine = zlib.crc32(socket.gethostname().encode()) & 0x7FFFFFFF
            hosts = np.asarray(multihost_utils.process_allgather(np.array([mine], np.int32))).reshape(-1)
            me = jax.process_index()
            _HOST_RANKS = (int(np.sum(hosts[:me] == mine)), len(set(hosts.tolist())))
    return _HOST_RANKS


def local_process_index() -> int:
    """This process's rank among the job's processes on the same host (HF's `local_process_index`):
    0 for every process of a one-process-per-host job, 0..k-1 with k processes per host."""
    return _host_ranks()[0]


def host_count() -> int:
    """How many hosts the job's processes run on (HF's nodes)."""
    return _host_ranks()[1]


def broadcast_object(obj: object) -> object:
    """Process 0's `obj` on every process (pickled, then sent as bytes); `obj` itself in a
    single-process run. A collective: every process must call it at the same point, the others
    with any placeholder (None). The byte buffer is padded to a power of two so that a run of
    messages compiles only a few broadcast programs."""
    import pickle

    import jax
    import numpy as np

    if jax.process_count() == 1:
        return obj
    from jax.experimental import multihost_utils

    data = pickle.dumps(obj) if jax.process_index() == 0 else b""
    size = int(multihost_utils.broadcast_one_to_all(np.array(len(data), np.int32)))
    padded = max(256, 1 << (size - 1).bit_length())
    buffer = np.zeros(padded, np.uint8)
    buffer[:len(data)] = np.frombuffer(data, np.uint8)
    received = np.asarray(multihost_utils.broadcast_one_to_all(buffer))
    return pickle.loads(received[:size].tobytes())
