"""A run on disk: its config (``WORKDIR/config.json``), its method, its train state and step.

What the trainer writes and everything else reads: fine-tuning from a pretraining
run, TEC's teacher from one, the tools (pictures, export, robustness). ``load`` is
the ``methods.RunLoader`` the trainer hands to methods that read other runs.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import flax
import jax
import ml_collections
from flax.training import train_state

from prmim_jax import checkpoint, methods


class TrainState(train_state.TrainState):
    """Optimizer state and trained ``params``, plus what a method carries untrained: ``frozen`` parameters
    (a teacher) and ``batch_stats`` (running statistics); both ``{}`` when the method has none."""

    frozen: Any = flax.struct.field(default_factory=dict)
    batch_stats: Any = flax.struct.field(default_factory=dict)

    @property
    def variables(self) -> methods.Variables:
        return methods.Variables(self.params, self.frozen, self.batch_stats)


def init_state(method: methods.Method, tx, rng: jax.Array, batch_size: int) -> TrainState:
    """A fresh state (boxed parameters, ``tx``'s optimizer state) for batches of ``batch_size``."""
    variables = method.init(rng, method.example_batch(batch_size))
    return TrainState.create(
        apply_fn=None, params=variables.params, tx=tx, frozen=variables.frozen, batch_stats=variables.batch_stats
    )


def save_config(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> None:
    """``WORKDIR/config.json``: the run's own description, for whatever reads its checkpoints later."""
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as file:
            file.write(config.to_json_best_effort(indent=1))


def _without_init(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` without where its encoder came from (``init.workdir``, ``init.checkpoint``, ...): a saved run's
    checkpoint holds every trained parameter, so it loads after the pretraining run or file it started from is
    gone."""
    if "init" not in config:
        return config
    config = ml_collections.ConfigDict(config.to_dict())
    for key, value in config.init.items():
        if isinstance(value, str) and key != "checkpoint_layout":
            config.init[key] = None
    return config


def load(workdir: str | pathlib.Path, step: int | None = None) -> methods.TrainedRun:
    """The run in ``workdir`` at its latest checkpoint (or at ``step``), on this host's first local device (each
    process of a multi-host job reads it whole): config, method, ``Variables`` (trained ``params``, ``frozen``,
    ``batch_stats``) and step. ``FileNotFoundError`` naming the fix when ``workdir`` holds no run or no such step."""
    config = checkpoint.read_run_config(workdir, "prmim_jax")
    method = methods.build(_without_init(config))
    tx = method.optimizer(config.batch_size, config.total_steps)
    step, state = checkpoint.restore_on_local_device(
        workdir, lambda: init_state(method, tx, jax.random.key(0), 1), step
    )
    return methods.TrainedRun(config, method, state.variables, step)
