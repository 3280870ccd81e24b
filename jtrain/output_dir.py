"""Decide, before anything is written, what to do with `output_dir`.

As HF's example scripts do: a directory that already holds a run resumes from its last complete
checkpoint, or is refused unless `overwrite_output_dir` is set. A path that cannot be written
(a file in the way, no permission) is refused before training starts.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from jtrain.args import TrainingArguments
from jtrain.checkpoint import checkpoint_dirs, checkpoint_problem, latest_checkpoint
from jtrain.errors import CheckpointError, ConfigError


def check_writable(path: str) -> None:
    """Refuse a path that is a file or whose nearest existing ancestor cannot be written.

    Permission bits alone can mislead (root ignores them, a read-only mount or NFS squashing
    does not), so after the cheap `os.access` check a temporary file is created and removed.
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise CheckpointError(f"output_dir {path!r} exists and is not a directory")
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise CheckpointError(f"output_dir {path!r} cannot be created: {probe!r} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise CheckpointError(f"output_dir {path!r} is not writable (no write permission on {probe!r})")
    try:
        fd, name = tempfile.mkstemp(prefix=".jtrain-write-test-", dir=probe)
        os.close(fd)
        os.remove(name)
    except OSError as err:
        raise CheckpointError(f"output_dir {path!r} is not writable: {err.strerror} ({probe!r})") from err


def resume_point(args: TrainingArguments) -> str | None:
    """The checkpoint to resume from, or None for a fresh run; raises if the directory is in use.

    Returns the user's `resume_from_checkpoint` (checked to exist and be complete) or, for an
    output_dir that holds a run, a `LatestCheckpoint`: resuming from it falls back to the
    previous complete checkpoint if it turns out to be damaged.
    """
    out = args.output_dir
    check_writable(out)
    if args.resume_from_checkpoint:
        return _requested_checkpoint(args.resume_from_checkpoint, out)
    if not os.path.isdir(out) or not os.listdir(out) or not args.do_train:
        return None
    if args.overwrite_output_dir:
        return None
    last = latest_checkpoint(out)
    if last is not None:
        return last
    partial = {os.path.basename(p) for p in checkpoint_dirs(out, complete_only=False)}
    entries = [name + (" (incomplete)" if name in partial else "") for name in sorted(os.listdir(out))]
    shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
    raise ConfigError(f"output_dir {out!r} already holds files ({shown}) and no complete checkpoint to resume "
                      "from; set overwrite_output_dir=true or choose another output_dir")


def _requested_checkpoint(requested: str, output_dir: str) -> str:
    """`resume_from_checkpoint` from the config, checked before anything is written."""
    if requested.lower() == "true":
        last = latest_checkpoint(output_dir)
        if last is None:
            raise CheckpointError(f"resume_from_checkpoint=true but {output_dir!r} holds no complete checkpoint")
        return last
    if not os.path.isdir(requested):
        raise CheckpointError(f"resume_from_checkpoint {requested!r} does not exist")
    problem = checkpoint_problem(requested)
    if problem is not None:
        raise CheckpointError(f"cannot resume from {requested!r}: {problem}")
    return requested


def clear_previous_run(args: TrainingArguments) -> None:
    """With overwrite_output_dir, remove the old checkpoints so they never mix with the new run's."""
    import jax

    if args.overwrite_output_dir and not args.resume_from_checkpoint and jax.process_index() == 0:
        for path in checkpoint_dirs(args.output_dir, complete_only=False):
            shutil.rmtree(path)  # process 0 only: processes sharing a file system would race


def search_output_dir(args: TrainingArguments) -> None:
    """A search writes run-N/ per trial and best_run.json: into an empty output_dir, or (with
    overwrite_output_dir) one whose earlier trials are removed first. Never a resume."""
    import jax

    out = args.output_dir
    check_writable(out)
    if not os.path.isdir(out) or not os.listdir(out):
        return None
    if not args.overwrite_output_dir:
        raise ConfigError(f"output_dir {out!r} already holds files; a hyperparameter search writes run-N/ "
                          "directories there: choose an empty output_dir or set overwrite_output_dir: true")
    if jax.process_index() == 0:
        for name in os.listdir(out):
            if name.startswith("run-") and os.path.isdir(os.path.join(out, name)):
                shutil.rmtree(os.path.join(out, name))
    return None
