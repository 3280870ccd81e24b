"""Checkpoints in HF's layout: `output_dir/checkpoint-<global_step>/`.

Inside: `state/` (orbax: params, optimizer state, step, RNG, written asynchronously while the
loop goes on), then the JSON sidecars (`training_args.json`, `loader_state.json`,
`jtrain_meta.json`) and last `trainer_state.json`. A checkpoint counts as complete only when
`trainer_state.json` exists, so one that was being written when the process died is never
chosen for resume.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from jtrain.errors import CheckpointError
from jtrain.state import TrainState

PREFIX = "checkpoint"
STATE_DIR = "state"
COMPLETE_MARKER = "trainer_state.json"
_STEP_RE = re.compile(rf"^{PREFIX}-(\d+)$")


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
    return os.path.isfile(os.path.join(path, COMPLETE_MARKER)) and os.path.isdir(os.path.join(path, STATE_DIR))


def latest_checkpoint(output_dir: str) -> str | None:
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1] if dirs else None


def _state_tree(state: TrainState) -> dict:
    """Orbax stores plain arrays; the typed PRNG key travels as its raw key data."""
    return {
        "step": state.step, "params": state.params, "opt_state": state.opt_state,
        "rng": jax.random.key_data(state.rng), "lr_factor": state.lr_factor, "skipped": state.skipped,
    }


def _write_json(path: str, value: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(value, fh, indent=2, sort_keys=True, default=str)
        fh.write("\n")
    os.replace(tmp, path)


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
             params_only: bool = False) -> str:
        """Start writing checkpoint-`step`; `trainer_state(path)` writes the completion marker."""
        self.wait()
        path = os.path.join(self.output_dir, f"{PREFIX}-{step}")
        if os.path.exists(path):
            shutil.rmtree(path)  # a stale, incomplete directory from a run that died
        tree = {"params": state.params} if params_only else _state_tree(state)
        self._ckptr.save(os.path.join(path, STATE_DIR), tree)

        def finalise() -> None:
            try:
                self._ckptr.wait_until_finished()
                if jax.process_index() == 0:
                    for name, value in sidecars.items():
                        _write_json(os.path.join(path, name), value)
                    trainer_state(os.path.join(path, COMPLETE_MARKER))
                    self.rotate(best_checkpoint)
            except BaseException as err:  # surfaced by the next wait()
                self._error = err

        self._finaliser = threading.Thread(target=finalise, name="jtrain-ckpt-finalise", daemon=True)
        self._finaliser.start()
        return path

    def wait(self) -> None:
        """Block until the checkpoint in flight is complete; re-raise its error if it failed."""
        if self._finaliser is not None:
            self._finaliser.join()
            self._finaliser = None
        if self._error is not None:
            err, self._error = self._error, None
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


def restore_state(path: str, target: TrainState, params_only: bool = False) -> TrainState:
    """Restore checkpoint `path` into `target`'s shapes and shardings (the mesh may differ).

    `target` is abstract (jax.ShapeDtypeStruct leaves with shardings) or concrete. With
    `params_only`, only the parameters are replaced (loading the best model at the end).
    """
    state_dir = os.path.abspath(os.path.join(path, STATE_DIR))
    if not os.path.isdir(state_dir):
        raise CheckpointError(f"{path!r} is not a jtrain checkpoint: {STATE_DIR}/ is missing")
    meta_path = os.path.join(path, "jtrain_meta.json")
    saved_params_only = bool(read_json(meta_path).get("params_only")) if os.path.exists(meta_path) else False
    if saved_params_only and not params_only:
        raise CheckpointError(f"{path!r} holds the model only (save_only_model=True): it cannot resume training")
    tree = _state_tree_abstract(target, saved_params_only)
    try:
        restored = ocp.StandardCheckpointer().restore(state_dir, tree)
    except Exception as err:
        raise CheckpointError(f"cannot restore checkpoint {path!r}: {type(err).__name__}: {err}") from err
    if params_only:
        return target.replace(params=restored["params"])
    return target.replace(
        step=restored["step"], params=restored["params"], opt_state=restored["opt_state"],
        rng=jax.random.wrap_key_data(restored["rng"]), lr_factor=restored["lr_factor"],
        skipped=restored["skipped"],
    )


def _state_tree_abstract(target: TrainState, params_only: bool) -> dict:
    def abstract(x: Any) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))

    rng_data = jax.eval_shape(jax.random.key_data, target.rng)
    rng_data = jax.ShapeDtypeStruct(rng_data.shape, rng_data.dtype, sharding=getattr(target.rng, "sharding", None))
    if params_only:
        return {"params": jax.tree.map(abstract, target.params)}
    return {
        "step": abstract(target.step), "params": jax.tree.map(abstract, target.params),
        "opt_state": jax.tree.map(abstract, target.opt_state), "rng": rng_data,
        "lr_factor": abstract(target.lr_factor), "skipped": abstract(target.skipped),
    }


def read_json(path: str) -> Any:
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path!r}: {err}") from err
