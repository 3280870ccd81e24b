"""Trainer x callbacks: early stopping, plateau schedules without recompiling, logger files."""

from __future__ import annotations

import os

import numpy as np

from jtrain import EarlyStoppingCallback, Trainer, TrainingArguments
from jtrain.data.loader import ArrayDataset
from jtrain.reporting import read_jsonl
from jtrain.tb_events import read_tensorboard_scalars
from tiny import lm_rows, tiny_llama


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), max_steps=12, per_device_train_batch_size=4,
                per_device_eval_batch_size=8, learning_rate=1e-2, logging_steps=2, save_strategy="no",
                disable_tqdm=True, mesh_shape={"data": 1}, eval_strategy="steps", eval_steps=2)
    base.update(kw)
    return TrainingArguments(**base)


def _trainer(tmp_path, callbacks=None, **kw):
    return Trainer(tiny_llama(), _args(tmp_path, **kw), train_dataset=ArrayDataset(lm_rows(64, 16)),
                   eval_dataset=ArrayDataset(lm_rows(16, 16, seed=1)), callbacks=callbacks)


def test_early_stopping_with_patience_2_stops_when_metric_stalls(tmp_path):
    # A threshold far above any possible improvement makes every evaluation after the first a stall.
    stopper = EarlyStoppingCallback(early_stopping_patience=2, early_stopping_threshold=100.0)
    trainer = _trainer(tmp_path, [stopper], max_steps=20, metric_for_best_model="eval_loss",
                       load_best_model_at_end=True, save_strategy="steps", save_steps=2)
    out = trainer.train()
    # evals at 2 (first, sets the best), 4 (stall 1), 6 (stall 2 -> stop)
    assert out.global_step == 6
    assert stopper.early_stopping_patience_counter == 2


def test_callback_state_is_restored_on_resume_only_when_asked(tmp_path):
    """HF's restore_callback_states_from_checkpoint: the checkpoint at step 4 saved a patience counter
    of 1; resuming from it with the flag continues from 1 (and stops one evaluation earlier), without
    it (HF's default) the counter starts at 0."""
    kw = dict(max_steps=20, metric_for_best_model="eval_loss", load_best_model_at_end=True, save_strategy="steps",
              save_steps=2)
    first = EarlyStoppingCallback(early_stopping_patience=3, early_stopping_threshold=100.0)
    _trainer(tmp_path, [first], **kw).train()  # evals at 2 (best), 4, 6, 8 (stall 3 -> stop at 8)
    checkpoint = str(tmp_path / "out" / "checkpoint-4")
    for restore, stops_at in ((True, 8), (False, 10)):
        stopper = EarlyStoppingCallback(early_stopping_patience=3, early_stopping_threshold=100.0)
        trainer = _trainer(tmp_path / str(restore), [stopper], restore_callback_states_from_checkpoint=restore, **kw)
        assert trainer.train(resume_from_checkpoint=checkpoint).global_step == stops_at, restore


def test_reduce_lr_on_plateau_changes_lr_without_recompiling(tmp_path):
    trainer = _trainer(tmp_path, lr_scheduler_type="reduce_lr_on_plateau", metric_for_best_model="eval_loss",
                       lr_scheduler_kwargs={"patience": 0, "factor": 0.5, "threshold": 100.0,
                                            "threshold_mode": "abs"})
    trainer.train()
    lrs = [e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e]
    # The step reports the learning rate in float32: 1e-2 to within float32 rounding (rel 1e-7).
    np.testing.assert_allclose(lrs[0], 1e-2, rtol=1e-7)
    assert lrs[-1] < lrs[0] * 0.2, lrs
    assert float(trainer.train_state.lr_factor) < 0.2
    assert trainer.steps.compile_log.counts["train"] == 1


def test_jsonl_and_tensorboard_logs_hold_every_logged_value(tmp_path):
    trainer = _trainer(tmp_path, report_to=["jsonl", "tensorboard"], eval_strategy="no")
    trainer.train()
    logdir = os.path.join(str(tmp_path / "out"), "runs")
    lines = read_jsonl(os.path.join(logdir, "logs.jsonl"))
    assert [e["step"] for e in lines if "loss" in e] == [2, 4, 6, 8, 10, 12]
    event_files = [f for f in os.listdir(logdir) if "tfevents" in f]
    assert event_files
    scalars = read_tensorboard_scalars(os.path.join(logdir, event_files[0]))
    losses = [(step, value) for step, tag, value in scalars if tag == "train/loss"]
    expected = [(e["step"], e["loss"]) for e in lines if "loss" in e]
    assert [s for s, _ in losses] == [s for s, _ in expected]
    np.testing.assert_allclose([v for _, v in losses], [v for _, v in expected], rtol=1e-6)  # float32 in the file
