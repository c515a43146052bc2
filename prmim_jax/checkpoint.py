"""Checkpoints: one orbax ``CheckpointManager`` saving the train state and the data iterator together,
with checksums, so that a damaged step is noticed, set aside and replaced by the newest good one.

Layout of ``WORKDIR/checkpoints/<step>/``: ``state/`` (the sharded train state,
written by every process for its shards), ``data/process_<i>-of-<n>.json`` (each
process's grain iterator state), for runs whose sampler keeps per-image state
``host/process_<i>-of-<n>.npz`` (each process's share of it: AMT's attention
maps, ``prmim_jax.attention_maps``) and ``checksums.json``::

    {"format": 1, "step": 6, "process_count": 2,
     "files": {"state/_METADATA": {"bytes": 60632, "sha256": "..."}, ...}}

Saves are asynchronous; only the last ``keep`` steps are kept.

When things are written, and what a kill at each moment leaves:

- Orbax writes a step into ``<step>.orbax-checkpoint-tmp`` and renames it to
  ``<step>`` once every process has written its part. Just before that rename,
  process 0 hashes every file in the temporary directory (orbax's
  post-finalization callback, in the background save thread) and writes
  ``checksums.json`` into it, so a step directory appears already carrying its
  checksums, in one rename. A kill before the rename leaves only the temporary
  directory, which orbax ignores (and the trainer removes when it next starts):
  the previous step stays the newest. A kill after the rename leaves a complete,
  verifiable step. There is no moment at which a finalized step lacks its checksums.
- A step *without* ``checksums.json`` (saved before checksums existed, or the
  file was removed) is *unverified*: it is restored if orbax can read it, and
  treated like a damaged step if it cannot.
- Two files at the top of a step are not covered: orbax rewrites
  ``_CHECKPOINT_METADATA`` and writes ``commit_success.txt`` after the callback;
  damage to them shows up as an orbax restore error instead.

The checksums and the setting aside of damaged steps are ``prmim_jax.checkpoint_integrity``'s.

Restore (``restore_latest``) tries steps newest first. Process 0 checks each
step's files against its checksums (missing, truncated, changed, unreadable) and
tells the others; then every process restores the step. A step is *damaged* if
its checksums fail, or if it has none and orbax cannot restore it: the run falls
back to the next older step, and once one restores, each damaged newer step is
renamed to ``<step>.corrupt`` (never deleted; orbax ignores that name; only
process 0 renames) with a warning on the ``prmim_jax.checkpoint`` logger naming
the directory and what is wrong. All processes restore the same step. Not
damage, and raised at once with nothing moved (``CheckpointMismatchError``): a
step whose checksums verify but which orbax cannot restore into this run's state
(the model, optimizer or mesh changed), and a step written by a different number
of processes (each process's iterator position belongs to its share of the
data). If every step is damaged the restore raises ``CheckpointDamagedError``
naming each directory and moves nothing: a run never silently starts again from
step 0 over its own checkpoints. Readers (``restore_on_local_device``: ``runs.load``,
pictures, fine-tuning init, robustness) restore the state only, so they read a
run saved by any number of processes; they skip damaged steps with a warning and
move nothing.

A failed asynchronous save (disk full, quota, I/O error) is raised by
``check_save()``, cheap enough to call after every train step, as one
``CheckpointSaveError`` naming the step, its directory and the OS error (for a
full disk: the space the checkpoint needs and what was free), instead of
orbax's tracebacks at the next save.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno as errno_lib
import functools
import io
import json
import logging
import os
import re
import shutil
import sys
import threading
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from prmim_jax import checkpoint_integrity as integrity

logger = logging.getLogger(__name__)


class CheckpointDamagedError(RuntimeError):
    """No checkpoint of a run (or not the one asked for) passes its checksums and restores."""


class CheckpointMismatchError(ValueError):
    """An intact checkpoint that does not fit this run (other shapes, or another number of processes)."""


class CheckpointSaveError(RuntimeError):
    """An asynchronous save failed; ``step``, ``directory`` and ``errno`` (or ``None``) say where and why."""

    def __init__(self, message: str, step: int, directory: str, errno: int | None):
        super().__init__(message)
        self.step, self.directory, self.errno = step, directory, errno


# --- the data iterator item ----------------------------------------------------------------------


@dataclasses.dataclass
class _RestoreProblem:
    """Why a step did not restore. ``_PerProcessHandler.restore`` returns one instead of raising (see there)."""

    message: str
    written_by: int | None = None  # the number of processes that wrote the step, when it is not ours


def _process_file(suffix: str, process_index: int, process_count: int) -> str:
    return f"process_{process_index}-of-{process_count}.{suffix}"


class _PerProcessHandler(ocp.CheckpointHandler):
    """An item that every process writes and reads as its own file, ``process_<i>-of-<n>.<suffix>``."""

    suffix: str

    def encode(self, value) -> bytes:
        raise NotImplementedError

    def decode(self, data: bytes):
        raise NotImplementedError

    def save(self, directory: epath.Path, args):
        (directory / _process_file(self.suffix, jax.process_index(), jax.process_count())).write_bytes(
            self.encode(args.value)
        )

    def restore(self, directory: epath.Path, args=None):
        """The item, or a ``_RestoreProblem``: never raises, because a process that raised
        here would skip the barrier orbax's restore ends with while the other processes wait in it."""
        path = directory / _process_file(self.suffix, jax.process_index(), jax.process_count())
        try:
            return self.decode(path.read_bytes())
        except FileNotFoundError:
            counts = set()
            if directory.exists():
                pattern = re.compile(rf"process_(\d+)-of-(\d+)\.{self.suffix}")
                counts = {int(m.group(2)) for p in directory.iterdir() if (m := pattern.fullmatch(p.name))}
            if counts and jax.process_count() not in counts:
                return _RestoreProblem(f"{path.name} is missing", written_by=max(counts))
            return _RestoreProblem(f"{directory.name}/{path.name} is missing")
        except (OSError, ValueError) as error:
            return _RestoreProblem(f"{directory.name}/{path.name} is unreadable ({type(error).__name__}: {error})")

    def structure(self, directory):
        return None

    def metadata(self, directory):
        return None

    def finalize(self, directory):
        pass

    def close(self):
        pass


class IteratorStateHandler(_PerProcessHandler):
    """Saves a data-iterator state (JSON) captured when ``save`` was called, one file per process."""

    suffix = "json"

    def encode(self, value) -> bytes:
        return json.dumps(value).encode()

    def decode(self, data: bytes):
        return json.loads(data)


class HostArraysHandler(_PerProcessHandler):
    """Saves a process's host-side arrays (``{name: numpy array}``, e.g. its share of AMT's attention maps)
    as one ``.npz`` per process."""

    suffix = "npz"

    def encode(self, value) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, **value)
        return buffer.getvalue()

    def decode(self, data: bytes):
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            return {name: arrays[name] for name in arrays.files}


def _register_args(handler: type, name: str) -> tuple[type, type]:
    """``(<name>Save(value), <name>Restore())``: the orbax arguments that select ``handler`` for an item."""
    save = dataclasses.make_dataclass(f"{name}Save", [("value", Any)], bases=(ocp.args.CheckpointArgs,))
    restore = dataclasses.make_dataclass(f"{name}Restore", [], bases=(ocp.args.CheckpointArgs,))
    register = ocp.args.register_with_handler
    return register(handler, for_save=True)(save), register(handler, for_restore=True)(restore)


IteratorStateSave, IteratorStateRestore = _register_args(IteratorStateHandler, "IteratorState")
HostArraysSave, HostArraysRestore = _register_args(HostArraysHandler, "HostArrays")


# --- failed asynchronous saves -------------------------------------------------------------------


class _BackgroundSaveErrors(logging.Filter):
    """Orbax keeps the error of a failed background save until the next save waits for it (and with several
    processes that wait ends only at a barrier timeout), but its background save threads log the error at
    once. This filter on the ``absl`` logger takes those errors for ``Checkpointer.check_save`` and drops
    the records: their tracebacks (one per orbax thread) come back once, chained to the
    ``CheckpointSaveError``. Other orbax errors (such as a failed removal of an old step) pass through."""

    # The orbax 0.12 modules whose background threads log a failed save: its futures, the asynchronous
    # checkpointer's commit thread, the step-metadata writer.
    SAVE_MODULES = ("futures/future.py", "checkpointers/async_checkpointer.py", "metadata/checkpoint.py")

    def __init__(self):
        super().__init__()
        self.errors: list[BaseException] = []

    def filter(self, record: logging.LogRecord) -> bool:
        path = record.pathname.replace(os.sep, "/")
        from_a_save = "/orbax/checkpoint/" in path and path.endswith(self.SAVE_MODULES)
        background = threading.current_thread() is not threading.main_thread()
        if from_a_save and background and record.levelno >= logging.ERROR and record.exc_info:
            self.errors.append(record.exc_info[1])
            return False
        return True


_BACKGROUND_ERRORS = _BackgroundSaveErrors()


def _quiet_closed_event_loops(unraisable, previous=None) -> None:
    """``sys.unraisablehook`` that drops "Event loop is closed": after a failed write orbax closes its event
    loop while TensorStore still completes the other writes, and each completion reports the closed loop
    (hundreds of tracebacks for one full disk)."""
    if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
        return
    (previous or sys.__unraisablehook__)(unraisable)


@contextlib.contextmanager
def _without_read_only_warning():
    """Drops orbax's "Given directory is read only" warning: a reader opening a run read-only is no news."""

    def keep(record: logging.LogRecord) -> bool:
        return "is read only" not in record.getMessage()

    absl_logger = logging.getLogger("absl")
    absl_logger.addFilter(keep)
    try:
        yield
    finally:
        absl_logger.removeFilter(keep)


def _install_quiet_hooks() -> None:
    absl_logger = logging.getLogger("absl")
    if _BACKGROUND_ERRORS not in absl_logger.filters:
        absl_logger.addFilter(_BACKGROUND_ERRORS)
    if getattr(sys.unraisablehook, "func", None) is not _quiet_closed_event_loops:
        sys.unraisablehook = functools.partial(_quiet_closed_event_loops, previous=sys.unraisablehook)


_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


def _os_errno(error: BaseException) -> int | None:
    """The OS error number behind ``error``: an ``OSError`` in its chain, or TensorStore's ``os_error_code``."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno:
            return error.errno
        if match := _OS_ERROR_CODE.search(str(error)):
            return int(match.group(1))
        error = error.__cause__ or error.__context__
    return None


def _first_line(error: BaseException) -> str:
    """``Type: first line of the message``, without TensorStore's long JSON spec."""
    lines = str(error).strip().splitlines()
    detail = re.sub(r"\s*\[tensorstore_spec=.*", "", lines[0]) if lines else ""
    return f"{type(error).__name__}: {detail[:500]}"


def _size(num_bytes: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB"):
        if num_bytes < 1000 or unit == "GB":
            return f"{num_bytes:.0f} {unit}" if unit == "bytes" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000
    raise AssertionError


@dataclasses.dataclass
class _Save:
    """The save in flight: its step, what it needs and had, and where the background errors it may raise start."""

    step: int
    needed_bytes: int
    free_bytes: int | None
    first_error: int


# --- the checkpointer ----------------------------------------------------------------------------


class Checkpointer:
    """Train state + iterator checkpoints in ``directory``; resume is ``restore_latest``.

    ``read_only`` readers (``restore_on_local_device``) never save, move or clean up anything, so they can
    read a run while it trains.
    """

    def __init__(self, directory: str | os.PathLike, keep: int = 3, asynchronous: bool = True, read_only: bool = False):
        self.directory = epath.Path(directory).absolute()
        self.read_only = read_only
        self._asynchronous = asynchronous
        self._save: _Save | None = None
        self._failed: CheckpointSaveError | None = None
        _install_quiet_hooks()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else keep,
            save_interval_steps=0 if read_only else 1,  # what orbax sets (with a warning) for readers
            enable_async_checkpointing=True,  # the checksum callback needs orbax's asynchronous checkpointer
            create=not read_only,
            read_only=read_only,
            cleanup_tmp_directories=not read_only,  # a killed save's partial step holds disk space
            async_options=ocp.AsyncOptions(post_finalization_callback=self._write_checksums),
        )
        with _without_read_only_warning():
            self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "host"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    # --- saving ---

    def save(self, step: int, state, data_state: dict, force: bool = False, host_arrays: dict | None = None) -> bool:
        """Starts saving ``state`` and the already captured ``data_state`` (and this process's
        ``host_arrays``, ``{name: numpy array}``, when given); returns whether it saved.

        Raises ``CheckpointSaveError`` if the previous save failed (and, when not asynchronous, this one).
        """
        self._wait()  # orbax waits for the previous save anyway; after this the callback's step is this one
        needed = sum(leaf.nbytes for leaf in jax.tree.leaves(state) if hasattr(leaf, "nbytes"))
        try:
            free = shutil.disk_usage(self.directory).free
        except OSError:  # not a local file system
            free = None
        self._save = _Save(step, needed, free, len(_BACKGROUND_ERRORS.errors))
        items = dict(state=ocp.args.StandardSave(state), data=IteratorStateSave(data_state))
        if host_arrays is not None:
            items["host"] = HostArraysSave(host_arrays)
        args = ocp.args.Composite(**items)
        try:
            saved = self.manager.save(step, args=args, force=force)
        except Exception as error:
            self._raise_save_error(error)
        if not self._asynchronous:
            self._wait()
        return saved

    def _write_checksums(self) -> None:
        """Orbax's post-finalization callback (process 0, background thread, before the rename)."""
        final = self.directory / str(self._save.step)
        temporary = final.parent / (final.name + ".orbax-checkpoint-tmp")
        integrity.write_checksums(temporary if temporary.exists() else final, self._save.step, jax.process_count())

    def check_save(self) -> None:
        """Raises ``CheckpointSaveError`` if the save in flight has failed; otherwise returns at once
        (a list length and a lock: cheap enough to call after every train step)."""
        if self._save is None:
            return
        errors = _BACKGROUND_ERRORS.errors
        if len(errors) > self._save.first_error:
            self._raise_save_error(errors[self._save.first_error])
        if not self.manager.is_saving_in_progress():
            self._wait()

    def _wait(self) -> None:
        if self._failed is not None:
            raise self._failed
        try:
            self.manager.wait_until_finished()
        except Exception as error:
            self._raise_save_error(error)
        self._save = None

    def _raise_save_error(self, error: BaseException):
        save = self._save
        if save is None:  # the manager failed outside a save of ours
            raise error
        step_dir = self.directory / str(save.step)
        code = _os_errno(error)
        cause = f"{os.strerror(code)} ({errno_lib.errorcode.get(code, code)})" if code else type(error).__name__
        message = f"saving step {save.step} to {step_dir} failed: {cause}."
        fix = "fix that"
        if code in (errno_lib.ENOSPC, errno_lib.EDQUOT):
            fix = "free space"
            message += f" The checkpoint needs about {_size(save.needed_bytes)}"
            if save.free_bytes is not None:
                message += f"; {_size(save.free_bytes)} was free on that file system when the save began"
            message += "."
        self.manager.reload()  # the failed step is no checkpoint
        latest = self.manager.latest_step()
        message += (
            f" Step {latest} is the newest complete checkpoint: {fix}, then rerun the same command to resume from it."
            if latest is not None
            else " There is no complete checkpoint yet."
        )
        message += f"\n  underlying error: {_first_line(error)}"
        self._failed = CheckpointSaveError(message, save.step, str(step_dir), code)
        raise self._failed from error

    def wait(self):
        """Blocks until the save in flight is written; raises ``CheckpointSaveError`` if it failed."""
        self._wait()

    def close(self):
        """Waits for the save in flight (raising ``CheckpointSaveError`` if it failed) and closes the manager.
        After a failure already raised it returns at once: with several processes, orbax's own wait would
        last until its barrier times out."""
        if self._failed is not None:
            return
        self._wait()
        self.manager.close()

    # --- restoring ---

    def restore_latest(self, abstract_state, step: int | None = None, *, iterator: bool = True, host: bool = False):
        """``(step, state, data_state)`` of the newest good checkpoint (or of ``step``), or ``None`` without one;
        with ``host``, ``(step, state, data_state, host_arrays)`` (this process's arrays of ``save``).

        ``abstract_state`` is a tree of ``jax.ShapeDtypeStruct`` with shardings: the state is restored
        directly onto the mesh, each process reading its shards. ``iterator=False`` skips the data
        iterator (``data_state`` is then ``None``), so a run saved by any number of processes can be read.
        Damaged steps are handled as the module docstring says; a damaged ``step`` asked for by number
        raises ``CheckpointDamagedError``. Every process must call it.
        """
        steps = _from_process_0(self.all_steps())
        if step is not None and step not in steps:
            raise FileNotFoundError(f"{self.directory} has no step {step}; its steps are {steps}.")
        candidates = [step] if step is not None else sorted(steps, reverse=True)
        damaged = []  # (step, what is wrong)
        for candidate in candidates:
            step_dir = self.directory / str(candidate)
            manifest, problems = _from_process_0(
                integrity.verify_checksums(step_dir) if jax.process_index() == 0 else None
            )
            if problems:
                damaged.append((candidate, integrity.summary(problems)))
                continue
            if manifest is None:
                logger.info(
                    "%s has no %s (saved without checksums): restoring it unverified", step_dir, integrity.CHECKSUMS
                )
            written_by = (manifest or {}).get("process_count")
            if iterator and written_by is not None and written_by != jax.process_count():
                raise _process_count_mismatch(step_dir, written_by)
            restored, problem = self._restore_step(candidate, abstract_state, iterator, host)
            if problem is None:
                if damaged:
                    self._report_damaged(damaged, candidate)
                found = candidate, restored["state"], restored.get("data")
                return (*found, restored["host"]) if host else found
            if problem.written_by is not None:
                raise _process_count_mismatch(step_dir, problem.written_by)
            if manifest is None:  # unverified: orbax's error is the only sign of damage
                damaged.append((candidate, problem.message))
                continue
            raise CheckpointMismatchError(
                f"{step_dir} is intact (its checksums verify) but cannot be restored into this run: "
                f"{problem.message}\nDid the model, method, optimizer or mesh change since it was saved? "
                "Use the run's own config, or a new --workdir."
            )
        if damaged:
            listing = "\n".join(f"  {self.directory / str(s)}: {what}" for s, what in damaged)
            raise CheckpointDamagedError(
                f"no checkpoint in {self.directory} can be restored; nothing was moved or deleted:\n{listing}\n"
                "Restore the files from a copy, or move the checkpoints directory aside to start again from step 0."
            )
        return None

    def _restore_step(
        self, step: int, abstract_state, iterator: bool, host: bool = False
    ) -> tuple[dict | None, _RestoreProblem | None]:
        """``(restored items, None)``, or ``(None, problem)`` when any process failed (all processes agree)."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if iterator:
            items["data"] = IteratorStateRestore()
        if host:
            items["host"] = HostArraysRestore()
        restored, problem = None, None
        try:
            restored = dict(self.manager.restore(step, args=ocp.args.Composite(**items)))
            problem = next((v for v in restored.values() if isinstance(v, _RestoreProblem)), None)
        except Exception as error:  # a process that fails inside orbax fails alike on the others
            problem = _RestoreProblem(f"orbax cannot restore it ({_first_line(error)})")
        failed = _from_first_failing(problem)
        return (restored, None) if failed is None else (None, failed)

    def _report_damaged(self, damaged: list[tuple[int, str]], restored_step: int) -> None:
        """Warns about each damaged step skipped for ``restored_step``; a writer moves them aside first."""
        for step, what in damaged:
            step_dir = self.directory / str(step)
            if self.read_only:
                logger.warning("%s is damaged (%s); read step %d instead", step_dir, what, restored_step)
                continue
            if jax.process_index() == 0:
                target = integrity.set_aside(step_dir)
                logger.warning(
                    "%s is damaged (%s); moved it aside to %s (not deleted) and resumed from step %d",
                    step_dir,
                    what,
                    target.name,
                    restored_step,
                )
        if not self.read_only:
            if jax.process_count() > 1:
                multihost_utils.sync_global_devices("prmim_jax: damaged checkpoints moved aside")
            self.manager.reload()


def _process_count_mismatch(step_dir: epath.Path, written_by: int) -> CheckpointMismatchError:
    return CheckpointMismatchError(
        f"{step_dir} was written by {written_by} processes, but {jax.process_count()} are resuming it: each "
        f"process's data-iterator position belongs to its own share of the data. Resume with {written_by} "
        "processes (tools that only read the state, like runs.load, read it with any number)."
    )


def _from_process_0(value):
    """``value`` as process 0 has it, on every process (JSON-able values; a no-op with one process)."""
    if jax.process_count() == 1:
        return value
    return json.loads(_broadcast_text(json.dumps(value) if jax.process_index() == 0 else "", source=0))


def _from_first_failing(problem: _RestoreProblem | None) -> _RestoreProblem | None:
    """The problem of the lowest-numbered process that has one, on every process; ``None`` if none has."""
    if jax.process_count() == 1:
        return problem
    failing = multihost_utils.process_allgather(np.int32(problem is not None))
    if not failing.any():
        return None
    source = int(np.argmax(failing))
    text = json.dumps(dataclasses.asdict(problem)) if problem is not None else ""
    return _RestoreProblem(**json.loads(_broadcast_text(text, source)))


def _broadcast_text(text: str, source: int) -> str:
    is_source = jax.process_index() == source
    data = np.frombuffer(text.encode(), np.uint8) if is_source else np.zeros(0, np.uint8)
    length = int(multihost_utils.broadcast_one_to_all(np.int32(data.size), is_source=is_source))
    padded = np.zeros(length, np.uint8)
    if is_source:
        padded[:] = data
    return bytes(np.asarray(multihost_utils.broadcast_one_to_all(padded, is_source=is_source))).decode()


def read_run_config(workdir: str | os.PathLike, kind: str):
    """The ``ConfigDict`` a run saved as ``WORKDIR/config.json``; ``kind`` names the run in the error."""
    path = epath.Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: is {workdir} a prmim_jax {kind} workdir?")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def restore_on_local_device(workdir: str | os.PathLike, init_state, step: int | None = None):
    """``(step, state)`` of the run's newest good checkpoint (or of ``step``), whole on this process's first
    local device. ``init_state()`` builds a fresh (boxed) state of the run's shapes; only its shapes are used.

    Reads only the state, so a run saved by any number of processes reads in any other; it verifies the
    checksums, skips damaged steps with a warning and moves nothing (the run may still be training).
    """
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), nn.unbox(jax.eval_shape(init_state))
    )
    checkpointer = Checkpointer(epath.Path(workdir) / "checkpoints", read_only=True)
    try:
        restored = checkpointer.restore_latest(abstract, step, iterator=False)
    finally:
        checkpointer.close()
    if restored is None:
        raise FileNotFoundError(f"{workdir}/checkpoints holds no checkpoint.")
    return restored[0], restored[1]
