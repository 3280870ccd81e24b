"""Checkpoints in HF's layout: `output_dir/checkpoint-<global_step>/`.

Inside: `state/` (orbax: params, optimizer state, step, RNG, written asynchronously while the
loop goes on), then the JSON sidecars (`training_args.json`, `loader_state.json`,
`jtrain_meta.json`) and last `trainer_state.json`. A checkpoint counts as complete only when
`trainer_state.json` exists (it is written atomically, after everything else), so one that was
being written when the process died is never chosen for resume. A complete checkpoint that was
damaged afterwards (a truncated file) is caught by a cheap check of its small files, or else by
the restore itself; resuming from the *latest* checkpoint then warns and falls back to the
previous complete one (see `resume_candidates`). The layout is documented in docs/checkpoints.md.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import shutil
import threading
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from jtrain.errors import CheckpointError
from jtrain.jsonfile import atomic_write, read_json_object, write_json
from jtrain.state import TrainState

PREFIX = "checkpoint"
STATE_DIR = "state"
COMPLETE_MARKER = "trainer_state.json"
_STEP_RE = re.compile(rf"^{PREFIX}-(\d+)$")
# Small files whose absence or damage marks a checkpoint unusable without reading any array.
_JSON_FILES = (COMPLETE_MARKER, "loader_state.json", "jtrain_meta.json")
_ORBAX_METADATA = "_METADATA"

logger = logging.getLogger(__name__)


class LatestCheckpoint(str):
    """A checkpoint path chosen as the newest complete one of an output_dir (not named by the user).

    Resuming from it may fall back to an older checkpoint when it turns out to be damaged, which
    an explicitly named checkpoint never does.
    """


def checkpoint_dirs(output_dir: str, complete_only: bool = True) -> list[str]:
    """Checkpoint directories sorted by step (oldest first)."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _STEP_RE.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isdir(path) and (not complete_only or is_complete(path)):
            found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


def is_complete(path: str) -> bool:
    """The completion marker exists (written last, atomically) and so does `state/`."""
    return os.path.isfile(os.path.join(path, COMPLETE_MARKER)) and os.path.isdir(os.path.join(path, STATE_DIR))


def checkpoint_problem(path: str) -> str | None:
    """Why a checkpoint cannot be used, from its small files only (no array is read), or None.

    Catches an incomplete write and damaged JSON; a damaged array file is only found by the
    restore itself.
    """
    if not is_complete(path):
        return f"it is incomplete (no {COMPLETE_MARKER} or no {STATE_DIR}/): it was being written when the run stopped"
    if not os.path.isfile(os.path.join(path, STATE_DIR, _ORBAX_METADATA)):
        return f"{STATE_DIR}/{_ORBAX_METADATA} is missing"
    for name in _JSON_FILES:
        try:
            with open(os.path.join(path, name)) as fh:
                json.load(fh)
        except FileNotFoundError:
            return f"{name} is missing"
        except (OSError, ValueError) as err:
            return f"{name} is damaged ({err})"
    return None


def resume_candidates(output_dir: str) -> list[str]:
    """Complete checkpoints that pass `checkpoint_problem`, newest first; warns about the others."""
    usable = []
    for path in reversed(checkpoint_dirs(output_dir, complete_only=False)):
        problem = checkpoint_problem(path)
        if problem is None:
            usable.append(path)
        elif is_complete(path):
            logger.warning("skipping damaged checkpoint %s: %s", path, problem)
        else:
            logger.info("ignoring checkpoint %s: %s", path, problem)
    return usable


def latest_checkpoint(output_dir: str) -> LatestCheckpoint | None:
    """The newest usable checkpoint of `output_dir` (HF's `get_last_checkpoint`), or None."""
    candidates = resume_candidates(output_dir)
    return LatestCheckpoint(candidates[0]) if candidates else None


_TORCH_FILES = ("optimizer.pt", "pytorch_model.bin", "training_args.bin", "rng_state.pth")


def _torch_hint(path: str) -> str:
    """What to do with a checkpoint HF's PyTorch Trainer wrote ('' for anything else): its
    optimizer state is torch's, so only the weights carry over."""
    if not any(os.path.exists(os.path.join(path, name)) for name in _TORCH_FILES):
        return ""
    return (f"; {path!r} was written by HF's PyTorch Trainer, whose optimizer state jtrain cannot resume: load "
            "its weights with jtrain.models.from_pretrained(path) and start a new run from them")


def checkpoints_to_try(checkpoint: str | bool, output_dir: str) -> list[str]:
    """What `train(resume_from_checkpoint=...)` tries, in order.

    True (or "true") and a `LatestCheckpoint`: the newest usable checkpoint, then the older ones,
    so a damaged latest checkpoint falls back to the previous complete one. A path the user
    named is tried alone: silently training from another step than the one asked for is worse
    than an error.
    """
    if checkpoint is True or (isinstance(checkpoint, str) and checkpoint.lower() == "true"):
        candidates = resume_candidates(output_dir)
        if not candidates:
            torch_made = [p for p in sorted(glob.glob(os.path.join(output_dir, f"{PREFIX}*"))) if _torch_hint(p)]
            raise CheckpointError(f"no complete checkpoint in {output_dir!r} to resume from"
                                  + (_torch_hint(torch_made[0]) if torch_made else ""))
        return candidates
    if not isinstance(checkpoint, str) or not os.path.isdir(checkpoint):
        raise CheckpointError(f"checkpoint {checkpoint!r} to resume from does not exist")
    if isinstance(checkpoint, LatestCheckpoint):
        step = checkpoint_step(checkpoint)
        older = [p for p in resume_candidates(os.path.dirname(os.path.abspath(checkpoint)))
                 if checkpoint_step(p) < step]
        return [str(checkpoint)] + older
    return [checkpoint]


def checkpoint_step(path: str) -> int:
    """The step in a `checkpoint-<step>` directory name (-1 for any other name)."""
    match = _STEP_RE.match(os.path.basename(os.path.normpath(path)))
    return int(match.group(1)) if match else -1


def _state_tree(state: TrainState) -> dict:
    """Orbax stores plain arrays; the typed PRNG key travels as its raw key data. Frozen params
    (a LoRA base) are saved too, so a checkpoint resumes without its base model at hand."""
    tree = {
        "step": state.step, "params": state.params, "opt_state": state.opt_state,
        "rng": jax.random.key_data(state.rng), "lr_factor": state.lr_factor, "skipped": state.skipped,
    }
    if state.frozen:
        tree["frozen"] = state.frozen
    if state.loss_scale is not None:  # fp16's dynamic loss scale resumes where it was
        tree["loss_scale"] = _loss_scale_tree(state.loss_scale)
    return tree


def _loss_scale_tree(loss_scale: Any) -> dict:
    return {"scale": loss_scale.scale, "good_steps": loss_scale.good_steps, "overflows": loss_scale.overflows}


class CheckpointWriter:
    """Asynchronous writer: orbax writes the arrays, a finaliser thread then writes the sidecars.

    Only one checkpoint is in flight; `save` and `wait` first finish the previous one. All
    processes call `save` (orbax writes collectively); only process 0 writes the JSON files.
    """

    def __init__(self, output_dir: str, save_total_limit: int | None = None):
        # orbax requires absolute paths
        self.output_dir, self.save_total_limit = os.path.abspath(output_dir), save_total_limit
        self._ckptr = ocp.StandardCheckpointer()
        self._finaliser: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, state: TrainState, step: int, sidecars: dict[str, Any],
             trainer_state: Callable[[str], None], best_checkpoint: str | None = None,
             params_only: bool = False, model_files: Callable[[str], None] | None = None) -> str:
        """Start writing checkpoint-`step`; `trainer_state(path)` writes the completion marker.

        `model_files(path)`, called by every process before the state is written, puts the model
        in HF's format beside it (HF's checkpoints hold the model that `from_pretrained` loads); it
        runs before the marker can exist, so a checkpoint that has the marker has the model too.
        """
        self.wait()
        path = os.path.join(self.output_dir, f"{PREFIX}-{step}")
        if os.path.exists(path) and jax.process_index() == 0:
            # A stale directory from a run that died (or one resumed from an earlier step): removed
            # whole, marker included, before anything new is written. Only process 0 removes it:
            # on a shared file system another process could delete process 0's orbax tmp dir.
            shutil.rmtree(path)
        if model_files is not None:
            model_files(path)
        tree = {"params": state.params} if params_only else _state_tree(state)
        # force=True: the other processes skip orbax's "already exists" check (they could see the
        # directory before process 0 removed it) and wait for process 0 in orbax's barrier.
        self._ckptr.save(os.path.join(path, STATE_DIR), tree, force=True)

        def finalise() -> None:
            try:
                self._ckptr.wait_until_finished()
                if jax.process_index() == 0:
                    for name, value in sidecars.items():
                        write_json(os.path.join(path, name), value, default=str)
                    atomic_write(os.path.join(path, COMPLETE_MARKER), trainer_state)  # the marker: last
                    _fsync_dir(path)
                    self.rotate(best_checkpoint)
            except BaseException as err:  # surfaced by the next wait()
                self._error = err

        self._finaliser = threading.Thread(target=finalise, name="jtrain-ckpt-finalise", daemon=True)
        self._finaliser.start()
        return path

    def wait(self, raise_errors: bool = True) -> None:
        """Block until the checkpoint in flight is complete; re-raise its error if it failed.

        `raise_errors=False` (used while another error propagates) logs the failure instead, so
        that it does not hide the error that stopped training.
        """
        if self._finaliser is not None:
            self._finaliser.join()
            self._finaliser = None
        if self._error is not None:
            err, self._error = self._error, None
            if not raise_errors:
                logger.error("writing a checkpoint in %s failed: %s", self.output_dir, err)
                return
            raise CheckpointError(f"writing a checkpoint in {self.output_dir!r} failed: {err}") from err

    def rotate(self, best_checkpoint: str | None) -> None:
        """HF's `save_total_limit`: keep the newest checkpoints, and never delete the best one."""
        limit = self.save_total_limit
        if not limit or limit <= 0:
            return
        dirs = checkpoint_dirs(self.output_dir)
        best = [d for d in dirs if best_checkpoint and os.path.abspath(d) == os.path.abspath(best_checkpoint)]
        if best:
            newest = dirs[-1]
            dirs = [d for d in dirs if d not in best] + best  # the best is treated as newest
            if limit == 1 and best[0] != newest:
                limit = 2  # as HF: keep the best and the newest, so training can resume
        for stale in dirs[: max(0, len(dirs) - limit)]:
            shutil.rmtree(stale, ignore_errors=True)


def _fsync_dir(path: str) -> None:
    """Make the renames inside `path` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def restore_state(path: str, target: TrainState, params_only: bool = False) -> TrainState:
    """Restore checkpoint `path` into `target`'s shapes and shardings (the mesh may differ).

    `target` is abstract (jax.ShapeDtypeStruct leaves with shardings) or concrete. With
    `params_only`, only the parameters are replaced (loading the best model at the end).
    """
    state_dir = os.path.abspath(os.path.join(path, STATE_DIR))
    if not os.path.isdir(state_dir):
        raise CheckpointError(f"{path!r} is not a jtrain checkpoint: {STATE_DIR}/ is missing" + _torch_hint(path))
    meta_path = os.path.join(path, "jtrain_meta.json")
    saved_params_only = bool(read_json(meta_path).get("params_only")) if os.path.exists(meta_path) else False
    if saved_params_only and not params_only:
        raise CheckpointError(f"{path!r} holds the model only (save_only_model=True): it cannot resume training")
    tree = _state_tree_abstract(target, saved_params_only)
    try:
        with ocp.StandardCheckpointer() as checkpointer:  # closed after use: no threads left behind
            restored = checkpointer.restore(state_dir, tree)
    except Exception as err:
        hint, message = "", _one_line(err)
        if "tree structures do not match" in str(err):
            message = message.rstrip(":")  # orbax lists the differing paths on the lines after
            hint = (". Its state is laid out differently from this run's: it was written with another `optim`, "
                    "model, LoRA or freezing set-up (its training_args.json says which), or by an older jtrain. "
                    "Resume with those arguments, or start a new run from its weights "
                    "(`jtrain.models.from_pretrained` on the checkpoint, where it holds config.json)")
        raise CheckpointError(f"cannot restore checkpoint {path!r}: {type(err).__name__}: {message}{hint}") from err
    if params_only:
        return target.replace(params=restored["params"])
    loss_scale = target.loss_scale
    if "loss_scale" in restored:
        loss_scale = loss_scale.replace(**restored["loss_scale"])
    return target.replace(
        step=restored["step"], params=restored["params"], opt_state=restored["opt_state"],
        rng=jax.random.wrap_key_data(restored["rng"]), lr_factor=restored["lr_factor"],
        skipped=restored["skipped"], frozen=restored.get("frozen", target.frozen), loss_scale=loss_scale,
    )


def _one_line(err: BaseException, limit: int = 300) -> str:
    """The first line of an error, shortened: tensorstore errors carry a whole JSON spec."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return text if len(text) <= limit else text[:limit] + "..."


def _state_tree_abstract(target: TrainState, params_only: bool) -> dict:
    def abstract(x: Any) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))

    rng_data = jax.eval_shape(jax.random.key_data, target.rng)
    rng_data = jax.ShapeDtypeStruct(rng_data.shape, rng_data.dtype, sharding=getattr(target.rng, "sharding", None))
    if params_only:
        return {"params": jax.tree.map(abstract, target.params)}
    tree = {
        "step": abstract(target.step), "params": jax.tree.map(abstract, target.params),
        "opt_state": jax.tree.map(abstract, target.opt_state), "rng": rng_data,
        "lr_factor": abstract(target.lr_factor), "skipped": abstract(target.skipped),
    }
    if target.frozen:
        tree["frozen"] = jax.tree.map(abstract, target.frozen)
    if target.loss_scale is not None:
        tree["loss_scale"] = jax.tree.map(abstract, _loss_scale_tree(target.loss_scale))
    return tree


def read_json(path: str) -> dict[str, Any]:
    """A checkpoint's JSON metadata file; CheckpointError naming it when unreadable."""
    return read_json_object(path, what="checkpoint metadata", error=CheckpointError)
