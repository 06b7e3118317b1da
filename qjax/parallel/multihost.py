"""Multi-host start-up and per-process data.

:func:`initialize` wraps ``jax.distributed.initialize``: on Cloud TPU, SLURM, Open MPI and
Kubernetes JAX detects the coordinator, process count and id itself; elsewhere pass them
(or set ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``). On CPU
the cross-process collectives use gloo. Call it first, before anything touches a device.

Each process loads only its rows of the global batch (:func:`process_rows`) and
:func:`global_batch` assembles the global arrays with
``jax.make_array_from_process_local_data``. Logging and checkpoint coordination happen on
process 0 (:func:`is_main_process`, :func:`log`, :func:`sync`; :mod:`qjax.checkpoint`
and :mod:`qjax.parallel.loop` already coordinate their writes).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from qjax.parallel.mesh import batch_shardings

logger = logging.getLogger("qjax.parallel")


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    """Where this process stands: ``process_index`` of ``process_count``, with
    ``local_devices`` of ``global_devices`` devices."""

    process_index: int
    process_count: int
    local_devices: int
    global_devices: int


def process_info() -> ProcessInfo:
    """This process's :class:`ProcessInfo` (initializes the backend)."""
    return ProcessInfo(jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    return None if v in (None, "") else int(v)


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: int | list[int] | None = None,
    cluster_detection_method: str | None = None,
    cpu_collectives: str = "gloo",
    timeout_s: int = 300,
) -> ProcessInfo:
    """Start JAX's multi-process runtime (idempotent); a plain single process is left alone.

    With no arguments, no ``JAX_*`` variables and no detectable cluster (or when JAX's
    backend is already running), it returns without starting anything: the same script
    runs on a laptop and on a pod.

    Args:
      coordinator_address: ``"host:port"`` of process 0's coordinator service (default:
        ``JAX_COORDINATOR_ADDRESS`` or cluster auto-detection).
      num_processes: number of processes (default: ``JAX_NUM_PROCESSES`` or auto-detected).
      process_id: this process's index (default: ``JAX_PROCESS_ID`` or auto-detected).
      local_device_ids: devices this process drives (GPU: one process per GPU).
      cluster_detection_method: force one of JAX's detectors (``"slurm"``,
        ``"mpi4py"``, ...); ``"deactivate"`` disables detection.
      cpu_collectives: cross-process collectives on CPU (``"gloo"`` or ``"mpi"``).
      timeout_s: how long to wait for the other processes.

    Returns:
      The :class:`ProcessInfo` after start-up.

    Raises:
      ValueError: only some of address / count / id are given and no cluster supplies the
        rest (the message says what is missing), or they are given but JAX's backend was
        already started by an earlier device operation.

    Example:
      >>> qjax.parallel.initialize()                                   # TPU pod / SLURM
      >>> qjax.parallel.initialize("10.0.0.1:1234", num_processes=2, process_id=0)
    """
    if jax.distributed.is_initialized():
        return process_info()
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    explicit = [coordinator_address, num_processes, process_id]
    try:
        jax.distributed.initialize(
            coordinator_address,
            num_processes,
            process_id,
            local_device_ids=local_device_ids,
            cluster_detection_method=cluster_detection_method,
            initialization_timeout=timeout_s,
        )
    except ValueError as e:
        if all(v is None for v in explicit) and "should be defined" in str(e):
            logger.info(
                "qjax.parallel.initialize: no cluster detected and no coordinator given: single process"
            )
            return process_info()
        names = ("coordinator_address", "num_processes", "process_id")
        given = ", ".join(f"{n}={v!r}" for n, v in zip(names, explicit))
        missing = [n for n, v in zip(names, explicit) if v is None]
        raise ValueError(
            f"qjax.parallel.initialize: {e} (given: {given}; missing {missing} and no "
            "TPU/SLURM/MPI/Kubernetes cluster supplied them)"
        ) from e
    except RuntimeError as e:  # the backend is already running
        if all(v is None for v in explicit):
            logger.warning("qjax.parallel.initialize: JAX's backend already started; staying single process")
            return process_info()
        raise ValueError(f"qjax.parallel.initialize: {e}; call it before any JAX device operation") from e
    return process_info()


def is_main_process() -> bool:
    """``True`` on process 0 (the one that logs and coordinates checkpoints)."""
    return jax.process_index() == 0


def log(message: str, *args: Any, level: int = logging.INFO) -> None:
    """Log (``logging``, logger ``qjax.parallel``) on process 0 only."""
    if is_main_process():
        logger.log(level, message, *args)


def sync(name: str) -> None:
    """Barrier: every process waits here until all reached ``sync(name)``."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def process_rows(global_rows: int, sharding: NamedSharding) -> slice:
    """The rows of a global batch of ``global_rows`` that this process must load for an
    array split on its leading axis by ``sharding``.

    Raises:
      ValueError: this process's shards are not one contiguous block of rows (the mesh's
        device order interleaves processes along the batch axes).

    Example:
      >>> rows = process_rows(256, batch_sharding(mesh, 2))
      >>> batch = global_batch({"x": x_all[rows], "y": y_all[rows]}, mesh)
    """
    idx = sharding.addressable_devices_indices_map((global_rows,))
    starts = sorted(
        {(ix[0].start or 0, global_rows if ix[0].stop is None else ix[0].stop) for ix in idx.values()}
    )
    lo, hi = starts[0][0], starts[-1][1]
    covered = sum(b - a for a, b in starts)
    if covered != hi - lo:
        raise ValueError(
            f"process_rows: process {jax.process_index()} holds rows {starts}, not one contiguous "
            "block; order the mesh's devices by process (jax.make_mesh does)"
        )
    return slice(lo, hi)


def global_batch(local_batch: Any, shardings: Any) -> Any:
    """Global arrays from this process's rows of every leaf of ``local_batch``.

    Args:
      local_batch: a pytree of host arrays, each this process's rows (:func:`process_rows`).
      shardings: a ``NamedSharding`` tree (a prefix), e.g. ``batch_shardings(mesh, batch)``;
        or a ``Mesh`` for the default batch shardings.

    Returns:
      The pytree of global ``jax.Array``s (leading dimension: rows summed over processes).

    Example:
      >>> batch = global_batch({"x": x_local, "y": y_local}, mesh)
    """
    if isinstance(shardings, Mesh):
        shardings = batch_shardings(shardings, local_batch)
    return jax.tree.map(
        lambda s, x: jax.make_array_from_process_local_data(s, np.asarray(x)),
        shardings,
        local_batch,
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )


def to_host(tree: Any) -> Any:
    """Every array of ``tree`` gathered to numpy on every process (for tests and reports)."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)
