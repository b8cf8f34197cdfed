"""Multi-host start-up: JAX's own multi-controller runtime (`jax.distributed`), nothing home-made.

`initialize` is a no-op on one host. On TPU pods and under SLURM, JAX detects the coordinator,
process count and id itself; elsewhere they are given explicitly (flags or the environment
variables KTAE_COORDINATOR, KTAE_NUM_PROCESSES, KTAE_PROCESS_ID).
"""

from __future__ import annotations

import os

import jax


def _auto_detected() -> bool:
    # A TPU VM lists its slice's hosts; one host (or none) needs no jax.distributed.
    hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    on_tpu_pod = len(hosts) > 1 or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ
    in_slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
    return on_tpu_pod or in_slurm


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None) -> bool:
    """Start `jax.distributed` when this is one of several processes; returns whether it did.

    Must run before any other JAX call. On CPU, cross-process collectives go through gloo.
    """
    coordinator = coordinator or os.environ.get("KTAE_COORDINATOR")
    num_processes = num_processes or (int(os.environ["KTAE_NUM_PROCESSES"]) if "KTAE_NUM_PROCESSES" in os.environ else None)
    if process_id is None and "KTAE_PROCESS_ID" in os.environ:
        process_id = int(os.environ["KTAE_PROCESS_ID"])
    if coordinator or _auto_detected():
        if os.environ.get("JAX_PLATFORMS", "") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator:
        if num_processes is None or process_id is None:
            raise ValueError("a coordinator address needs the process count and this process's id too")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
        return True
    if _auto_detected():
        jax.distributed.initialize()
        return True
    return False
