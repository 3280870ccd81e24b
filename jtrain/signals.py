"""Graceful stop on SIGTERM: finish the current update, write a checkpoint, exit with code 143.

Why: schedulers (Kubernetes, SLURM, spot/preemptible VMs) send SIGTERM and kill the process a
grace period later. The default action would lose everything since the last checkpoint; here
the host loop finishes the update in flight, saves `checkpoint-<step>/` and waits until it is
complete, fires `on_train_end`, then raises `TrainingPreempted`, a `SystemExit` with code
`EXIT_PREEMPTED` (128 + SIGTERM = 143, the code a shell reports for a process SIGTERM ended), so
a scheduler sees the usual "terminated" status and a wrapper can tell preemption from a crash.
A second SIGTERM while that checkpoint is written restores the previous handler and re-sends the
signal: the process dies at once (the previous complete checkpoint stays valid).

Handlers can only be installed from the main thread; elsewhere (a Trainer run in a worker
thread) `StopOnSignal` installs nothing and training ignores signals as before.

Example::

    with StopOnSignal() as stop:
        for batch in batches:
            step(batch)
            if stop.requested:
                save(); break
    stop.raise_if_requested(step_count)
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType
from typing import Any

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM,)
EXIT_PREEMPTED = 128 + signal.SIGTERM  # 143


class TrainingPreempted(SystemExit):
    """Training stopped on a signal after writing a checkpoint; `code` is 128 + the signal number.

    A `SystemExit`, so an uncaught one ends the process with that code (and `except Exception`
    in user code does not swallow it); catch `TrainingPreempted` to handle it in a library.
    """

    def __init__(self, signum: int, step: int, checkpoint: str | None):
        super().__init__(128 + signum)
        self.signum, self.step, self.checkpoint = signum, step, checkpoint

    def __str__(self) -> str:
        name = signal.Signals(self.signum).name
        where = f"checkpoint {self.checkpoint!r} is complete" if self.checkpoint else "no checkpoint was written"
        return f"stopped by {name} after step {self.step}; {where}; exit code {self.code}"


class StopOnSignal:
    """Context manager that turns STOP_SIGNALS into a flag the host loop polls between updates."""

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS):
        self.signals = signals
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:  # second signal: stop waiting, die as the default would
            self._restore()
            os.kill(os.getpid(), signum)
            return
        self.received = signum
        logger.warning("received %s: finishing the current step, then saving a checkpoint and exiting",
                       signal.Signals(signum).name)

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def __exit__(self, *exc: Any) -> None:
        self._restore()

    def raise_if_requested(self, step: int, checkpoint: str | None) -> None:
        """Raise TrainingPreempted if a stop signal arrived (call once the checkpoint is complete)."""
        if self.received is not None:
            err = TrainingPreempted(self.received, step, checkpoint)
            logger.warning("%s", err)
            raise err
