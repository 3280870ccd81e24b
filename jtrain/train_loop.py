"""The host loop: dispatch update N, then read update N-1's metrics, then run callbacks.

Logging, evaluation and saving are decided by `on_step_end` right after dispatch (they depend
only on the step count). A log due at step N is emitted once N's metrics arrive, which is
after N+1 has been dispatched, so logging never makes the device wait; evaluation and saving
need step N's state, so they first drain the pending metrics.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp

from jtrain.accounting import StepPlan
from jtrain.callbacks import ExportableState
from jtrain.callbacks import _export_callbacks as export_callbacks
from jtrain.checkpoint import CheckpointWriter
from jtrain.data.loader import HostLoader, LoaderPosition
from jtrain.errors import ConfigError
from jtrain.flops import device_peak_flops, mfu
from jtrain.losses import routing_logs
from jtrain.memory import tracker_for
from jtrain.models.wrapper import has_hf_format
from jtrain.profiling import StepProfiler
from jtrain.signals import StopOnSignal
from jtrain.trainer_helpers import non_embedding_parameter_count
from jtrain.version import __version__

logger = logging.getLogger(__name__)


@dataclass
class _Window:
    """Host-side running sums between two logs (and over the whole run)."""

    loss_sum: float = 0.0
    loss_steps: int = 0  # updates whose loss is in loss_sum (see `add`)
    tokens: float = 0.0
    total_loss: float = 0.0
    total_loss_steps: int = 0
    started: float = field(default_factory=time.perf_counter)
    data_wait: float = 0.0
    # Whole-run seconds by where the host spent them (see `_step_time_metrics`).
    total_data_wait: float = 0.0
    total_device: float = 0.0
    total_outside_steps: float = 0.0  # evaluation and checkpointing, excluded from step time
    overflows: int = 0  # fp16 updates skipped by loss scaling since the last log

    def add(self, m: dict, tokens: float, nan_inf_filter: bool = True) -> None:
        """Count update `m` and its `tokens` (for the window's tokens per second).

        HF's `logging_nan_inf_filter` (default on): a non-finite loss (an update skipped under
        `nonfinite_policy: skip`) is left out of the logged mean and of `train_loss`, rather than
        counted as 0; off, it goes in, and the logged mean is nan or inf as in HF."""
        self.overflows += int(m.get("overflow", 0))
        if math.isfinite(m["loss"]) or not nan_inf_filter:
            self.loss_sum += m["loss"]
            self.total_loss += m["loss"]
            self.loss_steps += 1
            self.total_loss_steps += 1
        self.tokens += tokens

    def flush(self, m: dict) -> dict:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        logs = {
            "loss": round(self.loss_sum / max(self.loss_steps, 1), 6),
            "grad_norm": float(m["grad_norm"]),
            "learning_rate": float(m["learning_rate"]),
            "tokens_per_second": round(self.tokens / elapsed, 1),
            "data_wait_fraction": round(self.data_wait / elapsed, 4),
        }
        if m.get("skipped"):
            logs["skipped_updates"] = int(m["skipped"])
        logs.update(routing_logs(m))  # MoE: the last update's routing fractions ({} for dense models)
        if "loss_scale" in m:  # fp16: the scale in use and the overflow skips since the last log
            logs["loss_scale"] = float(m["loss_scale"])
            logs["loss_scale_overflows"] = self.overflows
            self.overflows = 0
        self.loss_sum, self.loss_steps, self.tokens, self.data_wait = 0.0, 0, 0.0, 0.0
        self.started = time.perf_counter()
        return logs


def host_learning_rate(trainer: Any, update: int) -> float | None:
    """The rate update number `update` (0-based) used, as the Python float HF's Trainer logs: a metric-driven
    schedule's host controller holds it (torch's lr), HF's schedules give it in float64 (`HFSchedule.host`);
    None for a schedule of the user's own, whose value the step computes (float32)."""
    if trainer.lr_controller is not None:
        return float(trainer.lr_controller.lr)
    host = getattr(trainer.lr_scheduler, "host", None)
    return None if host is None else host(update)


class _Run:
    """One call of `Trainer.train()`: the loop state that is not in TrainerState."""

    def __init__(self, trainer: Any, loader: HostLoader, plan: StepPlan, position: LoaderPosition,
                 stop: StopOnSignal | None = None):
        self.t, self.loader, self.plan, self.position = trainer, loader, plan, position
        self.stop = stop or StopOnSignal(signals=())
        self.last_saved: tuple[int, str] | None = None  # (step, path) of the newest checkpoint written
        self.window = _Window()
        self.pending: tuple[int, float, dict, bool] | None = None  # (step, epoch, device metrics, log due)
        self.writer = CheckpointWriter(trainer.args.output_dir, trainer.args.save_total_limit)
        self.accum = trainer.args.gradient_accumulation_steps
        self.tokens_seen = 0
        # Counted before the loop (it traces the model's shapes once), not at its first update.
        self.flos_per_token = 6.0 * non_embedding_parameter_count(trainer)
        self.profiler = StepProfiler.from_args(trainer.args)
        self.profiler.warn_if_outside(trainer.state.global_step + 1, plan.max_steps)

    # -- metrics ----------------------------------------------------------------------------
    def drain(self) -> None:
        """Fetch the pending step's metrics (one transfer) and fire the in-step events for it."""
        if self.pending is None:
            return
        step, epoch, device_metrics, log_due = self.pending
        self.pending = None
        waited = time.perf_counter()
        m = {k: v.item() for k, v in jax.device_get(device_metrics).items()}  # blocks until the step is done
        self.window.total_device += time.perf_counter() - waited
        m["skipped"] = int(jax.device_get(self.t.train_state.skipped)) if m["nonfinite"] else 0
        self.t._check_finite(m, step)
        tokens = _counted_tokens(m, self.t.args.include_num_input_tokens_seen)
        self.window.add(m, tokens, self.t.args.logging_nan_inf_filter)
        self.tokens_seen += int(tokens)
        t, h = self.t, self.t.callback_handler
        for _ in range(self.accum - 1):
            t.control = h.on_substep_end(t.args, t.state, t.control, metrics=m, step=step)
        t.control = h.on_pre_optimizer_step(t.args, t.state, t.control, metrics=m, step=step)
        t.control = h.on_optimizer_step(t.args, t.state, t.control, metrics=m, step=step)
        # HF's total_flos: 6 x non-embedding params x input tokens, in TrainerState (a resumed run continues it)
        t.state.total_flos += self.flos_per_token * float(m.get("input_tokens", 0.0))
        if t.args.include_num_input_tokens_seen != "no":  # in TrainerState, so a resumed run continues the count
            t.state.num_input_tokens_seen += int(tokens)
        if log_due:
            self.log(m, step, epoch)
        self.last_metrics = m

    def log(self, m: dict, step: int, epoch: float) -> None:
        """Log the update `step` (drained one update late): its own step and epoch, not the current ones."""
        logs, state = self.window.flush(m), self.t.state
        exact = host_learning_rate(self.t, step - 1)
        if exact is not None:
            logs["learning_rate"] = exact
        saved = state.global_step, state.epoch
        state.global_step, state.epoch = step, epoch
        self.t.log(logs)
        state.global_step, state.epoch = saved

    # -- one update -------------------------------------------------------------------------
    def update(self, batch: Any) -> None:
        t = self.t
        t.control = t.callback_handler.on_step_begin(t.args, t.state, t.control)
        self.profiler.before_update(t.state.global_step + 1)
        dispatched = time.perf_counter()
        with self.profiler.annotate(t.state.global_step + 1):
            t.train_state, metrics = t.steps.train_step(t.train_state, batch)
        self.window.total_device += time.perf_counter() - dispatched
        t.state.global_step += 1
        self.profiler.after_update(t.state.global_step, t.train_state)
        t.state.epoch = self.position.epoch + (self.position.batch_index + 1) / self.plan.updates_per_epoch
        self.position = LoaderPosition(self.position.epoch, self.position.batch_index + 1)
        self.drain()
        t.control = t.callback_handler.on_step_end(t.args, t.state, t.control)
        if self.stop.requested:  # SIGTERM: this update is the last; checkpoint it (jtrain.signals)
            t.control.should_save = t.control.should_training_stop = True
        self.pending = (t.state.global_step, t.state.epoch, metrics, t.control.should_log)
        t.control.should_log = False
        self.maybe_evaluate_and_save()

    def maybe_evaluate_and_save(self) -> None:
        t = self.t
        if not (t.control.should_evaluate or t.control.should_save):
            return
        self.drain()
        started = time.perf_counter()
        try:
            self._evaluate_and_save()
        finally:
            self.window.total_outside_steps += time.perf_counter() - started

    def _evaluate_and_save(self) -> None:
        t = self.t
        metrics = None
        if t.control.should_evaluate:
            t.control.should_evaluate = False
            metrics = self.evaluate()
        if t.args.save_strategy == "best" and metrics is not None and self.is_new_best(metrics):
            t.control.should_save = True
        if t.control.should_save:
            t.control.should_save = False
            self.save()

    def evaluate(self) -> dict:
        t = self.t
        metrics = t.evaluate(ignore_keys=getattr(t, "_ignore_keys_for_eval", None))
        t._report_to_hp_search(metrics)
        if t.lr_controller is not None and t.args.metric_for_best_model:
            factor = t.lr_controller.step(best_metric_value(metrics, t.args.metric_for_best_model))
            # Same sharding as the state's own scalar, or the step would recompile for a new input layout.
            lr_factor = jax.device_put(jnp.asarray(factor, jnp.float32), t.steps.state_sharding.lr_factor)
            t.train_state = t.train_state.replace(lr_factor=lr_factor)
        self.update_best(metrics)
        return metrics

    # -- best model and checkpoints ---------------------------------------------------------
    def is_new_best(self, metrics: dict) -> bool:
        return getattr(self, "_new_best", False)

    def update_best(self, metrics: dict) -> None:
        t, name = self.t, self.t.args.metric_for_best_model
        self._new_best = False
        if not name:
            return
        value = best_metric_value(metrics, name)
        better = (lambda a, b: a > b) if _greater_is_better(t.args) else (lambda a, b: a < b)
        if t.state.best_metric is None or better(value, t.state.best_metric):
            t.state.best_metric, t.state.best_global_step, self._new_best = value, t.state.global_step, True

    def save(self) -> None:
        t = self.t
        self.drain()
        sidecars = {
            "training_args.json": t.args.to_dict(),
            "loader_state.json": {**self.position.to_dict(), **self.controller_state()},
            "jtrain_meta.json": {"jtrain_version": __version__,
                                 "model_type": getattr(t.model.config, "model_type", None),
                                 "model_config": _config_dict(t.model.config), "task": t.model.task,
                                 "params_only": t.args.save_only_model},
        }
        stateful = [cb for cb in t.callback_handler.callbacks if isinstance(cb, ExportableState)]
        t.state.stateful_callbacks = {**export_callbacks(stateful), "TrainerControl": t.control.state()}
        path = os.path.join(t.args.output_dir, f"checkpoint-{t.state.global_step}")
        if t.state.best_global_step == t.state.global_step:
            t.state.best_model_checkpoint = path  # as HF: only a checkpoint that exists can be the best
        snapshot = t.trainer_state_snapshot()
        best = t.state.best_model_checkpoint
        model_files = t.save_model if has_hf_format(t.model) else None  # HF's checkpoints hold the model too
        self.writer.save(t.train_state, t.state.global_step, sidecars, snapshot.save_to_json, best,
                         params_only=t.args.save_only_model, model_files=model_files)
        self.last_saved = (t.state.global_step, path)
        t.control = t.callback_handler.on_save(t.args, t.state, t.control)

    def controller_state(self) -> dict:
        c = self.t.lr_controller
        return {"lr_controller": c.state_dict()} if c is not None else {}


def _metric_key(name: str) -> str:
    return name if name.startswith("eval_") else f"eval_{name}"


def best_metric_value(metrics: dict, name: str) -> float:
    """`metric_for_best_model`'s value in an evaluation's metrics. Missing, it is an error, as in HF:
    skipping it would leave no best checkpoint (`load_best_model_at_end` keeping the last weights,
    `save_total_limit` free to delete the best) without a word."""
    key = _metric_key(name)
    if key not in metrics:
        available = sorted(k for k in metrics if k.startswith("eval_") and not k.endswith(("_runtime", "_per_second")))
        raise ConfigError(f"metric_for_best_model is {name!r}, but the evaluation reported no {key!r} (it reported "
                          f"{available}): return {key.removeprefix('eval_')!r} from compute_metrics, evaluate on "
                          "labeled data (no labels, no eval_loss), or set metric_for_best_model to one of those")
    return float(metrics[key])


def _greater_is_better(args: Any) -> bool:
    if args.greater_is_better is not None:
        return bool(args.greater_is_better)
    return not (args.metric_for_best_model or "loss").endswith("loss")


def _config_dict(config: Any) -> dict:
    import dataclasses

    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)


def run_training(trainer: Any, loader: HostLoader, plan: StepPlan, position: LoaderPosition) -> Any:
    """Run the epochs from `position` until `plan.max_steps` or a stop; return a TrainOutput.

    On SIGTERM the update in flight finishes, a checkpoint is written and completed, and
    `TrainingPreempted` (exit code 143) is raised after `on_train_end` (see jtrain.signals).
    On an error (a non-finite loss) the checkpoint in flight is completed before the error
    propagates, so the last good checkpoint is never left half-written.
    """
    from jtrain.trainer import TrainOutput

    t, args = trainer, trainer.args
    t._train_calls += 1
    t.state.train_batch_size = plan.global_batch_size
    t.state.compute_steps(args, plan.max_steps)
    t.state.init_training_references(t, plan.max_steps, plan.num_train_epochs, getattr(t, "_trial_params", None))
    _check_best_model_args(args, t.state)
    start, start_step = time.perf_counter(), t.state.global_step
    t._initial_num_input_tokens_seen = t.state.num_input_tokens_seen  # for log(..., start_time), as HF keeps it
    with StopOnSignal() as stop:
        run = _Run(t, loader, plan, position, stop)
        try:
            _loop(run)
        except BaseException:
            run.writer.wait(raise_errors=False)
            raise
        finally:
            run.profiler.close()
        metrics = _speed_metrics(start, t.state.global_step - start_step, plan, run)
        metrics.update(_step_time_metrics(t, run, t.state.global_step - start_step, metrics["train_runtime"]))
        metrics.update(_compile_metrics(t))
        metrics.update(getattr(t, "_init_memory_metrics", None) or {})
        metrics.update(tracker_for(t).stop("train"))
        if args.load_best_model_at_end and t.state.best_model_checkpoint and not stop.requested:
            _load_best(t)
        train_loss = run.window.total_loss / max(run.window.total_loss_steps, 1)
        metrics["train_loss"] = train_loss
        if getattr(t, "_resume_seconds", None) is not None:
            metrics["resume_seconds"] = round(t._resume_seconds, 4)
        t.log(metrics)  # before on_train_end, as HF does, so loggers still hold their files open
        t.control = t.callback_handler.on_train_end(args, t.state, t.control)
        stop.raise_if_requested(t.state.global_step, run.last_saved[1] if run.last_saved else None)
    return TrainOutput(t.state.global_step, train_loss, metrics)


def _loop(run: _Run) -> None:
    """The epochs, then the final save (also the one a stop signal asks for), completed on disk."""
    t, args = run.t, run.t.args
    t.control = t.callback_handler.on_train_begin(args, t.state, t.control)
    started = time.perf_counter()
    if args.eval_on_start and t.eval_dataset is not None:
        run.evaluate()
    run.window.total_outside_steps += time.perf_counter() - started
    while t.state.global_step < run.plan.max_steps and not t.control.should_training_stop:
        run_epoch(run)
    run.drain()
    started = time.perf_counter()
    saved_now = run.last_saved is not None and run.last_saved[0] == t.state.global_step
    if t.control.should_save or (run.stop.requested and not saved_now):
        t.control.should_save = False
        run.save()
    run.writer.wait()
    run.window.total_outside_steps += time.perf_counter() - started


def _check_best_model_args(args: Any, state: Any) -> None:
    """As HF: the best model can only be reloaded if every evaluation is followed by a save. The
    strategies and whole numbers of updates were checked with the arguments; ratios resolve here."""
    if not args.load_best_model_at_end or args.save_strategy == "best":
        return
    if args.save_strategy == "steps" and state.save_steps % state.eval_steps:
        raise ConfigError(f"load_best_model_at_end needs save_steps ({state.save_steps}) to be a multiple of "
                          f"eval_steps ({state.eval_steps})")


def run_epoch(run: _Run) -> None:
    t, args = run.t, run.t.args
    if run.position.batch_index >= run.plan.updates_per_epoch:
        run.position = LoaderPosition(run.position.epoch + 1, 0)
    t.control = t.callback_handler.on_epoch_begin(args, t.state, t.control)
    waited = time.perf_counter()
    for batch in run.loader.iterate(run.position.epoch, run.position.batch_index):
        run.window.data_wait += time.perf_counter() - waited
        run.window.total_data_wait += time.perf_counter() - waited
        run.update(batch)
        if t.control.should_epoch_stop or t.control.should_training_stop or t.state.global_step >= run.plan.max_steps:
            break
        waited = time.perf_counter()
    run.drain()
    if run.position.batch_index >= run.plan.updates_per_epoch:
        t.control = t.callback_handler.on_epoch_end(args, t.state, t.control)
        if t.control.should_log and hasattr(run, "last_metrics"):
            t.control.should_log = False
            run.log(run.last_metrics, t.state.global_step, t.state.epoch)
        run.maybe_evaluate_and_save()


def _counted_tokens(m: dict, counting: str) -> float:
    """An update's input tokens as HF's `include_num_input_tokens_seen` counts them: all of them
    under "all", the non-padding ones otherwise (so throughput means real tokens by default). A batch
    without `input_ids` (features, pixels) counts its label-bearing items instead."""
    return m.get("input_tokens" if counting == "all" else "non_padding_tokens", m["num_tokens"])


def _speed_metrics(start: float, steps: int, plan: StepPlan, run: _Run) -> dict:
    """HF's speed metrics for the updates of this call. Samples as HF 5 counts them: an epoch-based
    run of a sized dataset counts rows x `num_train_epochs` over the whole schedule (a partial last
    batch counts its real rows), and this call's share of the schedule's updates."""
    runtime = max(time.perf_counter() - start, 1e-9)
    args = run.t.args
    if args.max_steps <= 0 and plan.num_rows is not None:
        samples = plan.num_rows * args.num_train_epochs * steps / max(plan.max_steps, 1)
    else:
        samples = steps * plan.global_batch_size
    return {
        "train_runtime": round(runtime, 4),
        "train_samples_per_second": round(samples / runtime, 3),
        "train_steps_per_second": round(steps / runtime, 3),
        "train_tokens_per_second": round(run.tokens_seen / runtime, 1),
        "total_flos": float(run.t.state.total_flos),  # HF: the whole run's, a resumed one included
    }


def _step_time_metrics(t: Any, run: _Run, steps: int, runtime: float) -> dict:
    """Where a training step's time goes, and MFU (definitions in docs/performance.md).

    Step time is the run's wall time minus evaluation and checkpointing, per update. It splits
    into data wait (the host waiting for the loader), device (dispatching the step and waiting
    for its results: the device was busy) and host (callbacks, logging, bookkeeping: the rest).
    MFU is the step's model FLOPs per device (counted on its jaxpr: jtrain.flop_count) over the
    step time and the device's peak in the compute dtype (jtrain.flops.device_peak_flops).
    """
    if steps <= 0:
        return {}
    w = run.window
    busy = max(runtime - w.total_outside_steps, 1e-9)
    step_seconds = busy / steps
    data, device = min(w.total_data_wait / busy, 1.0), min(w.total_device / busy, 1.0)
    out = {"train_step_seconds": round(step_seconds, 6), "train_data_wait_fraction": round(data, 4),
           "train_device_fraction": round(device, 4), "train_host_fraction": round(max(0.0, 1.0 - data - device), 4)}
    plan = getattr(t, "_step_plan", None)
    flops = plan.flops if plan is not None else None
    if flops:
        precision = t.steps.precision
        peak, source = device_peak_flops(precision.compute_dtype, matmul_precision=precision.matmul_precision)
        out["train_flops_per_step"] = flops
        value = mfu(flops, step_seconds, peak)
        if value is not None:
            out["train_mfu"] = round(value, 6)
            logger.info("MFU %.4f: %.3g FLOPs per step per device, %.4fs per step, peak %.3g FLOP/s (%s)",
                        value, flops, step_seconds, peak, source)
    return out


def _compile_metrics(t: Any) -> dict:
    """How often the compiled steps were traced (each trace is one compilation)."""
    counts = t.steps.compile_log.counts
    return {f"{name}_compilations": counts[name] for name in ("train", "eval", "predict") if name in counts}


def _load_best(trainer: Any) -> None:
    """HF's `load_best_model_at_end`: only the params come back; the step and optimizer stay."""
    from jtrain.checkpoint import restore_state

    path, state = trainer.state.best_model_checkpoint, trainer.state
    logger.info("loading the best model from %s (%s = %s at step %s)", path, trainer.args.metric_for_best_model,
                state.best_metric, state.best_global_step)
    trainer.train_state = restore_state(path, trainer.train_state, params_only=True)
