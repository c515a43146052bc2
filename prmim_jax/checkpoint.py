"""Checkpoints: one orbax ``CheckpointManager`` saving the train state and the data iterator together.

Layout under ``WORKDIR/checkpoints/<step>/``: ``state/`` (the sharded train
state, written by every process for its shards) and ``data/`` (one JSON file
per process holding its grain iterator state). Saves are asynchronous; only the
last ``keep`` are kept; a step directory appears only once complete, so an
interrupted save never hides or corrupts the previous checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils


class IteratorStateHandler(ocp.CheckpointHandler):
    """Saves a data-iterator state captured when ``save`` was called, one file per process."""

    def save(self, directory: epath.Path, args: IteratorStateSave):
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        (directory / name).write_text(json.dumps(args.state))

    def restore(self, directory: epath.Path, args: IteratorStateRestore | None = None):
        path = directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if not path.exists():
            raise FileNotFoundError(
                f"{path} is missing: the checkpoint was written by a different number of processes "
                f"than the {jax.process_count()} restoring it."
            )
        return json.loads(path.read_text())

    def structure(self, directory):
        return None

    def metadata(self, directory):
        return None

    def finalize(self, directory):
        pass

    def close(self):
        pass


@ocp.args.register_with_handler(IteratorStateHandler, for_save=True)
@dataclasses.dataclass
class IteratorStateSave(ocp.args.CheckpointArgs):
    state: Any


@ocp.args.register_with_handler(IteratorStateHandler, for_restore=True)
@dataclasses.dataclass
class IteratorStateRestore(ocp.args.CheckpointArgs):
    pass


class Checkpointer:
    """Train state + iterator checkpoints in ``directory``; resume is ``restore_latest``."""

    def __init__(self, directory: str | os.PathLike, keep: int = 3, asynchronous: bool = True):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=asynchronous, create=True)
        self.manager = ocp.CheckpointManager(
            epath.Path(directory).absolute(), options=options, item_names=("state", "data")
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, force: bool = False) -> bool:
        """Starts saving ``state`` and the already captured ``data_state``; returns whether it saved."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=IteratorStateSave(data_state))
        return self.manager.save(step, args=args, force=force)

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore_latest(self, abstract_state, step: int | None = None):
        """``(step, state, data_state)`` of the latest checkpoint (or of ``step``), or ``None`` without one.

        ``abstract_state`` is a tree of ``jax.ShapeDtypeStruct`` with shardings:
        the state is restored directly onto the mesh, each process reading its shards.
        """
        step = self.manager.latest_step() if step is None else step
        if step is None:
            return None
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=IteratorStateRestore()),
        )
        return step, restored["state"], restored["data"]

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def read_run_config(workdir: str | os.PathLike, kind: str):
    """The ``ConfigDict`` a run saved as ``WORKDIR/config.json``; ``kind`` names the run in the error."""
    path = epath.Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: is {workdir} a prmim_jax {kind} workdir?")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def restore_on_local_device(workdir: str | os.PathLike, init_state, step: int | None = None):
    """``(step, state)`` of the run's latest checkpoint (or of ``step``), whole on this process's first
    local device. ``init_state()`` builds a fresh (boxed) state of the run's shapes; only its shapes are used."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), nn.unbox(jax.eval_shape(init_state))
    )
    checkpointer = Checkpointer(epath.Path(workdir) / "checkpoints", asynchronous=False)
    try:
        restored = checkpointer.restore_latest(abstract, step)
    finally:
        checkpointer.close()
    if restored is None:
        raise FileNotFoundError(f"{workdir}/checkpoints holds no checkpoint.")
    return restored[0], restored[1]


class PreemptionWatch:
    """Tells the train loop when to save and stop: on SIGTERM, at a step every process agrees on.

    With several processes JAX's distributed runtime picks the step
    (``reached_preemption_sync_point``), so all processes save the same one.
    """

    def __init__(self):
        self.signalled = False
        self._previous = None
        self._multiprocess = jax.process_count() > 1

    def __enter__(self):
        if not self._multiprocess:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum, frame):
        del signum, frame
        self.signalled = True

    def should_stop(self, step: int) -> bool:
        if self._multiprocess:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.signalled
