"""Callbacks and reporters against their reference: transformers' own classes, driven alike."""
from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from jtrain import TrainingArguments
from jtrain import callbacks as jc
from jtrain import reporting as jr
from jtrain import tb_events
from jtrain.errors import ConfigError

hf_cb = pytest.importorskip("transformers.trainer_callback", reason="reference needs transformers")


def make_args(**overrides) -> SimpleNamespace:
    """HF TrainingArguments field names and defaults for the fields the callbacks read."""
    fields = dict(
        logging_strategy="steps", logging_steps=500, logging_first_step=False,
        eval_strategy="no", eval_steps=None, eval_delay=0,
        save_strategy="steps", save_steps=500, disable_tqdm=True,
        metric_for_best_model=None, greater_is_better=None, load_best_model_at_end=False,
        logging_dir="runs", run_name="test",
    )
    fields.update(overrides)
    return SimpleNamespace(**fields)


# ----------------------------------------------------------------------------- TrainerState


def _state_values() -> dict:
    return dict(
        epoch=1.5, global_step=30, max_steps=40, logging_steps=5, eval_steps=10, save_steps=20,
        train_batch_size=8, num_train_epochs=2, num_input_tokens_seen=1234, total_flos=5.5e12,
        log_history=[{"loss": 2.5, "learning_rate": 1e-4, "epoch": 0.25, "step": 5}],
        best_metric=0.75, best_global_step=20, best_model_checkpoint="out/checkpoint-20",
        is_hyper_param_search=False, trial_name=None, trial_params=None,
    )


def test_trainer_state_json_round_trip(tmp_path):
    early = jc.EarlyStoppingCallback(2, 0.01)
    early.early_stopping_patience_counter = 1
    state = jc.TrainerState(**_state_values(), stateful_callbacks=[early, jc.TrainerControl()])
    path = tmp_path / "trainer_state.json"
    state.save_to_json(str(path))
    loaded = jc.TrainerState.load_from_json(str(path))
    assert loaded == state
    restored = jc.EarlyStoppingCallback.from_state(loaded.stateful_callbacks["EarlyStoppingCallback"])
    assert restored.state() == early.state()


def test_early_stopping_patience_restarts_with_a_fresh_run_only():
    """A new run from step 0 (e.g. the next hyperparameter-search trial sharing the callback) starts
    its patience afresh; a resumed run keeps the count restored from its checkpoint."""
    args = TrainingArguments(output_dir="unused", eval_strategy="steps", metric_for_best_model="loss",
                             load_best_model_at_end=True, save_strategy="steps")
    early = jc.EarlyStoppingCallback(3)
    for step, expected in ((7, 2), (0, 0)):
        early.early_stopping_patience_counter = 2
        early.on_train_begin(args, jc.TrainerState(global_step=step), jc.TrainerControl())
        assert early.early_stopping_patience_counter == expected


def test_trainer_state_json_is_byte_identical_to_transformers(tmp_path):
    ours = jc.TrainerState(**_state_values(), stateful_callbacks=[jc.EarlyStoppingCallback(3), jc.TrainerControl()])
    theirs = hf_cb.TrainerState(
        **_state_values(), stateful_callbacks=[hf_cb.EarlyStoppingCallback(3), hf_cb.TrainerControl()]
    )
    ours.save_to_json(str(tmp_path / "ours.json"))
    theirs.save_to_json(str(tmp_path / "theirs.json"))
    ours_text, theirs_text = (tmp_path / "ours.json").read_text(), (tmp_path / "theirs.json").read_text()
    assert json.loads(ours_text).keys() == json.loads(theirs_text).keys()
    assert ours_text == theirs_text
    assert ours_text.endswith("}\n")
    # HF can load what we wrote, and the other way round.
    assert hf_cb.TrainerState.load_from_json(str(tmp_path / "ours.json")) == theirs


def test_trainer_state_json_accepts_numpy_scalars(tmp_path):
    state = jc.TrainerState(log_history=[{"loss": np.float32(0.5), "step": np.int64(3)}])
    state.save_to_json(str(tmp_path / "s.json"))
    assert jc.TrainerState.load_from_json(str(tmp_path / "s.json")).log_history == [{"loss": 0.5, "step": 3}]


@pytest.mark.parametrize("steps", [(0.1, 0.25, 0.5), (5, 10, 20), (0.01, None, 1)])
def test_compute_steps_matches_transformers(steps):
    args = make_args(logging_steps=steps[0], eval_steps=steps[1], save_steps=steps[2])
    ours, theirs = jc.TrainerState(), hf_cb.TrainerState()
    ours.compute_steps(args, 47)
    theirs.compute_steps(args, 47)
    assert (ours.logging_steps, ours.eval_steps, ours.save_steps) == (
        theirs.logging_steps, theirs.eval_steps, theirs.save_steps
    )


# ----------------------------------------------------------------------------- flow


def _flags(control) -> tuple:
    return (control.should_log, control.should_evaluate, control.should_save,
            control.should_epoch_stop, control.should_training_stop)


def _simulate(lib, args, max_steps: int, steps_per_epoch: int, extra=()) -> list:
    """Drive `lib`'s handler the way HF's training loop does; record flags after each decision."""
    callbacks = [lib.DefaultFlowCallback(), *extra]
    handler = lib.CallbackHandler(callbacks, None, None, None, None)
    state, control = lib.TrainerState(), lib.TrainerControl()
    state.max_steps = max_steps
    state.compute_steps(args, max_steps)
    control = handler.on_train_begin(args, state, control)
    trace, epochs = [], -(-max_steps // steps_per_epoch)
    for epoch in range(epochs):
        control = handler.on_epoch_begin(args, state, control)
        for step in range(steps_per_epoch):
            control = handler.on_step_begin(args, state, control)
            state.global_step += 1
            state.epoch = epoch + (step + 1) / steps_per_epoch
            control = handler.on_step_end(args, state, control)
            trace.append(("step", state.global_step, _flags(control)))
            control = _act(handler, args, state, control)
            if control.should_epoch_stop or control.should_training_stop:
                break
        control = handler.on_epoch_end(args, state, control)
        trace.append(("epoch", epoch, _flags(control)))
        control = _act(handler, args, state, control)
        if control.should_training_stop:
            break
    handler.on_train_end(args, state, control)
    return trace


def _act(handler, args, state, control):
    """What HF's `_maybe_log_save_evaluate` does with the flags, metrics stalling after step 20."""
    if control.should_log:
        control = handler.on_log(args, state, control, logs={"loss": 1.0 / state.global_step})
    if control.should_evaluate:
        metric = 1.0 / min(state.global_step, 20)
        control = handler.on_evaluate(args, state, control, metrics={"eval_loss": metric})
        if state.best_metric is None or metric < state.best_metric:  # after on_evaluate, as in HF
            state.best_metric = metric
    if control.should_save:
        control = handler.on_save(args, state, control)
    return control


FLOW_CASES = {
    "steps+first": dict(logging_steps=5, logging_first_step=True, eval_strategy="steps", eval_steps=10,
                        save_steps=20),
    "ratios": dict(logging_steps=0.1, eval_strategy="steps", eval_steps=0.25, save_steps=0.5),
    "epochs+delay": dict(logging_strategy="epoch", eval_strategy="epoch", eval_delay=2,
                         save_strategy="epoch"),
    "step_delay": dict(logging_steps=3, eval_strategy="steps", eval_steps=4, eval_delay=16, save_steps=7),
    "mixed_no": dict(logging_strategy="no", eval_strategy="epoch", save_strategy="no"),
    "best": dict(eval_strategy="steps", eval_steps=6, save_strategy="best", logging_steps=1),
}


@pytest.mark.parametrize("max_steps,steps_per_epoch", [(50, 10), (47, 12)])
@pytest.mark.parametrize("case", sorted(FLOW_CASES))
def test_default_flow_matches_transformers(case, max_steps, steps_per_epoch):
    args = make_args(**FLOW_CASES[case])
    ours = _simulate(jc, args, max_steps, steps_per_epoch)
    theirs = _simulate(hf_cb, args, max_steps, steps_per_epoch)
    assert ours == theirs
    assert any(flags[0] for _, _, flags in ours) == (args.logging_strategy != "no")


def test_default_flow_accepts_transformers_enums():
    from transformers.trainer_utils import IntervalStrategy, SaveStrategy

    args = make_args(logging_strategy=IntervalStrategy.STEPS, logging_steps=4,
                     eval_strategy=IntervalStrategy.EPOCH, save_strategy=SaveStrategy.STEPS, save_steps=8)
    assert _simulate(jc, args, 30, 10) == _simulate(hf_cb, args, 30, 10)


# ----------------------------------------------------------------------------- early stopping


def test_early_stopping_patience_two_matches_transformers():
    args = make_args(eval_strategy="steps", eval_steps=5, logging_steps=5,
                     metric_for_best_model="loss", greater_is_better=False, load_best_model_at_end=True)
    ours = _simulate(jc, args, 50, 10, extra=[jc.EarlyStoppingCallback(early_stopping_patience=2)])
    theirs = _simulate(hf_cb, args, 50, 10, extra=[hf_cb.EarlyStoppingCallback(early_stopping_patience=2)])
    assert ours == theirs
    last_step = max(step for kind, step, _ in ours if kind == "step")
    assert last_step == 30  # best at step 20, no improvement at 25 and 30 -> stop


@pytest.mark.parametrize("greater,threshold", [(True, 0.0), (False, 0.0), (True, 0.05), (False, 0.05)])
def test_early_stopping_counter_matches_transformers(greater, threshold):
    args = make_args(metric_for_best_model="accuracy", greater_is_better=greater, eval_strategy="steps")
    ours, theirs = jc.EarlyStoppingCallback(3, threshold), hf_cb.EarlyStoppingCallback(3, threshold)
    state_o, state_t = jc.TrainerState(), hf_cb.TrainerState()
    control_o, control_t = jc.TrainerControl(), hf_cb.TrainerControl()
    better = max if greater else min
    for value in [0.5, 0.6, 0.62, 0.55, 0.7, 0.71, 0.69, 0.4, 0.9]:
        ours.on_evaluate(args, state_o, control_o, metrics={"eval_accuracy": value})
        theirs.on_evaluate(args, state_t, control_t, metrics={"eval_accuracy": value})
        assert ours.early_stopping_patience_counter == theirs.early_stopping_patience_counter
        assert control_o.should_training_stop == control_t.should_training_stop
        for state in (state_o, state_t):
            state.best_metric = value if state.best_metric is None else better(value, state.best_metric)


def test_early_stopping_state_and_config_errors():
    cb = jc.EarlyStoppingCallback(4, 0.1)
    cb.early_stopping_patience_counter = 3
    assert jc.EarlyStoppingCallback.from_state(cb.state()).state() == cb.state()
    state, control = jc.TrainerState(), jc.TrainerControl()
    with pytest.raises(ConfigError, match="metric_for_best_model"):
        cb.on_train_begin(make_args(eval_strategy="steps"), state, control)
    with pytest.raises(ConfigError, match="eval_strategy"):
        cb.on_train_begin(make_args(metric_for_best_model="loss"), state, control)
    cb.on_evaluate(make_args(metric_for_best_model="loss"), state, control, metrics={"eval_other": 1})
    assert cb.early_stopping_patience_counter == 3  # missing metric: no change, as in HF


# ----------------------------------------------------------------------------- handler


class _Recorder(jc.TrainerCallback):
    def __init__(self):
        self.seen = []

    def on_step_end(self, args, state, control, **kwargs):
        self.seen.append(sorted(kwargs))
        return jc.TrainerControl(should_save=True)


def test_callback_handler_add_pop_remove_and_kwargs():
    rec = _Recorder()
    handler = jc.CallbackHandler([jc.DefaultFlowCallback, rec], "model", "tok", "opt", "sched")
    assert handler.callback_list == "DefaultFlowCallback\n_Recorder"
    args, state = make_args(), jc.TrainerState(max_steps=100, global_step=1)
    control = handler.on_step_end(args, state, jc.TrainerControl(), grad_norm=1.5)
    assert control.should_save  # a returned control replaces the one passed in
    assert rec.seen == [sorted(["model", "processing_class", "optimizer", "lr_scheduler",
                                "train_dataloader", "eval_dataloader", "grad_norm"])]
    assert handler.pop_callback(_Recorder) is rec
    assert handler.pop_callback(_Recorder) is None
    handler.add_callback(rec)
    handler.remove_callback(rec)
    handler.remove_callback(jc.DefaultFlowCallback)
    assert handler.callbacks == []
    control = jc.TrainerControl(should_log=True, should_save=True, should_evaluate=True)
    control = handler.on_step_begin(args, state, control)
    assert not (control.should_log or control.should_save or control.should_evaluate)


def test_every_hf_event_exists():
    events = [name for name in vars(hf_cb.TrainerCallback) if name.startswith("on_")]
    for name in events:
        assert callable(getattr(jc.TrainerCallback, name)), name
        assert callable(getattr(jc.CallbackHandler, name)), name


def test_trainer_control_resets_and_state():
    control = jc.TrainerControl(True, True, True, True, True)
    control._new_step()
    assert (control.should_log, control.should_save, control.should_evaluate) == (False, False, False)
    control._new_epoch()
    assert not control.should_epoch_stop and control.should_training_stop
    assert jc.TrainerControl.from_state(control.state()) == control
    control._new_training()
    assert not control.should_training_stop


def test_progress_and_printer_callbacks(capsys):
    args, state = make_args(disable_tqdm=False), jc.TrainerState(max_steps=4)
    progress, control = jc.ProgressCallback(), jc.TrainerControl()
    progress.on_train_begin(args, state, control)
    for step in range(1, 5):
        state.global_step, state.num_input_tokens_seen = step, 64 * step
        progress.on_step_end(args, state, control)
        progress.on_log(args, state, control, logs={"loss": 0.5, "learning_rate": 1e-3})
    progress.on_log(args, state, control, logs={"eval_loss": 0.25, "total_flos": 1.0})
    progress.on_train_end(args, state, control)
    printed = capsys.readouterr()  # the bar on stderr, eval metrics on stdout (tqdm.write, as HF)
    assert "4/4" in printed.err and "loss=0.5" in printed.err and "tok/s=" in printed.err
    assert "eval_loss" in printed.out and "total_flos" not in printed.out
    silent = jc.ProgressCallback()
    silent.on_train_begin(make_args(disable_tqdm=True), state, control)
    assert silent.training_bar is None
    jc.PrinterCallback().on_log(args, state, control, logs={"loss": 0.123456, "total_flos": 3.0})
    assert capsys.readouterr().out.strip() == "{'loss': '0.1235'}"


# ----------------------------------------------------------------------------- reporters


def _log_run(callback, logs_per_step) -> None:
    args, state, control = make_args(), jc.TrainerState(), jc.TrainerControl()
    callback.on_train_begin(args, state, control)
    for step, logs in logs_per_step:
        state.global_step, state.epoch = step, step / 10
        callback.on_log(args, state, control, logs=dict(logs))
    callback.on_train_end(args, state, control)


TB_LOGS = [(1, {"loss": 2.0, "learning_rate": 1e-3}), (2, {"loss": 1.5, "learning_rate": 9e-4}),
           (2, {"eval_loss": 1.75, "eval_runtime": np.float32(0.5), "note": "skipped"})]


def test_crc32c_known_vector():
    assert tb_events.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value


def test_tensorboard_file_with_own_reader(tmp_path):
    _log_run(jr.TensorBoardCallback(str(tmp_path)), TB_LOGS)
    (event_file,) = tmp_path.glob("events.out.tfevents.*")
    scalars = tb_events.read_tensorboard_scalars(str(event_file))
    assert scalars == [(1, "train/loss", 2.0), (1, "train/learning_rate", pytest.approx(1e-3)),
                       (2, "train/loss", 1.5), (2, "train/learning_rate", pytest.approx(9e-4)),
                       (2, "eval/loss", 1.75), (2, "eval/runtime", 0.5)]
    data = bytearray(event_file.read_bytes())
    data[-6] ^= 0xFF
    event_file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt"):
        tb_events.read_tensorboard_scalars(str(event_file))


def test_tensorboard_callback_added_by_hand_writes_under_output_dir(tmp_path):
    """Without a `log_dir`, a hand-added TensorBoardCallback writes where the Trainer's own would:
    `args.logging_dir`, by default `output_dir/runs` (it used to fall back to ./runs in the cwd)."""
    from jtrain import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to=["none"])
    state, control = jc.TrainerState(), jc.TrainerControl()
    callback = jr.TensorBoardCallback()
    callback.on_train_begin(args, state, control)
    state.global_step = 1
    callback.on_log(args, state, control, logs={"loss": 2.0})
    callback.on_train_end(args, state, control)
    (event_file,) = (tmp_path / "out" / "runs").glob("events.out.tfevents.*")
    assert tb_events.read_tensorboard_scalars(str(event_file)) == [(1, "train/loss", 2.0)]


def test_tensorboard_file_with_tensorboard(tmp_path):
    accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator",
        reason="tensorboard is an optional extra (pip install tensorboard)",
    )
    _log_run(jr.TensorBoardCallback(str(tmp_path)), TB_LOGS)
    acc = accumulator.EventAccumulator(str(tmp_path))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["eval/loss", "eval/runtime", "train/learning_rate", "train/loss"]
    loss = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert loss == [(1, 2.0), (2, 1.5)]
    assert acc.Scalars("eval/loss")[0].value == 1.75


def test_jsonl_round_trip(tmp_path):
    path = tmp_path / "sub" / "logs.jsonl"
    logs = [(1, {"loss": 2.0, "grad_norm": np.float32(0.5)}), (3, {"eval_loss": 1.0, "epoch": 0.25})]
    _log_run(jr.JsonlLoggerCallback(str(path)), logs)
    _log_run(jr.JsonlLoggerCallback(str(path)), [(4, {"loss": 0.5})])  # a resumed run appends
    assert jr.read_jsonl(str(path)) == [
        {"loss": 2.0, "grad_norm": 0.5, "epoch": 0.1, "step": 1},
        {"eval_loss": 1.0, "epoch": 0.25, "step": 3},
        {"loss": 0.5, "epoch": 0.4, "step": 4},
    ]


def test_report_to(tmp_path, monkeypatch):
    names = lambda cbs: [type(cb).__name__ for cb in cbs]  # noqa: E731
    assert jr.callbacks_for_report_to("none", str(tmp_path)) == []
    assert jr.callbacks_for_report_to(None, str(tmp_path)) == []
    assert names(jr.callbacks_for_report_to(["tensorboard", "jsonl"], str(tmp_path))) == [
        "TensorBoardCallback", "JsonlLoggerCallback"]
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail
    monkeypatch.setitem(sys.modules, "mlflow", None)
    assert names(jr.callbacks_for_report_to("all", str(tmp_path)))[:2] == ["TensorBoardCallback",
                                                                          "JsonlLoggerCallback"]
    with pytest.raises(ValueError, match="valid: none, all, tensorboard, jsonl, wandb, mlflow"):
        jr.callbacks_for_report_to("tensorbord", str(tmp_path))
    with pytest.raises(ValueError, match="cannot be combined"):
        jr.callbacks_for_report_to(["none", "jsonl"], str(tmp_path))
    with pytest.raises(ImportError, match="pip install wandb"):
        jr.callbacks_for_report_to("wandb", str(tmp_path))
    with pytest.raises(ImportError, match="pip install mlflow"):
        jr.callbacks_for_report_to("mlflow", str(tmp_path))


def test_exportable_state_requires_state_at_construction():
    """A stateful callback without `state()` is refused when it is built, not when a checkpoint is saved."""

    class NoState(jc.TrainerCallback, jc.ExportableState):
        pass

    class WithState(jc.TrainerCallback, jc.ExportableState):
        def __init__(self, patience: int = 1):
            self.patience, self.seen = patience, 0

        def state(self) -> dict:
            return {"args": {"patience": self.patience}, "attributes": {"seen": self.seen}}

    with pytest.raises(TypeError, match="abstract method state"):
        NoState()
    cb = WithState(3)
    cb.seen = 2
    back = WithState.from_state(cb.state())
    assert (back.patience, back.seen) == (3, 2)
