"""Decide, before anything is written, what to do with `output_dir`.

As HF's example scripts do: a directory that already holds a run resumes from its last complete
checkpoint, or is refused unless `overwrite_output_dir` is set. A path that cannot be written
(a file in the way, no permission) is refused before training starts.
"""

from __future__ import annotations

import os
import shutil

from jtrain.args import TrainingArguments
from jtrain.checkpoint import checkpoint_dirs, latest_checkpoint
from jtrain.errors import CheckpointError, ConfigError


def check_writable(path: str) -> None:
    """Refuse a path that is a file or whose nearest existing ancestor is not writable."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise CheckpointError(f"output_dir {path!r} exists and is not a directory")
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise CheckpointError(f"output_dir {path!r} cannot be created: {probe!r} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise CheckpointError(f"output_dir {path!r} is not writable (no write permission on {probe!r})")


def resume_point(args: TrainingArguments) -> str | None:
    """The checkpoint to resume from, or None for a fresh run; raises if the directory is in use."""
    out = args.output_dir
    check_writable(out)
    if args.resume_from_checkpoint:
        return args.resume_from_checkpoint
    if not os.path.isdir(out) or not os.listdir(out) or not args.do_train:
        return None
    if args.overwrite_output_dir:
        return None
    last = latest_checkpoint(out)
    if last is not None:
        return last
    entries = sorted(os.listdir(out))
    shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
    raise ConfigError(f"output_dir {out!r} already holds files ({shown}) and no complete checkpoint to resume "
                      "from; set overwrite_output_dir=true or choose another output_dir")


def clear_previous_run(args: TrainingArguments) -> None:
    """With overwrite_output_dir, remove the old checkpoints so they never mix with the new run's."""
    if args.overwrite_output_dir and not args.resume_from_checkpoint:
        for path in checkpoint_dirs(args.output_dir, complete_only=False):
            shutil.rmtree(path)
