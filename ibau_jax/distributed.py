"""Multi-process start-up: ``jax.distributed`` from flags or ``IBAU_*`` environment variables."""
from __future__ import annotations

import os

from .errors import ConfigError


def init_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> bool:
    """Join a multi-process JAX job; arguments default to ``IBAU_COORDINATOR`` ("host:port"),
    ``IBAU_NUM_PROCESSES`` and ``IBAU_PROCESS_ID``. Call before any other JAX work.

    Returns False (and does nothing) when no coordinator is given: a single-process run.
    On CPU the cross-process collectives go through gloo (set here explicitly).
    """
    import jax

    coordinator_address = coordinator_address or os.environ.get("IBAU_COORDINATOR") or None
    if num_processes is None and os.environ.get("IBAU_NUM_PROCESSES"):
        num_processes = int(os.environ["IBAU_NUM_PROCESSES"])
    if process_id is None and os.environ.get("IBAU_PROCESS_ID"):
        process_id = int(os.environ["IBAU_PROCESS_ID"])
    if coordinator_address is None:
        if num_processes not in (None, 1):
            raise ConfigError(f"num_processes={num_processes} needs a coordinator address "
                              f"(--coordinator host:port or IBAU_COORDINATOR)")
        return False
    if num_processes is None or process_id is None:
        raise ConfigError("a multi-process run needs the coordinator, the number of processes and this "
                          "process's id (--coordinator/--num-processes/--process-id or IBAU_COORDINATOR/"
                          "IBAU_NUM_PROCESSES/IBAU_PROCESS_ID)")
    if not 0 <= process_id < num_processes:
        raise ConfigError(f"process_id must be in [0, {num_processes}), got {process_id}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # the CPU cross-process backend
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True
