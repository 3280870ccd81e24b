"""Checkpoints in HF's layout: save strategies, rotation that keeps the best, load_best_model_at_end,
save_only_model, and the choice of the checkpoint to resume from (incomplete and damaged ones skipped).
save_strategy=epoch is checked with SIGTERM in test_faults.py (one training run for both).

Comparisons of params and metrics are bitwise (no tolerance) wherever both sides are the same
program on the same device with the same inputs: a checkpoint is a copy, not a computation.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import jax
import numpy as np
import pytest

from jtrain import CheckpointError, Trainer, TrainerCallback, TrainingArguments
from jtrain.checkpoint import (LatestCheckpoint, checkpoint_dirs, checkpoint_problem, checkpoints_to_try,
                               latest_checkpoint)
from jtrain.data.loader import ArrayDataset, HostLoader
from tiny import lm_rows, tiny_llama

LAYOUT = ["config.json", "jtrain_meta.json", "loader_state.json", "model.safetensors", "state", "trainer_state.json",
          "training_args.json"]  # HF's model files beside jtrain's state, as HF's checkpoints hold them


def _args(out, **kw) -> TrainingArguments:
    base = dict(output_dir=str(out), max_steps=8, per_device_train_batch_size=4, per_device_eval_batch_size=8,
                learning_rate=1e-2, logging_steps=2, disable_tqdm=True, mesh_shape={"data": 1})
    base.update(kw)
    return TrainingArguments(**base)


def _data(rows=32, length=16, seed=0) -> ArrayDataset:
    return ArrayDataset(lm_rows(rows, length, seed))


class ParamsAtSave(TrainerCallback):
    """Host copies of the params at every save, taken from the trainer (set `.trainer` after construction)."""

    def __init__(self):
        self.trainer, self.params = None, {}

    def on_save(self, args, state, control, **kwargs):
        self.params[state.global_step] = jax.device_get(self.trainer.train_state.params)


def _steps(out) -> list[int]:
    return [int(os.path.basename(p).split("-")[1]) for p in checkpoint_dirs(str(out))]


def _assert_same_tree(a, b) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _eval_losses(trainer) -> dict[int, float]:
    return {e["step"]: e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e}


@pytest.fixture(scope="module")
def best_run(tmp_path_factory):
    """Eval and save every 2 steps, keep 2 checkpoints, best = *highest* eval loss.

    greater_is_better=True on a falling loss makes an early checkpoint the best one, so rotation
    has to keep a checkpoint that is not among the newest, and loading the best model visibly
    changes the params.
    """
    out = tmp_path_factory.mktemp("best") / "out"
    snap = ParamsAtSave()
    args = _args(out, eval_strategy="steps", eval_steps=2, save_steps=2, save_total_limit=2,
                 metric_for_best_model="loss", greater_is_better=True, load_best_model_at_end=True)
    trainer = Trainer(tiny_llama(), args, train_dataset=_data(), eval_dataset=_data(8, seed=1), callbacks=[snap])
    snap.trainer = trainer
    trainer.train()
    return trainer, snap, out


def test_rotation_keeps_newest_and_best(best_run):
    trainer, _, out = best_run
    evals = _eval_losses(trainer)
    best_step = max(evals, key=evals.get)
    assert best_step != 8, f"the loss did not fall, so the test cannot tell best from newest: {evals}"
    assert _steps(out) == [best_step, 8]  # save_total_limit=2: the newest and the best
    assert trainer.state.best_metric == evals[best_step]
    assert trainer.state.best_model_checkpoint == os.path.join(str(out), f"checkpoint-{best_step}")
    for step in (best_step, 8):
        assert sorted(os.listdir(out / f"checkpoint-{step}")) == LAYOUT
    saved = json.loads((out / "checkpoint-8" / "trainer_state.json").read_text())
    assert saved["global_step"] == 8 and saved["best_global_step"] == best_step
    assert saved["best_model_checkpoint"].endswith(f"checkpoint-{best_step}")


def test_load_best_model_at_end_restores_the_best_params(best_run):
    trainer, snap, _ = best_run
    best_step = trainer.state.best_global_step
    _assert_same_tree(trainer.params, snap.params[best_step])
    assert trainer.state.global_step == 8  # HF: only the model comes back, not the step
    # Same eval program on the same params and data: the best metric is reproduced exactly.
    assert trainer.evaluate()["eval_loss"] == trainer.state.best_metric


def test_save_strategy_best_with_save_only_model_cannot_resume(tmp_path):
    out = tmp_path / "out"
    snap = ParamsAtSave()
    args = _args(out, max_steps=6, eval_strategy="steps", eval_steps=2, save_strategy="best",
                 metric_for_best_model="loss", greater_is_better=True, save_only_model=True,
                 load_best_model_at_end=True)
    trainer = Trainer(tiny_llama(), args, train_dataset=_data(), eval_dataset=_data(8, seed=1), callbacks=[snap])
    snap.trainer = trainer
    trainer.train()
    evals = _eval_losses(trainer)
    improved = [s for s in sorted(evals) if evals[s] == max(evals[t] for t in evals if t <= s)]
    assert _steps(out) == improved  # 'best' saves exactly when the metric improved
    meta = json.loads((out / f"checkpoint-{improved[0]}" / "jtrain_meta.json").read_text())
    assert meta["params_only"] is True
    _assert_same_tree(trainer.params, snap.params[improved[-1]])  # load_best works from a model-only checkpoint
    again = Trainer(tiny_llama(), _args(out, max_steps=6), train_dataset=_data())
    with pytest.raises(CheckpointError, match="model only .*cannot resume"):
        again.train(resume_from_checkpoint=True)


def _fake_checkpoint(path, complete: bool) -> None:
    """A directory shaped like a checkpoint killed mid-write (orbax tmp dir, no marker) or a complete one."""
    os.makedirs(path / ("state" if complete else "state.orbax-checkpoint-tmp-1234"))
    if complete:
        (path / "state" / "_METADATA").write_text("{}")
        for name in ("trainer_state.json", "loader_state.json", "jtrain_meta.json"):
            (path / name).write_text("{}")


def test_latest_checkpoint_ignores_incomplete_and_damaged_json(tmp_path, caplog):
    _fake_checkpoint(tmp_path / "checkpoint-5", complete=True)
    _fake_checkpoint(tmp_path / "checkpoint-20", complete=False)  # killed while orbax wrote it
    _fake_checkpoint(tmp_path / "checkpoint-10", complete=True)
    (tmp_path / "checkpoint-10" / "loader_state.json").write_text('{"epoch": 0, "batch_')  # truncated
    (tmp_path / "checkpoint-7").mkdir()  # a directory with nothing in it
    with caplog.at_level(logging.WARNING, logger="jtrain.checkpoint"):
        assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-5")
    assert "checkpoint-10" in caplog.text and "loader_state.json is damaged" in caplog.text
    assert "checkpoint-20" not in caplog.text  # an incomplete write is expected after a kill: no warning
    assert "incomplete" in checkpoint_problem(str(tmp_path / "checkpoint-20"))


def test_auto_resume_tries_older_checkpoints_but_a_named_one_alone(tmp_path):
    for step in (3, 6, 9):
        _fake_checkpoint(tmp_path / f"checkpoint-{step}", complete=True)
    _fake_checkpoint(tmp_path / "checkpoint-12", complete=False)
    latest = latest_checkpoint(str(tmp_path))  # what `python -m jtrain.run` resumes from
    assert isinstance(latest, LatestCheckpoint) and latest == str(tmp_path / "checkpoint-9")
    names = [os.path.basename(p) for p in checkpoints_to_try(latest, str(tmp_path))]
    assert names == ["checkpoint-9", "checkpoint-6", "checkpoint-3"]
    assert [os.path.basename(p) for p in checkpoints_to_try(True, str(tmp_path))] == names
    named = str(tmp_path / "checkpoint-6")
    assert checkpoints_to_try(named, str(tmp_path)) == [named]


def _truncate_largest_state_file(ckpt) -> str:
    files = [os.path.join(r, f) for r, _, fs in os.walk(ckpt / "state") for f in fs]
    largest = max(files, key=os.path.getsize)
    with open(largest, "r+b") as fh:
        fh.truncate(os.path.getsize(largest) // 2)
    return largest


def _losses_after(trainer, step: int) -> list[tuple]:
    return [(e["step"], e["loss"], e["grad_norm"], e["learning_rate"]) for e in trainer.state.log_history
            if "loss" in e and e["step"] > step]


def test_resume_true_takes_latest_and_falls_back_from_a_damaged_one(best_run, tmp_path, caplog, monkeypatch):
    trainer, snap, src = best_run
    out = tmp_path / "out"
    shutil.copytree(src, out)
    _fake_checkpoint(out / "checkpoint-12", complete=False)
    resumed = Trainer(tiny_llama(), _args(out, save_strategy="no"), train_dataset=_data())
    metrics = resumed.train(resume_from_checkpoint=True).metrics  # already at max_steps: restores only
    assert resumed._resumed_from == str(out / "checkpoint-8")  # the latest complete one, not the partial 12
    assert metrics["resume_seconds"] >= 0

    _truncate_largest_state_file(out / "checkpoint-8")
    best_step = trainer.state.best_global_step
    fetched = []
    original = HostLoader.host_batch
    monkeypatch.setattr(HostLoader, "host_batch", lambda self, e, i: fetched.append((e, i)) or original(self, e, i))
    again = Trainer(tiny_llama(), _args(out, save_strategy="no"), train_dataset=_data())
    with caplog.at_level(logging.WARNING, logger="jtrain.trainer"):
        again.train(resume_from_checkpoint=True)
    assert "checkpoint-8 cannot be restored" in caplog.text
    assert again._resumed_from == str(out / f"checkpoint-{best_step}")
    # The loader starts at the saved position (32 rows / 4 = 8 batches per epoch): nothing is replayed.
    assert fetched[0] == (0, best_step) and min(fetched) == (0, best_step), fetched[:4]
    # Resumed == uninterrupted: same program and inputs on the same device, so bitwise.
    _assert_same_tree(again.params, snap.params[8])
    assert _losses_after(again, best_step) == _losses_after(trainer, best_step)
    # A checkpoint named explicitly is never swapped for another one.
    with pytest.raises(CheckpointError, match="checkpoint-8"):
        again.train(resume_from_checkpoint=str(out / "checkpoint-8"))
