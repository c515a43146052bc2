"""Entry point of every run: pretraining, fine-tuning, linear probing (the config's ``method`` says which).

    python -m prmim_jax.main --config configs/pretrain_fmnist.py --workdir /tmp/prmim
    python -m prmim_jax.main --config configs/finetune_fmnist.py --workdir /tmp/ft --config.init.workdir=/tmp/prmim

Multi-host: on TPU pods and SLURM, JAX's runtime finds its peers by itself
(``jax.distributed.initialize()``); elsewhere pass ``--coordinator_address
HOST:PORT --num_processes N --process_id I`` to every process.

A process that fails prints ``process I of N failed: Type: message`` and its
traceback, and exits with status 1 at once; its peers follow within seconds
(``prmim_jax.preemption``). SIGTERM saves a checkpoint and exits 0.
"""

from __future__ import annotations

import logging
import re
import sys

import jax
import ml_collections
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from prmim_jax import config_validation, preemption, train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:arg]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, TensorBoard logs and pictures go; a rerun resumes from it.")
flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0, for multi-process runs outside TPU pods and SLURM."
)
flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
flags.mark_flags_as_required(["config", "workdir"])

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
flags.DEFINE_integer(
    "heartbeat_timeout",
    HEARTBEAT_TIMEOUT_SECONDS,
    "Multi-process runs: seconds without a heartbeat after which a process counts as dead and the others stop.",
)
flags.DEFINE_integer(
    "shutdown_timeout",
    SHUTDOWN_TIMEOUT_SECONDS,
    "Multi-process runs: seconds the processes wait for each other when the run ends, before giving up.",
)


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


def main(argv):
    del argv
    # Orbax and grain log every checkpoint step at INFO; the progress line is ours.
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("prmim_jax").setLevel(logging.INFO)
    with preemption.exit_on_failure():
        initialize_distributed(
            FLAGS.coordinator_address,
            FLAGS.num_processes,
            FLAGS.process_id,
            heartbeat_timeout=FLAGS.heartbeat_timeout,
            shutdown_timeout=FLAGS.shutdown_timeout,
        )
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


def config_file_argument(argv: list[str]) -> str | None:
    """The ``--config`` value of ``argv`` (``--config=FILE[:arg]`` or ``--config FILE[:arg]``), or None."""
    for index, arg in enumerate(argv):
        if match := re.fullmatch(r"-{1,2}config=(.+)", arg):
            return match.group(1)
        if re.fullmatch(r"-{1,2}config", arg) and index + 1 < len(argv):
            return argv[index + 1]
    return None


def unknown_override(argv: list[str]) -> str | None:
    """The one-line message for the first ``--config.PATH=...`` of ``argv`` that names no key of the config file,
    with the closest key; None when every override names a key (or the config file cannot be read here)."""
    path = config_file_argument(argv)
    if path is None:
        return None
    try:
        config = FLAGS["config"].parser.parse(path)
    except Exception:
        return None
    for arg in argv:
        match = re.match(r"-{1,2}(?:no)?config\.([^=]+)", arg)
        if match is None or "[" in match.group(1):
            continue
        node, parents = config, []
        for key in match.group(1).split("."):
            if not isinstance(node, ml_collections.ConfigDict):
                return f"--config.{match.group(1)}: {'.'.join(parents)}={node!r} is a value, not a section."
            if key not in node:
                return config_validation.unknown_key_message(".".join(parents), key, node)
            node, parents = node[key], [*parents, key]
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, except that a ``--config.KEY`` the config lacks ends the program with one line naming
    it and the closest key (exit status 2, a usage error) rather than ml_collections' traceback."""
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError):
        message = unknown_override(argv)
        if message is None:
            raise
        sys.stderr.write(f"FATAL Flags parsing error: {message}\n")
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
