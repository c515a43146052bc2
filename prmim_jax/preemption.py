"""What a training process does when it is told to stop (SIGTERM) and when it fails.

Stopping: ``PreemptionWatch`` guards the whole run, from set-up to the final
evaluation. Where stopping at once loses nothing (set-up, the final evaluation:
``interruptible``) a SIGTERM raises ``Preempted``; everywhere else (training,
the final save) it only sets a flag, and the train loop saves a checkpoint and
stops at the next step, or the trainer lets the final save finish. A run told
to stop exits 0 and its rerun resumes.

Failing: ``exit_on_failure`` turns an exception into one line, ``process I of N
failed: Type: message``, then the traceback, and ends the process with status 1.
With several processes it ends it at once (``os._exit``): JAX's exit hook would
wait at the distributed shutdown barrier for peers that are themselves blocked in
a collective, waiting for this process, until the shutdown timeout (minutes).
Its peers then see a collective error (or, blocked elsewhere, the coordination
service reports the missing heartbeats) and fail the same way, within seconds.
Launchers look for the ``failed:`` line (``FAILURE_LINE``) to show a run's own error.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import traceback
from collections.abc import Iterator

from jax._src import distributed as _distributed  # this process's index and count, without starting a backend
from jax.experimental import multihost_utils

# The first line a failing process prints; launchers match it (launch/local.sh's FAILURE_PATTERN).
FAILURE_LINE = "process {index} of {count} failed: {kind}: {message}"
_MESSAGE_LIMIT = 2000  # characters of the exception's message on the failure line; the traceback has it all


class Preempted(BaseException):
    """SIGTERM during a phase that stops at once (``PreemptionWatch.interruptible``); ``phase`` names it.

    A ``BaseException``, as ``KeyboardInterrupt``: library code that catches ``Exception`` lets it through.
    """

    def __init__(self, phase: str):
        super().__init__(phase)
        self.phase = phase


def process_index_and_count() -> tuple[int, int]:
    """``(index, count)`` of this process among the run's, as ``jax.distributed.initialize`` set them.

    Unlike ``jax.process_index()`` this never starts a backend, which with several processes would wait
    for all of them: a process failing before its first JAX call must not block on its peers.
    """
    state = _distributed.global_state
    if state.client is None:
        return 0, 1
    return state.process_id, state.num_processes


class PreemptionWatch:
    """The run's SIGTERM guard; enter it once around everything the run does after validating its config.

    One process: its own handler (installed on entry, the previous one restored on exit; only the main
    thread can install one, so elsewhere nothing is guarded). Several processes: JAX's preemption sync
    manager already catches SIGTERM (``jax.distributed.initialize``) and picks a step every process
    reaches (``reached_preemption_sync_point``), so that all of them save the same one; ``interruptible``
    does nothing there, and a SIGTERM during the final evaluation lets it finish (the launchers' grace
    period bounds it; the final checkpoint is complete before it starts).
    """

    def __init__(self):
        self.signalled = False  # a SIGTERM arrived (several processes: the agreed step was reached)
        self._phase: str | None = None  # set inside ``interruptible``
        self._previous = None
        self._installed = False
        self._multiprocess = process_index_and_count()[1] > 1

    def __enter__(self) -> PreemptionWatch:
        if not self._multiprocess and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False

    def _handle(self, signum, frame) -> None:
        del signum, frame
        self.signalled = True
        if self._phase is not None:
            phase, self._phase = self._phase, None  # raise once, even if a second SIGTERM follows
            raise Preempted(phase)

    @contextlib.contextmanager
    def interruptible(self, phase: str) -> Iterator[None]:
        """Inside, a SIGTERM (or one that already arrived) raises ``Preempted(phase)`` at once.

        For phases whose interruption loses nothing: ``phase`` (e.g. ``'set-up'``) goes into the
        message the run prints when it stops.
        """
        if self.signalled and self._installed:
            raise Preempted(phase)
        self._phase = phase
        try:
            yield
        finally:
            self._phase = None

    def should_stop(self, step: int) -> bool:
        """Whether to save ``step`` and stop. Call it after every step, with the same steps on every process."""
        if self._multiprocess and multihost_utils.reached_preemption_sync_point(step):
            self.signalled = True
        return self.signalled


def failure_line(error: BaseException) -> str:
    """``FAILURE_LINE`` for ``error``: this process, the exception's type and its message on one line."""
    index, count = process_index_and_count()
    message = " ".join(str(error).split()) or "(no message)"
    if len(message) > _MESSAGE_LIMIT:
        message = message[:_MESSAGE_LIMIT] + " ..."
    return FAILURE_LINE.format(index=index, count=count, kind=type(error).__name__, message=message)


@contextlib.contextmanager
def exit_on_failure() -> Iterator[None]:
    """Ends the process with status 1 on any exception (or Ctrl-C) inside, after printing ``failure_line``
    and the traceback to stderr. ``SystemExit`` passes through.

    From the first moment of failing, SIGTERM ends the process (JAX's preemption handler, which only
    takes note of it, is replaced): a launcher stopping the run is obeyed, not ignored. With several
    processes the exit skips Python's exit hooks (see the module docstring); with one, it is an ordinary
    ``SystemExit(1)``.
    """
    try:
        yield
    except (Exception, KeyboardInterrupt) as error:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        sys.stdout.flush()
        print(failure_line(error), file=sys.stderr)
        traceback.print_exception(error, file=sys.stderr)
        sys.stderr.flush()
        if process_index_and_count()[1] > 1:
            os._exit(1)
        raise SystemExit(1) from error
