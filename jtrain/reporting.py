"""Reporters: callbacks that act on `on_log` and send logs to the console, files or services.

Names and tag layout follow HF's integrations (`train/loss`, `eval/loss`), so dashboards built
for HF runs read jtrain runs. TensorBoard event files are written by `jtrain.tb_events` (no
TensorFlow, torch or `tensorboard` needed to write them); W&B and MLflow are imported only when
asked for.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import numbers
import os
import time
from typing import Any

from jtrain.callbacks import TrainerCallback, TrainerState, _json_default
from jtrain.tb_events import EventFileWriter

REPORT_TO_CHOICES = ("none", "all", "tensorboard", "jsonl", "wandb", "mlflow")


# ----------------------------------------------------------------------------- console


def _has_length(obj: Any) -> bool:
    try:
        return len(obj) is not None
    except (TypeError, NotImplementedError, AttributeError):
        return False


def _format_logs(logs: dict, max_str_len: int) -> dict:
    """Floats to 4 significant digits, long strings elided, `total_flos` dropped (as HF prints)."""
    shown: dict[str, Any] = {}
    for key, value in logs.items():
        if key == "total_flos":
            continue
        if isinstance(value, str) and len(value) > max_str_len:
            value = f"[String too long to display, length: {len(value)} > {max_str_len}.]"
        elif isinstance(value, float):
            value = f"{value:.4g}"
        shown[key] = value
    return shown


class ProgressCallback(TrainerCallback):
    """A tqdm bar over `max_steps` on world process zero; off when `args.disable_tqdm`.

    Training logs (those with `loss`) go into the bar's postfix -- loss, learning rate and
    tokens/s since the previous log -- instead of a printed line per log; tqdm shows the ETA.
    Every other log (eval metrics, the end-of-training summary) is printed above the bar.
    """

    def __init__(self, max_str_len: int = 100) -> None:
        self.training_bar: Any = None
        self.prediction_bar: Any = None
        self.max_str_len = max_str_len
        self.current_step = 0
        self._last_tokens = 0
        self._last_time = 0.0

    @staticmethod
    def _enabled(args: Any, state: TrainerState) -> bool:
        return state.is_world_process_zero and not getattr(args, "disable_tqdm", False)

    def on_train_begin(self, args, state, control, **kwargs):
        from tqdm.auto import tqdm  # lazy: only the console reporter needs it

        if self._enabled(args, state):
            self.training_bar = tqdm(total=state.max_steps, dynamic_ncols=True, initial=state.global_step)
        self.current_step = state.global_step
        self._last_tokens, self._last_time = state.num_input_tokens_seen, time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.training_bar is not None:
            self.training_bar.update(state.global_step - self.current_step)
        self.current_step = state.global_step

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if not self._enabled(args, state) or not _has_length(eval_dataloader):
            return
        from tqdm.auto import tqdm

        if self.prediction_bar is None:
            leave = self.training_bar is None
            self.prediction_bar = tqdm(total=len(eval_dataloader), leave=leave, dynamic_ncols=True)
        self.prediction_bar.update(1)

    def _close_prediction_bar(self) -> None:
        if self.prediction_bar is not None:
            self.prediction_bar.close()
        self.prediction_bar = None

    def on_evaluate(self, args, state, control, **kwargs):
        self._close_prediction_bar()

    def on_predict(self, args, state, control, metrics=None, **kwargs):
        self._close_prediction_bar()

    def _postfix(self, logs: dict, state: TrainerState) -> dict[str, str]:
        postfix = {"loss": f"{logs['loss']:.4g}"}
        if "learning_rate" in logs:
            postfix["lr"] = f"{logs['learning_rate']:.3g}"
        now, tokens = time.perf_counter(), state.num_input_tokens_seen
        if "tokens_per_second" in logs:  # measured by the loop over exactly the logged window
            postfix["tok/s"] = f"{logs['tokens_per_second']:,.0f}"
        elif tokens > self._last_tokens and now > self._last_time:
            postfix["tok/s"] = f"{(tokens - self._last_tokens) / (now - self._last_time):,.0f}"
        self._last_tokens, self._last_time = tokens, now
        return postfix

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.training_bar is None or not logs:
            return
        if isinstance(logs.get("loss"), (int, float)):
            self.training_bar.set_postfix(self._postfix(logs, state), refresh=True)
        else:
            self.training_bar.write(str(_format_logs(logs, self.max_str_len)))

    def on_train_end(self, args, state, control, **kwargs):
        if self.training_bar is not None:
            self.training_bar.close()
        self.training_bar = None


class PrinterCallback(TrainerCallback):
    """Prints every log dict on local process zero (used instead of the bar when tqdm is off)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        # HF's pops total_flos from the logs themselves, which are the metrics train() returns (its `log`
        # writes into the caller's dict), so train_results.json lost total_flos with the bar off only.
        if state.is_local_process_zero:
            if logs is not None:
                logs = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in logs.items() if k != "total_flos"}
            print(logs)


# ----------------------------------------------------------------------------- TensorBoard

def rewrite_logs(logs: dict[str, Any]) -> dict[str, Any]:
    """HF's tag layout: `eval_loss` -> `eval/loss`, `test_x` -> `test/x`, else `train/<key>`."""
    out = {}
    for key, value in logs.items():
        for prefix in ("eval", "test"):
            if key.startswith(prefix + "_"):
                out[f"{prefix}/{key[len(prefix) + 1:]}"] = value
                break
        else:
            out[f"train/{key}"] = value
    return out


def _as_float(value: Any) -> float | None:
    """Numbers, numpy scalars and 0-d arrays become floats; anything else is not a scalar."""
    if isinstance(value, numbers.Real):
        return float(value)
    if getattr(value, "shape", None) == ():
        return float(value)
    return None


def _numeric(logs: dict[str, Any]) -> dict[str, float]:
    return {k: f for k, v in logs.items() if (f := _as_float(v)) is not None}


class TensorBoardCallback(TrainerCallback):
    """Writes every numeric log as a TensorBoard scalar at `state.global_step` (process zero).

    `log_dir` defaults to the run's logging directory (`args.logging_dir`, else `output_dir/runs`,
    as HF's callback does when added by hand). Non-numeric logs are skipped (HF writes them as
    text summaries, which need the tensor protobuf; not worth it for log lines).
    """

    def __init__(self, log_dir: str | None = None) -> None:
        self.log_dir = log_dir
        self.writer: EventFileWriter | None = None

    def _ensure_writer(self, args: Any) -> EventFileWriter:
        if self.writer is None:
            log_dir = self.log_dir or getattr(args, "resolved_logging_dir", None) or getattr(args, "logging_dir", None)
            self.writer = EventFileWriter(log_dir or "runs")
        return self.writer

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self._ensure_writer(args)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self._ensure_writer(args).add_scalars(_numeric(rewrite_logs(logs)), state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self) -> None:
        """Close the event file (a later log opens a new one); `Trainer.end()` calls it too."""
        if self.writer is not None:
            self.writer.close()
        self.writer = None


# ----------------------------------------------------------------------------- JSONL


class JsonlLoggerCallback(TrainerCallback):
    """Appends one JSON object per log call to `path`: the logs plus `epoch` and `step`.

    Each line equals the matching `state.log_history` entry, so a crashed run leaves a
    readable history; the file is appended to, so a resumed run continues it.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._file: Any = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or logs is None:
            return
        if self._file is None:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
        record = {**logs, "epoch": logs.get("epoch", state.epoch), "step": state.global_step}
        self._file.write(json.dumps(record, default=_json_default) + "\n")
        self._file.flush()

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self) -> None:
        """Close the file (a later log reopens it in append mode); `Trainer.end()` calls it too."""
        if self._file is not None:
            self._file.close()
        self._file = None


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """The records a `JsonlLoggerCallback` wrote, in order."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------- services


def _import_or_hint(module: str, package: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"report_to={module!r} needs {package}: `pip install {package}`") from err


def _args_dict(args: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(args) and not isinstance(args, type):
        return dataclasses.asdict(args)
    return dict(vars(args))


class WandbCallback(TrainerCallback):
    """Logs to Weights & Biases (`pip install wandb`); project from `WANDB_PROJECT`.

    Reuses a run the user already started with `wandb.init`, as HF does.
    """

    def __init__(self) -> None:
        self._wandb = _import_or_hint("wandb", "wandb")

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or self._wandb.run is not None:
            return
        self._wandb.init(
            project=os.getenv("WANDB_PROJECT", "jtrain"),
            name=getattr(args, "run_name", None),
            config=json.loads(json.dumps(_args_dict(args), default=str)),
        )

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            metrics = _numeric(rewrite_logs(logs))
            self._wandb.log({**metrics, "train/global_step": state.global_step})


class MLflowCallback(TrainerCallback):
    """Logs params and metrics to MLflow (`pip install mlflow`); tracking URI from the env.

    Ends only the run it started, so a user's surrounding `mlflow.start_run()` stays open.
    """

    MAX_PARAM_VAL_LENGTH = 250  # MLflow rejects longer parameter values

    def __init__(self) -> None:
        self._mlflow = _import_or_hint("mlflow", "mlflow")
        self._started_run = False

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        if self._mlflow.active_run() is None:
            self._mlflow.start_run(run_name=getattr(args, "run_name", None))
            self._started_run = True
        params = {k: str(v)[: self.MAX_PARAM_VAL_LENGTH] for k, v in _args_dict(args).items()}
        self._mlflow.log_params(params)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            metrics = {k.replace("/", "_"): v for k, v in _numeric(logs).items()}
            self._mlflow.log_metrics(metrics, step=state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if self._started_run and self._mlflow.active_run() is not None:
            self._mlflow.end_run()
        self._started_run = False


# ----------------------------------------------------------------------------- report_to


def _requested(report_to: str | list[str] | None) -> list[str]:
    if report_to is None:
        return []
    names = report_to.split(",") if isinstance(report_to, str) else list(report_to)
    names = [n.strip().lower() for n in names if n.strip()]
    unknown = [n for n in names if n not in REPORT_TO_CHOICES]
    if unknown:
        raise ValueError(f"unknown report_to {unknown}; valid: {', '.join(REPORT_TO_CHOICES)}")
    if ("none" in names or "all" in names) and len(names) > 1:
        raise ValueError(f"report_to 'none' / 'all' cannot be combined with others, got {names}")
    if names == ["all"]:
        optional = [n for n in ("wandb", "mlflow") if importlib.util.find_spec(n) is not None]
        return ["tensorboard", "jsonl", *optional]
    return [n for n in dict.fromkeys(names) if n != "none"]


def callbacks_for_report_to(report_to: str | list[str] | None, logging_dir: str) -> list[TrainerCallback]:
    """HF's `report_to` -> reporter callbacks.

    "all" means tensorboard + jsonl (always available) + wandb / mlflow when installed.
    JSONL goes to `<logging_dir>/logs.jsonl`, TensorBoard events into `logging_dir`.

    Example:
        >>> [type(c).__name__ for c in callbacks_for_report_to("tensorboard,jsonl", "runs/x")]
        ['TensorBoardCallback', 'JsonlLoggerCallback']
    """
    factories = {
        "tensorboard": lambda: TensorBoardCallback(logging_dir),
        "jsonl": lambda: JsonlLoggerCallback(os.path.join(logging_dir, "logs.jsonl")),
        "wandb": WandbCallback,
        "mlflow": MLflowCallback,
    }
    return [factories[name]() for name in _requested(report_to)]
