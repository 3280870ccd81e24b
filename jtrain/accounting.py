"""HF's epoch and step accounting, as plain functions of the arguments and the data size."""

from __future__ import annotations

import math
from dataclasses import dataclass

from jtrain.errors import ConfigError


@dataclass(frozen=True)
class StepPlan:
    """How many updates and epochs a run has, and the batch each update sees."""

    global_batch_size: int  # rows per update: per-device batch x data-parallel devices x accumulation
    micro_batch_size: int  # rows per micro-batch across all devices
    updates_per_epoch: int
    max_steps: int
    num_train_epochs: int
    num_rows: int | None = None  # rows of the training set (None: a stream)


def plan_steps(*, per_device_batch: int, data_parallel: int, accum: int, num_rows: int | None,
               max_steps: int, num_train_epochs: float, drop_last: bool) -> StepPlan:
    """`max_steps` > 0 wins; otherwise ceil(epochs x updates per epoch), as HF's Trainer does.

    A stream (`num_rows` None) has no epochs of known size: as HF, it needs `max_steps`, and the
    run is one epoch of `max_steps` updates (the stream restarts when it ends).
    """
    micro = per_device_batch * data_parallel
    global_batch = micro * accum
    if num_rows is None:
        if max_steps <= 0:
            raise ConfigError("the training dataset has no length (a streaming IterableDataset or an iterable of "
                              "rows), so the number of updates is unknown: set `max_steps` (as HF's Trainer requires)")
        return StepPlan(global_batch, micro, max_steps, max_steps, 1)
    per_epoch = num_rows // global_batch if drop_last else math.ceil(num_rows / global_batch)
    if per_epoch == 0:
        raise ConfigError(f"the training set has {num_rows} rows, fewer than one batch of {global_batch} "
                          "(per_device_train_batch_size x devices x gradient_accumulation_steps) with "
                          "dataloader_drop_last=True")
    steps = max_steps if max_steps > 0 else math.ceil(num_train_epochs * per_epoch)
    epochs = math.ceil(steps / per_epoch)
    return StepPlan(global_batch, micro, per_epoch, steps, epochs, num_rows)
