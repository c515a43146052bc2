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

import ml_collections
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from prmim_jax import config_args, distributed, preemption, train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:arg]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, TensorBoard logs and pictures go; a rerun resumes from it.")
flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0, for multi-process runs outside TPU pods and SLURM."
)
flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
flags.mark_flags_as_required(["config", "workdir"])

flags.DEFINE_integer(
    "heartbeat_timeout",
    distributed.HEARTBEAT_TIMEOUT_SECONDS,
    "Multi-process runs: seconds without a heartbeat after which a process counts as dead and the others stop.",
)
flags.DEFINE_integer(
    "shutdown_timeout",
    distributed.SHUTDOWN_TIMEOUT_SECONDS,
    "Multi-process runs: seconds the processes wait for each other when the run ends, before giving up.",
)


def main(argv):
    del argv
    # Orbax and grain log every checkpoint step at INFO; the progress line is ours.
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("prmim_jax").setLevel(logging.INFO)
    with preemption.exit_on_failure():
        distributed.initialize_distributed(
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
    with where it moved or the closest key; None when every override names a key (or the config file cannot be
    read here)."""
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
        node, parents, keys = config, [], match.group(1).split(".")
        for depth, key in enumerate(keys):
            if not isinstance(node, ml_collections.ConfigDict):
                return f"--config.{match.group(1)}: {'.'.join(parents)}={node!r} is a value, not a section."
            if key not in node:
                below = "".join(f".{k}" for k in keys[depth + 1 :])
                return config_args.unknown_key_message(".".join(parents), key, node, below)
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
