"""Joining JAX's multi-controller runtime (``jax.distributed``): one call every entry point makes first."""

from __future__ import annotations

import logging

import jax

# How soon the processes of a multi-process run notice a peer that died or hangs; JAX's defaults are 100 s
# and 300 s. A dead peer usually shows at once, as a collective error (the processes exit on any error
# without waiting for each other, preemption.exit_on_failure); the heartbeat is what ends survivors blocked
# where no error comes, in an accelerator collective or a barrier. Each process's runtime sends a heartbeat
# from its own thread every half timeout, untouched by compiling, the GIL or a busy input pipeline, so
# 30 s is only reached by a host that is gone or a network that would fail the collectives anyway. The
# shutdown timeout is how long processes that finished wait for the rest at the end of a run: after the
# last collective only the final save's commit and process 0's TensorBoard flush remain (seconds, on
# cloud storage too), and 120 s leaves room for a slow file system rather than fail a finished run.
HEARTBEAT_TIMEOUT_SECONDS = 30
SHUTDOWN_TIMEOUT_SECONDS = 120


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    heartbeat_timeout: int = HEARTBEAT_TIMEOUT_SECONDS,
    shutdown_timeout: int = SHUTDOWN_TIMEOUT_SECONDS,
) -> None:
    """Joins JAX's multi-controller runtime when there is more than one process.

    ``coordinator_address`` (``HOST:PORT`` of process 0), ``num_processes`` and ``process_id`` name the
    run outside TPU pods, SLURM and Open MPI, where they are detected; without an address and outside
    those, this process runs alone. ``heartbeat_timeout`` and ``shutdown_timeout`` are in seconds (see
    ``HEARTBEAT_TIMEOUT_SECONDS``).
    """
    # CPU devices of different processes exchange collectives through gloo; accelerators are unaffected.
    # (Asking for the backend here would start it, and initialize() must come first.)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    timeouts = dict(heartbeat_timeout_seconds=heartbeat_timeout, shutdown_timeout_seconds=shutdown_timeout)
    if coordinator_address:
        jax.distributed.initialize(coordinator_address, num_processes, process_id, **timeouts)
        return
    try:
        jax.distributed.initialize(**timeouts)  # TPU pods, SLURM, Open MPI: detected from the environment
    except (ValueError, RuntimeError) as error:
        logging.info("single process (%s)", error)
