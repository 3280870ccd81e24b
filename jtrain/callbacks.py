"""Host-side training callbacks with Hugging Face `Trainer` names and semantics.

A user who wrote a `transformers.TrainerCallback` can port it by changing the import: the
events, the `TrainerState` / `TrainerControl` fields and `trainer_state.json` are the same.
Everything here runs on the host between compiled steps (design contract 8); nothing in this
module touches JAX, so a callback can never trigger a recompile.

`args` is duck-typed everywhere: any object with HF `TrainingArguments` field names works.
"""
from __future__ import annotations

import abc
import dataclasses
import enum
import json
import logging
import math
import operator
from dataclasses import dataclass, field
from typing import Any

from jtrain.errors import ConfigError

logger = logging.getLogger(__name__)


class IntervalStrategy(str, enum.Enum):
    """When to log / evaluate. A `str` enum, so `"steps" == IntervalStrategy.STEPS`."""

    NO = "no"
    STEPS = "steps"
    EPOCH = "epoch"


class SaveStrategy(str, enum.Enum):
    """When to save; `BEST` saves whenever `metric_for_best_model` improves (the trainer decides)."""

    NO = "no"
    STEPS = "steps"
    EPOCH = "epoch"
    BEST = "best"


def _strategy(args: Any, name: str) -> str:
    """Read a strategy field as a plain string, whether it is an enum (HF's or ours) or a str."""
    value = getattr(args, name, "no")
    return str(getattr(value, "value", value))


def _json_default(obj: Any) -> Any:
    """Let numpy / JAX scalars and arrays reach the JSON file; HF would raise on them."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


class ExportableState(abc.ABC):
    """Abstract base (a mixin, as in HF) for callbacks whose state goes into `trainer_state.json`.

    Implement `state() -> {"args": {...}, "attributes": {...}}`: `args` rebuild the object through
    its constructor and `attributes` are set on it afterwards. Plain JSON, so a checkpoint never
    needs pickle. A subclass without `state` cannot be instantiated (HF only fails at save time).
    """

    @abc.abstractmethod
    def state(self) -> dict:
        """The constructor `args` and the `attributes` to restore, as plain JSON."""

    @classmethod
    def from_state(cls, state: dict) -> Any:
        instance = cls(**state["args"])
        for key, value in state["attributes"].items():
            setattr(instance, key, value)
        return instance


@dataclass
class TrainerState:
    """Loop state saved as `checkpoint-N/trainer_state.json`; a step is one optimizer update.

    Field names, defaults and the JSON layout are HF's, so HF tooling reads our checkpoints.
    """

    epoch: float = 0
    global_step: int = 0
    max_steps: int = 0
    logging_steps: int = 500
    eval_steps: int = 500
    save_steps: int = 500
    train_batch_size: int | None = None
    num_train_epochs: int = 0
    num_input_tokens_seen: int = 0
    total_flos: float = 0
    log_history: list[dict[str, float]] = field(default_factory=list)
    best_metric: float | None = None
    best_global_step: int | None = None
    best_model_checkpoint: str | None = None
    is_local_process_zero: bool = True
    is_world_process_zero: bool = True
    is_hyper_param_search: bool = False
    trial_name: str | None = None
    trial_params: dict[str, str | float | int | bool] | None = None
    stateful_callbacks: Any = None

    def __post_init__(self) -> None:
        if self.log_history is None:
            self.log_history = []
        if self.stateful_callbacks is None:
            self.stateful_callbacks = {}
        elif not isinstance(self.stateful_callbacks, dict):
            self.stateful_callbacks = _export_callbacks(self.stateful_callbacks)

    def save_to_json(self, json_path: str) -> None:
        """Write HF's exact format: indent=2, sorted keys, trailing newline."""
        text = json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True, default=_json_default)
        with open(json_path, "w", encoding="utf-8") as f:
            f.write(text + "\n")

    @classmethod
    def load_from_json(cls, json_path: str) -> "TrainerState":
        with open(json_path, encoding="utf-8") as f:
            return cls(**json.loads(f.read()))

    def compute_steps(self, args: Any, max_steps: int) -> None:
        """Turn ratio steps (`logging_steps=0.1`) into absolute ones, rounding up as HF does."""
        for kind in ("logging", "eval", "save"):
            num_steps = getattr(args, f"{kind}_steps", None)
            if num_steps is None:
                continue
            if num_steps < 1:
                num_steps = math.ceil(max_steps * num_steps)
            setattr(self, f"{kind}_steps", num_steps)

    def init_training_references(
        self, trainer: Any, max_steps: int, num_train_epochs: int, trial: Any = None
    ) -> None:
        """Record run-level facts; `trainer` is duck-typed (hp_name, is_*_process_zero)."""
        hp_name, hp_trial = getattr(trainer, "hp_name", None), getattr(trainer, "_trial", None)
        if hp_name is not None and hp_trial is not None:
            self.trial_name = hp_name(hp_trial)
        self.trial_params = dict(trial) if isinstance(trial, dict) else None
        self.max_steps = max_steps
        self.num_train_epochs = num_train_epochs
        self.is_local_process_zero = bool(trainer.is_local_process_zero())
        self.is_world_process_zero = bool(trainer.is_world_process_zero())


def _export_callbacks(callbacks: list) -> dict:
    """Callbacks -> {class name: state}; repeated classes become a list of states, as in HF."""
    exported: dict[str, Any] = {}
    for callback in callbacks:
        if not isinstance(callback, ExportableState):
            raise TypeError(
                "All callbacks passed to be saved must inherit `ExportableState`, "
                f"but received {type(callback)}"
            )
        name = type(callback).__name__
        if name not in exported:
            exported[name] = callback.state()
        elif isinstance(exported[name], list):
            exported[name].append(callback.state())
        else:
            exported[name] = [exported[name], callback.state()]
    return exported


@dataclass
class TrainerControl(ExportableState):
    """Switches callbacks flip to steer the loop. The step-level flags reset every step,
    `should_epoch_stop` every epoch, and `should_training_stop` only at a new `train()`."""

    should_training_stop: bool = False
    should_epoch_stop: bool = False
    should_save: bool = False
    should_evaluate: bool = False
    should_log: bool = False

    def _new_training(self) -> None:
        self.should_training_stop = False

    def _new_epoch(self) -> None:
        self.should_epoch_stop = False

    def _new_step(self) -> None:
        self.should_save = False
        self.should_evaluate = False
        self.should_log = False

    def state(self) -> dict:
        return {"args": dataclasses.asdict(self), "attributes": {}}


class TrainerCallback:
    """Inspect the host loop at events and steer it through `TrainerControl`.

    Every event gets `(args, state, control, **kwargs)`; kwargs always hold `model`,
    `processing_class`, `optimizer`, `lr_scheduler`, `train_dataloader`, `eval_dataloader`
    (in jtrain: params/optax objects/host loaders, whatever the trainer registered), plus
    `metrics` for `on_evaluate`/`on_predict` and `logs` for `on_log`. Return `control` (or
    None if unchanged).

    Difference from HF, because the whole update is one compiled step: the events HF fires
    *inside* the step -- `on_substep_end` (each gradient-accumulation micro-batch),
    `on_pre_optimizer_step` (after clipping) and `on_optimizer_step` (after the update) --
    are fired on the host after the compiled step has reported, in that order, once per
    micro-step (`on_substep_end`, k-1 times for k micro-batches, as in HF) or once per step.
    They get what the step reported in kwargs (e.g. `grad_norm`, `loss`) rather than live
    gradients, and they cannot change the update that already happened. With the pipelined
    loop (step N dispatched before N-1's metrics are read) they may fire one step late
    relative to the device, never relative to `state.global_step` they are given.
    """

    def on_init_end(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs):
        """End of `Trainer.__init__`."""

    def on_train_begin(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs):
        """Beginning of training."""

    def on_train_end(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs):
        """End of training."""

    def on_epoch_begin(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs):
        """Beginning of an epoch."""

    def on_epoch_end(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs):
        """End of an epoch."""

    def on_step_begin(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs):
        """Before a training step (one update, possibly several micro-batches) is dispatched."""

    def on_pre_optimizer_step(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs):
        """After the compiled step reported; in HF: before the optimizer step, after clipping."""

    def on_optimizer_step(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs):
        """After the compiled step reported; in HF: after the optimizer step."""

    def on_substep_end(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs):
        """After the compiled step reported, once per non-final accumulation micro-batch."""

    def on_step_end(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs):
        """End of a training step; `state.global_step` already counts it."""

    def on_evaluate(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs):
        """After an evaluation phase; `metrics` in kwargs."""

    def on_predict(self, args: Any, state: TrainerState, control: TrainerControl, metrics, **kwargs):
        """After a successful prediction."""

    def on_save(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs):
        """After a checkpoint save."""

    def on_log(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs):
        """After `logs` (in kwargs) were appended to `state.log_history`."""

    def on_prediction_step(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs):
        """After one evaluation / prediction batch."""

    def on_push_begin(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs):
        """Kept for HF compatibility; jtrain never pushes to the Hub, so it is never fired."""


def _callback_class(callback: TrainerCallback | type) -> type:
    return callback if isinstance(callback, type) else type(callback)


class CallbackHandler(TrainerCallback):
    """Calls the callbacks in order and resets the control flags HF resets at each event."""

    def __init__(
        self, callbacks: list, model: Any, processing_class: Any, optimizer: Any, lr_scheduler: Any
    ) -> None:
        self.callbacks: list[TrainerCallback] = []
        for callback in callbacks:
            self.add_callback(callback)
        self.model = model
        self.processing_class = processing_class
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.train_dataloader: Any = None
        self.eval_dataloader: Any = None
        if not any(isinstance(cb, DefaultFlowCallback) for cb in self.callbacks):
            logger.warning(
                "The Trainer will not work properly without a DefaultFlowCallback; add one with "
                "`trainer.add_callback(DefaultFlowCallback)`. Current callbacks:\n%s",
                self.callback_list,
            )

    def add_callback(self, callback: TrainerCallback | type) -> None:
        """Add an instance, or a class (instantiated with no arguments)."""
        cls = _callback_class(callback)
        if cls in [type(cb) for cb in self.callbacks]:
            logger.warning("Adding a second %s; current callbacks:\n%s", cls, self.callback_list)
        self.callbacks.append(callback() if isinstance(callback, type) else callback)

    def pop_callback(self, callback: TrainerCallback | type) -> TrainerCallback | None:
        """Remove and return the first match (by class, or by equality for an instance)."""
        for cb in self.callbacks:
            matches = isinstance(cb, callback) if isinstance(callback, type) else cb == callback
            if matches:
                self.callbacks.remove(cb)
                return cb
        return None

    def remove_callback(self, callback: TrainerCallback | type) -> None:
        """Remove the first match; an instance that is absent raises ValueError, as in HF."""
        if isinstance(callback, type):
            self.pop_callback(callback)
        else:
            self.callbacks.remove(callback)

    @property
    def callback_list(self) -> str:
        return "\n".join(type(cb).__name__ for cb in self.callbacks)

    def on_init_end(self, args, state, control, **kwargs):
        return self.call_event("on_init_end", args, state, control, **kwargs)

    def on_train_begin(self, args, state, control, **kwargs):
        control.should_training_stop = False
        return self.call_event("on_train_begin", args, state, control, **kwargs)

    def on_train_end(self, args, state, control, **kwargs):
        return self.call_event("on_train_end", args, state, control, **kwargs)

    def on_epoch_begin(self, args, state, control, **kwargs):
        control.should_epoch_stop = False
        return self.call_event("on_epoch_begin", args, state, control, **kwargs)

    def on_epoch_end(self, args, state, control, **kwargs):
        return self.call_event("on_epoch_end", args, state, control, **kwargs)

    def on_step_begin(self, args, state, control, **kwargs):
        control._new_step()
        return self.call_event("on_step_begin", args, state, control, **kwargs)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        return self.call_event("on_pre_optimizer_step", args, state, control, **kwargs)

    def on_optimizer_step(self, args, state, control, **kwargs):
        return self.call_event("on_optimizer_step", args, state, control, **kwargs)

    def on_substep_end(self, args, state, control, **kwargs):
        return self.call_event("on_substep_end", args, state, control, **kwargs)

    def on_step_end(self, args, state, control, **kwargs):
        return self.call_event("on_step_end", args, state, control, **kwargs)

    def on_evaluate(self, args, state, control, metrics, **kwargs):
        control.should_evaluate = False
        return self.call_event("on_evaluate", args, state, control, metrics=metrics, **kwargs)

    def on_predict(self, args, state, control, metrics, **kwargs):
        return self.call_event("on_predict", args, state, control, metrics=metrics, **kwargs)

    def on_save(self, args, state, control, **kwargs):
        control.should_save = False
        return self.call_event("on_save", args, state, control, **kwargs)

    def on_log(self, args, state, control, logs, **kwargs):
        control.should_log = False
        return self.call_event("on_log", args, state, control, logs=logs, **kwargs)

    def on_prediction_step(self, args, state, control, **kwargs):
        return self.call_event("on_prediction_step", args, state, control, **kwargs)

    def on_push_begin(self, args, state, control, **kwargs):
        return self.call_event("on_push_begin", args, state, control, **kwargs)

    def call_event(self, event: str, args: Any, state: TrainerState, control: TrainerControl, **kwargs):
        """Run `event` on every callback; a callback returning non-None replaces `control`."""
        for callback in self.callbacks:
            result = getattr(callback, event)(
                args,
                state,
                control,
                model=self.model,
                processing_class=self.processing_class,
                optimizer=self.optimizer,
                lr_scheduler=self.lr_scheduler,
                train_dataloader=self.train_dataloader,
                eval_dataloader=self.eval_dataloader,
                **kwargs,
            )
            if result is not None:
                control = result
        return control


class DefaultFlowCallback(TrainerCallback):
    """Decides when to log, evaluate and save from the `*_strategy` / `*_steps` arguments.

    `save_strategy="best"` is not decided here: the trainer saves when the metric improves.
    """

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        eval_steps_mode = _strategy(args, "eval_strategy") == IntervalStrategy.STEPS
        eval_delay = getattr(args, "eval_delay", 0) or 0
        save_steps_mode = _strategy(args, "save_strategy") == SaveStrategy.STEPS
        if step == 1 and getattr(args, "logging_first_step", False):
            control.should_log = True
        if _strategy(args, "logging_strategy") == IntervalStrategy.STEPS and step % state.logging_steps == 0:
            control.should_log = True
        if eval_steps_mode and step % state.eval_steps == 0 and eval_delay <= step:
            control.should_evaluate = True
        if save_steps_mode and state.save_steps > 0 and step % state.save_steps == 0:
            control.should_save = True
        if step >= state.max_steps:
            control.should_training_stop = True
            # A final eval/save unless this step already got one from the interval above.
            if eval_steps_mode and step % state.eval_steps != 0 and eval_delay <= step:
                control.should_evaluate = True
            if save_steps_mode:
                control.should_save = True
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        if _strategy(args, "logging_strategy") == IntervalStrategy.EPOCH:
            control.should_log = True
        eval_delay = getattr(args, "eval_delay", 0) or 0
        if _strategy(args, "eval_strategy") == IntervalStrategy.EPOCH and eval_delay <= state.epoch:
            control.should_evaluate = True
        if _strategy(args, "save_strategy") == SaveStrategy.EPOCH:
            control.should_save = True
        return control


class EarlyStoppingCallback(TrainerCallback, ExportableState):
    """Stop when `metric_for_best_model` fails to improve for `early_stopping_patience` evals.

    "Improve" compares with `state.best_metric` (kept by the trainer's best-model tracking),
    by more than `early_stopping_threshold`, in the direction of `args.greater_is_better`.
    """

    def __init__(self, early_stopping_patience: int = 1, early_stopping_threshold: float | None = 0.0) -> None:
        self.early_stopping_patience = early_stopping_patience
        self.early_stopping_threshold = early_stopping_threshold
        self.early_stopping_patience_counter = 0  # evaluations in a row without improvement

    def check_metric_value(self, args, state, control, metric_value: float) -> None:
        better = operator.gt if args.greater_is_better else operator.lt
        improved = state.best_metric is None or (
            better(metric_value, state.best_metric)
            and abs(metric_value - state.best_metric) > self.early_stopping_threshold
        )
        self.early_stopping_patience_counter = 0 if improved else self.early_stopping_patience_counter + 1

    def on_train_begin(self, args, state, control, **kwargs):
        if not getattr(args, "load_best_model_at_end", False):
            logger.warning(
                "Using EarlyStoppingCallback without load_best_model_at_end=True. "
                "Once training is finished, the best model will not be loaded automatically."
            )
        if getattr(args, "metric_for_best_model", None) is None:
            raise ConfigError("EarlyStoppingCallback requires metric_for_best_model to be set")
        if _strategy(args, "eval_strategy") == IntervalStrategy.NO:
            raise ConfigError("EarlyStoppingCallback requires eval_strategy 'steps' or 'epoch', not 'no'")
        if state.global_step == 0:  # a fresh run (each hyperparameter-search trial is one) starts its patience
            self.early_stopping_patience_counter = 0  # afresh; a resumed run keeps the count it restored

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        key = args.metric_for_best_model
        key = key if key.startswith("eval_") else f"eval_{key}"
        value = (metrics or {}).get(key)
        if value is None:
            logger.warning("early stopping needs metric %s, which eval did not report; disabled", key)
            return
        self.check_metric_value(args, state, control, value)
        if self.early_stopping_patience_counter >= self.early_stopping_patience:
            control.should_training_stop = True

    def state(self) -> dict:
        return {
            "args": {
                "early_stopping_patience": self.early_stopping_patience,
                "early_stopping_threshold": self.early_stopping_threshold,
            },
            "attributes": {"early_stopping_patience_counter": self.early_stopping_patience_counter},
        }


def __getattr__(name: str) -> Any:
    """`ProgressCallback` / `PrinterCallback` live in `jtrain.reporting` (they are console
    reporters); this keeps HF's import path `...callbacks.ProgressCallback` working without
    an import cycle."""
    if name in ("ProgressCallback", "PrinterCallback"):
        from jtrain import reporting

        return getattr(reporting, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
