"""Resuming a `Trainer` from a `checkpoint-N/` directory: the train state, `TrainerState`, the
loader position, the plateau controller and (if asked) the callbacks' state.

Bound onto `jtrain.Trainer` as `_resume`, `_restore_from` and `_load_callback_state`, so the Trainer
module keeps to HF's surface while this one owns what a checkpoint gives back.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from jtrain.callbacks import ExportableState, TrainerState
from jtrain.checkpoint import checkpoints_to_try, read_json, restore_state
from jtrain.data.loader import LoaderPosition
from jtrain.errors import CheckpointError

logger = logging.getLogger("jtrain.trainer")  # the messages users know from the Trainer's logger


def resume(self: Any, checkpoint: str | bool) -> LoaderPosition:
    """Restore state, TrainerState, loader position and callback state; time it.

    With True (the latest checkpoint) a checkpoint that fails to restore is reported and
    the previous complete one is used (`checkpoints_to_try`). `_resume_seconds` and
    `_resumed_from` go into the train metrics (`resume_seconds`).
    """
    candidates = checkpoints_to_try(checkpoint, self.args.output_dir)
    start = time.perf_counter()
    for i, path in enumerate(candidates):
        try:
            position = restore_from(self, path)
            break
        except CheckpointError as err:
            if i + 1 == len(candidates):
                raise
            logger.warning("checkpoint %s cannot be restored, resuming from %s instead: %s",
                           path, candidates[i + 1], err)
    self._resume_seconds, self._resumed_from = time.perf_counter() - start, path
    logger.info("resumed from %s (step %d, epoch %d, batch %d) in %.2fs", path, self.state.global_step,
                position.epoch, position.batch_index, self._resume_seconds)
    return position

def restore_from(self: Any, path: str) -> LoaderPosition:
    """Everything a checkpoint holds; assigns nothing until every part was read."""
    train_state = restore_state(path, self.train_state)
    try:
        state = TrainerState.load_from_json(os.path.join(path, "trainer_state.json"))
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointError(f"cannot read {path}/trainer_state.json: {err}") from err
    loader_state = read_json(os.path.join(path, "loader_state.json"))
    self.train_state, self.state = train_state, state
    if self.lr_controller is not None and "lr_controller" in loader_state:
        self.lr_controller.load_state_dict(loader_state["lr_controller"])
    load_callback_state(self)
    if self.args.ignore_data_skip:  # HF: the data starts over; step, state and schedule continue
        return LoaderPosition()
    return LoaderPosition(int(loader_state["epoch"]), int(loader_state["batch_index"]))

def load_callback_state(self: Any) -> None:
    """As HF: with `restore_callback_states_from_checkpoint`, stateful callbacks (early-stopping
    patience, ...) continue where they were; without it (HF's default) they start afresh."""
    if not self.args.restore_callback_states_from_checkpoint:
        return
    saved = self.state.stateful_callbacks or {}
    for callback in self.callback_handler.callbacks:
        entry = saved.get(type(callback).__name__) if isinstance(callback, ExportableState) else None
        if isinstance(entry, dict):  # repeated classes (a list) are ambiguous; HF skips them too
            for key, value in entry.get("attributes", {}).items():
                setattr(callback, key, value)
