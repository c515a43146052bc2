"""Profiles on request: a ``jax.profiler`` trace of a few training steps, for TensorBoard's profile plugin and XProf.

The config section (``profile_config``, ``config.profile``)::

    config.profile.start_step = 10   # steps done before the trace starts: compilation and warm-up stay out
    config.profile.num_steps = 3     # steps traced; 0 (the default): no trace

The trace of steps ``start_step + 1`` to ``start_step + num_steps`` goes to ``WORKDIR/profile``
(``plugins/profile/<date>/<host>.xplane.pb``): ``tensorboard --logdir WORKDIR`` shows it under the
profile tab, ``xprof --logdir WORKDIR/profile`` too. Process 0 traces (its host's devices); the others
run the same program. Tracing changes no number of the run.
"""

from __future__ import annotations

import jax
import ml_collections


def profile_config(**overrides) -> ml_collections.ConfigDict:
    """``config.profile``: ``start_step`` (steps before the trace), ``num_steps`` (steps traced; 0: off)."""
    config = ml_collections.ConfigDict(dict(start_step=10, num_steps=0))
    config.update(overrides)
    return config


class Window:
    """The traced steps of a run: ``start(step)`` before each step (``step`` steps done), ``stop(step, outputs)``
    after it; the trace runs from ``start_step`` steps done to ``start_step + num_steps``. A run that resumes
    past ``start_step`` traces nothing. Use as a context manager: leaving it ends an open trace."""

    def __init__(self, section: ml_collections.ConfigDict, directory: str, enabled: bool = True):
        self.first, self.last = section.start_step, section.start_step + section.num_steps
        self.directory, self.enabled = directory, enabled and section.num_steps > 0
        self.tracing = False

    def start(self, step: int) -> None:
        if self.enabled and step == self.first:
            jax.profiler.start_trace(self.directory)
            self.tracing = True

    def stop(self, step: int, outputs) -> str | None:
        """Ends the trace after its last step, once ``outputs`` (the step's results) are computed, so the
        trace holds the device's work; the line for the log then."""
        if not (self.tracing and step == self.last):
            return None
        jax.block_until_ready(outputs)
        self.close()
        return f"profile of steps {self.first + 1}-{self.last} written to {self.directory}"

    def close(self) -> None:
        if self.tracing:
            jax.profiler.stop_trace()
            self.tracing = False

    def __enter__(self) -> Window:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
