"""A JAX profiler trace of a few training updates, for TensorBoard's profile tab, XProf or Perfetto.

Why a window and not the whole run: a trace of every update is large and slows the host loop,
and the first updates include compilation. `profile_start_step` / `profile_num_steps` (jtrain's
TrainingArguments) pick updates [start, start + n). The trace starts just before update `start`
is dispatched, each update is marked with a `StepTraceAnnotation("train", step_num=N)` (XProf's
step view reads those), and after the last one is dispatched the host waits for the device to
finish it, then stops the trace, so the window holds the updates' device work entire. The files
go where TensorBoard looks for them: `<logging_dir>/plugins/profile/<timestamp>/<host>.xplane.pb`.

Example (a run config's `training:` section, or TrainingArguments)::

    profile_start_step: 5
    profile_num_steps: 3
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import jax

from jtrain.errors import ConfigError

logger = logging.getLogger(__name__)


class StepProfiler:
    """Starts and stops one trace around updates [start, start + num_steps); inert without a start."""

    def __init__(self, log_dir: str, start_step: int | None, num_steps: int):
        self.log_dir, self.start, self.num_steps = log_dir, start_step, num_steps
        self.active = False

    @classmethod
    def from_args(cls, args: Any) -> "StepProfiler":
        """The window the TrainingArguments ask for; with several processes on one host, each traces
        into its own `process_<i>` folder (their host-named files would overwrite each other)."""
        log_dir = args.resolved_logging_dir
        if args.profile_start_step is not None and args.local_process_index > 0:
            log_dir = os.path.join(log_dir, f"process_{args.process_index}")
        return cls(log_dir, args.profile_start_step, args.profile_num_steps)

    def warn_if_outside(self, first_step: int, last_step: int) -> None:
        """Say so when this train() call never reaches the window's first update (a resumed run past
        it, or a start beyond max_steps): no trace will be written."""
        if self.start is not None and not first_step <= self.start <= last_step:
            logger.warning("profile_start_step=%d is outside this run's updates %d-%d: no profiler trace is "
                           "written", self.start, first_step, last_step)

    def before_update(self, step: int) -> None:
        """Start the trace just before update `step` (1-based) is dispatched, if it opens the window."""
        if self.start is None or self.active or step != self.start:
            return
        try:
            jax.profiler.start_trace(self.log_dir)
        except RuntimeError as err:  # another trace is running (jax.profiler.trace around train())
            raise ConfigError(f"profile_start_step={self.start}: could not start a JAX profiler trace ({err}); "
                              "stop the other trace, or unset profile_start_step") from err
        self.active = True

    def annotate(self, step: int) -> contextlib.AbstractContextManager:
        """Mark update `step` in the trace (a no-op outside the window)."""
        return jax.profiler.StepTraceAnnotation("train", step_num=step) if self.active else contextlib.nullcontext()

    def after_update(self, step: int, state: Any) -> None:
        """After the window's last update is dispatched: wait for the device to finish it, stop."""
        if self.active and step >= self.start + self.num_steps - 1:
            jax.block_until_ready(state)
            self.close()

    def close(self) -> None:
        """Stop the trace if it is running (training ended or failed inside the window)."""
        if self.active:
            self.active = False
            jax.profiler.stop_trace()
            logger.info("profiler trace of updates %d-%d written under %s/plugins/profile", self.start,
                        self.start + self.num_steps - 1, self.log_dir)
