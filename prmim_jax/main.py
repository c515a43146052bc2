"""Entry point of every run: pretraining, fine-tuning, linear probing (the config's ``method`` says which).

    python -m prmim_jax.main --config configs/pretrain_fmnist.py --workdir /tmp/prmim
    python -m prmim_jax.main --config configs/finetune_fmnist.py --workdir /tmp/ft --config.init.workdir=/tmp/prmim

Multi-host: on TPU pods and SLURM, JAX's runtime finds its peers by itself
(``jax.distributed.initialize()``); elsewhere pass ``--coordinator_address
HOST:PORT --num_processes N --process_id I`` to every process.
"""

from __future__ import annotations

import logging

import jax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from prmim_jax import train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:arg]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, TensorBoard logs and pictures go; a rerun resumes from it.")
flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0, for multi-process runs outside TPU pods and SLURM."
)
flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
flags.mark_flags_as_required(["config", "workdir"])


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None) -> None:
    """Joins JAX's multi-controller runtime when there is more than one process."""
    # CPU devices of different processes exchange collectives through gloo; accelerators are unaffected.
    # (Asking for the backend here would start it, and initialize() must come first.)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator_address:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
        return
    try:
        jax.distributed.initialize()  # TPU pods, SLURM, Open MPI: detected from the environment
    except (ValueError, RuntimeError) as error:
        logging.info("single process (%s)", error)


def main(argv):
    del argv
    # Orbax and grain log every checkpoint step at INFO; the progress line is ours.
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("prmim_jax").setLevel(logging.INFO)
    initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
