"""`Trainer.hyperparameter_search`: HF's API and meaning, over optuna.

Each trial builds a fresh Trainer of the same class from the arguments the search Trainer was
built with: the model comes from `model_init(trial)`, the TrainingArguments get the trial's
values, and checkpoints go to `{output_dir}/run-{trial.number}` (or `hp_name(trial)`), as in
HF. Only fresh Trainers are used because a jtrain Trainer holds compiled steps and sharded
state built for one set of arguments; nothing of one trial can leak into the next.

As in HF, every evaluation during training reports the objective to the trial (optuna's
pruners read it), the last one is the trial's result, and a trial that never evaluated is
evaluated once at the end. A trial the pruner stops ends its training at that evaluation
(callbacks see `on_train_end`) and is recorded as pruned.

In a job of several JAX processes every process calls `hyperparameter_search` (a trial's
Trainer is collective). Process 0 holds the optuna study: it samples each trial, shares the
values, run name and every pruning decision (`jtrain.distributed.broadcast_object`), and shares
the best run at the end; the others train the same trials in step (HF's DDP search does the
same with torch.distributed).
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import logging
import os
from typing import Any, Callable, NamedTuple

import jax

from jtrain.distributed import broadcast_object
from jtrain.errors import ConfigError, JtrainError

logger = logging.getLogger(__name__)

# optuna.create_study / Study.optimize keywords HF forwards (n_jobs is refused: one trial holds the devices).
_STUDY_KWARGS = ("sampler", "pruner", "storage", "study_name", "load_if_exists")
_OPTIMIZE_KWARGS = ("timeout", "catch", "callbacks", "gc_after_trial", "show_progress_bar")


class BestRun(NamedTuple):
    """HF's `BestRun`: the trial's id, its objective (a list for several directions) and values."""

    run_id: str
    objective: float | list[float]
    hyperparameters: dict[str, Any]
    run_summary: Any = None


def default_hp_space_optuna(trial: Any) -> dict[str, Any]:
    """HF's default search space for optuna."""
    return {
        "learning_rate": trial.suggest_float("learning_rate", 1e-6, 1e-4, log=True),
        "num_train_epochs": trial.suggest_int("num_train_epochs", 1, 5),
        "seed": trial.suggest_int("seed", 1, 40),
        "per_device_train_batch_size": trial.suggest_categorical("per_device_train_batch_size", [4, 8, 16, 32, 64]),
    }


def default_compute_objective(metrics: dict[str, float]) -> float:
    """HF's default: the evaluation loss, or when other metrics exist (from compute_metrics), their
    sum; epoch and speed metrics never count."""
    metrics = copy.deepcopy(metrics)
    loss = metrics.pop("eval_loss", None)
    metrics.pop("epoch", None)
    for key in [k for k in metrics if k.endswith(("_runtime", "_per_second", "_compilation_time"))]:
        metrics.pop(key)
    return loss if len(metrics) == 0 else sum(metrics.values())


def _import_optuna() -> Any:
    try:
        import optuna
    except ImportError as err:
        raise ConfigError("hyperparameter_search uses optuna, which is not installed: "
                          "pip install 'jtrain[hpsearch]' (or pip install optuna)") from err
    return optuna


def _check(trainer: Any, backend: Any, kwargs: dict) -> None:
    name = getattr(backend, "value", backend)
    if name not in (None, "optuna"):
        raise ConfigError(f"hyperparameter_search backend {name!r} is not supported by jtrain; use backend='optuna' "
                          "(or leave it unset)")
    if trainer.model_init is None:
        raise ConfigError("hyperparameter_search builds a fresh model for every trial: pass model_init to the "
                          "Trainer (a function returning a jtrain Model, or (Model, params)) instead of model")
    if trainer.eval_dataset is None:
        raise ConfigError("hyperparameter_search ranks trials by evaluation metrics: pass an eval_dataset")
    if kwargs.get("n_jobs", 1) != 1:
        raise ConfigError("hyperparameter_search: n_jobs must be 1; one trial at a time uses all devices")
    unknown = sorted(set(kwargs) - set(_STUDY_KWARGS) - set(_OPTIMIZE_KWARGS) - {"n_jobs"})
    if unknown:
        raise ConfigError(f"hyperparameter_search got unknown keyword arguments {unknown}; optuna's accepted ones "
                          f"are {sorted(_STUDY_KWARGS + _OPTIMIZE_KWARGS)}")


def _trial_arguments(args: Any, values: dict[str, Any], output_dir: str) -> tuple[Any, dict]:
    """TrainingArguments with the trial's values (cast to each field's type, as HF casts them).

    Keys that are not TrainingArguments fields are left to `model_init(trial)`, which reads
    them from the trial (HF warns and skips them too)."""
    fields = {f.name for f in dataclasses.fields(args)}
    changes: dict[str, Any] = {}
    for key, value in values.items():
        if key not in fields:
            logger.info("hyperparameter %r is not a TrainingArguments field; it is left to model_init(trial)", key)
            continue
        old = getattr(args, key)
        changes[key] = type(old)(value) if old is not None and not isinstance(old, (list, dict, tuple)) else value
    try:
        return args.replace(**changes, output_dir=output_dir), changes
    except (TypeError, ValueError) as err:
        raise ConfigError(f"hyperparameter_search: the trial's values {changes} are not valid TrainingArguments: "
                          f"{err}") from err


class _TrialReporter:
    """Reports each evaluation's objective to the optuna trial; remembers the last one."""

    def __init__(self, trial: Any, compute_objective: Callable[[dict], Any], multi: bool):
        self.trial, self.compute_objective, self.multi = trial, compute_objective, multi
        self.objective: Any = None
        self.pruned = False

    def __call__(self, trainer: Any, metrics: dict) -> None:
        derived = getattr(trainer, "_derived_eval_keys", ())
        self.objective = self.compute_objective({k: v for k, v in metrics.items() if k not in derived})
        if self.multi:  # optuna cannot prune multi-objective trials
            return
        prune = None
        if jax.process_index() == 0:  # the study lives on process 0; the others follow its decision
            self.trial.report(float(self.objective), trainer.state.global_step)
            prune = bool(self.trial.should_prune())
        if broadcast_object(prune):
            self.pruned = True
            trainer.control.should_training_stop = True


def hyperparameter_search(
    trainer: Any,
    hp_space: Callable[[Any], dict[str, Any]] | None = None,
    compute_objective: Callable[[dict[str, float]], Any] | None = None,
    n_trials: int = 20,
    direction: str | list[str] = "minimize",
    backend: Any = None,
    hp_name: Callable[[Any], str] | None = None,
    **kwargs: Any,
) -> BestRun | list[BestRun]:
    """Search hyperparameters with optuna; returns the best run (a list of Pareto-best runs for
    several directions). Example::

        trainer = Trainer(model_init=lambda trial: create_model("llama", cfg), args=args,
                          train_dataset=train, eval_dataset=val)
        best = trainer.hyperparameter_search(n_trials=10, direction="minimize")
        print(best.hyperparameters)
    """
    _check(trainer, backend, kwargs)
    optuna = _import_optuna()
    hp_space = hp_space or default_hp_space_optuna
    compute_objective = compute_objective or default_compute_objective
    multi = isinstance(direction, (list, tuple))
    if jax.process_index() != 0:
        return _follow(trainer, compute_objective, multi, hp_name)
    study_kwargs = {k: kwargs[k] for k in _STUDY_KWARGS if k in kwargs}
    study = optuna.create_study(**({"directions": list(direction)} if multi else {"direction": direction}),
                                **study_kwargs)

    def objective(trial: Any) -> Any:
        values = hp_space(trial)
        run_name = hp_name(trial) if hp_name is not None else f"run-{trial.number}"
        broadcast_object({"number": trial.number, "params": dict(trial.params), "values": values,
                          "run_name": run_name})
        result, pruned = _run_trial(trainer, trial, values, run_name, compute_objective, multi, hp_name)
        if pruned:
            raise optuna.TrialPruned(f"pruned at {pruned}")
        return result

    try:
        study.optimize(objective, n_trials=n_trials, **{k: kwargs[k] for k in _OPTIMIZE_KWARGS if k in kwargs})
        best = _best_runs(study, optuna, multi)
    except BaseException as err:
        broadcast_object({"error": f"{type(err).__name__}: {err}"})  # the other processes stop waiting
        raise
    broadcast_object({"done": best})
    return best


def _best_runs(study: Any, optuna: Any, multi: bool) -> BestRun | list[BestRun]:
    if not any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials):
        states = sorted({t.state.name.lower() for t in study.trials})
        raise JtrainError(f"hyperparameter_search: none of the {len(study.trials)} trials completed (they were "
                          f"{' or '.join(states) or 'never run'}), so there is no best run; loosen the pruner, or "
                          "read the trials' logs under output_dir/run-N")
    if multi:
        return [BestRun(str(t.number), list(t.values), dict(t.params)) for t in study.best_trials]
    best = study.best_trial
    return BestRun(str(best.number), best.value, dict(best.params))


class SharedTrial:
    """What a process other than 0 sees of a trial: its number and sampled `params` (process 0
    holds the optuna study, samples the values and shares them). `model_init(trial)` and
    `hp_name(trial)` may read these; sampling (`suggest_*`) happens in `hp_space` on process 0."""

    def __init__(self, number: int, params: dict[str, Any]):
        self.number, self.params = number, dict(params)

    def __getattr__(self, name: str) -> Any:
        raise JtrainError(f"hyperparameter_search: on process {jax.process_index()} a trial is the copy process 0 "
                          f"shared (number, params); it has no {name!r}. Sample values in hp_space and read "
                          "them from trial.params in model_init")


def _follow(trainer: Any, compute_objective: Callable, multi: bool, hp_name: Callable | None
            ) -> BestRun | list[BestRun]:
    """Processes other than 0: run each trial process 0 announces, in step with it, until it is done."""
    while True:
        message = broadcast_object(None)
        if "error" in message:
            raise JtrainError(f"hyperparameter_search stopped on process 0: {message['error']}")
        if "done" in message:
            return message["done"]
        trial = SharedTrial(message["number"], message["params"])
        _run_trial(trainer, trial, message["values"], message["run_name"], compute_objective, multi, hp_name)


def _run_trial(trainer: Any, trial: Any, values: dict[str, Any], run_name: str, compute_objective: Callable,
               multi: bool, hp_name: Callable | None) -> tuple[Any, str | None]:
    """Train one trial on a fresh Trainer; (objective, None) or (None, "step N") when pruned there."""
    args, applied = _trial_arguments(trainer.args, values, os.path.join(trainer.args.output_dir, run_name))
    initial_params = trainer._init_arguments["params"]
    init = dict(trainer._init_arguments, model=None, args=args,
                model_init=lambda: trainer.call_model_init(trial, initial_params))
    trial_trainer = type(trainer)(**init)
    reporter = _TrialReporter(trial, compute_objective, multi)
    trial_trainer._hp_reporter = reporter
    trial_trainer._trial, trial_trainer.hp_name, trial_trainer._trial_params = trial, hp_name, dict(values)
    trial_trainer.state.is_hyper_param_search = True
    logger.info("hyperparameter search: trial %s (%s) with %s", trial.number, run_name, applied or values)
    try:
        trial_trainer.train()
        if reporter.pruned:
            return None, f"step {trial_trainer.state.global_step}"
        if reporter.objective is None:  # no evaluation during training: evaluate once, as HF does
            reporter(trial_trainer, trial_trainer.evaluate())
        return reporter.objective, None
    finally:
        del trial_trainer
        gc.collect()  # free the trial's device arrays before the next trial allocates its own


# ---- the search space of a run config (`hp_search.space`) -------------------------------------------
_SPACE_KINDS = {"float": ("low", "high"), "int": ("low", "high"), "categorical": ("choices",)}


def check_space(space: Any, fields: set[str]) -> dict[str, dict]:
    """A run config's `hp_search.space` checked before anything runs: each key a TrainingArguments
    field, each value `{type: float|int, low, high[, log, step]}` or `{type: categorical, choices}`."""
    if not isinstance(space, dict) or not space:
        raise ConfigError("hp_search.space must map TrainingArguments fields to ranges, e.g. "
                          "{learning_rate: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}}")
    from jtrain.coerce import closest_key_hint

    out = {}
    for name, spec in space.items():
        where = f"hp_search.space.{name}"
        if name not in fields:
            raise ConfigError(f"{where}: not a TrainingArguments field{closest_key_hint(name, sorted(fields))}")
        if not isinstance(spec, dict) or spec.get("type") not in _SPACE_KINDS:
            raise ConfigError(f"{where} must be a mapping with type: float, int or categorical, got {spec!r}")
        kind = spec["type"]
        missing = [k for k in _SPACE_KINDS[kind] if k not in spec]
        unknown = sorted(set(spec) - {"type", *_SPACE_KINDS[kind], "log", "step"})
        if missing or unknown:
            raise ConfigError(f"{where} ({kind}): " + (f"missing {missing}" if missing else f"unknown keys {unknown}"))
        if kind == "categorical":
            if not isinstance(spec["choices"], list) or not spec["choices"]:
                raise ConfigError(f"{where}.choices must be a non-empty list")
        else:
            number = float if kind == "float" else int
            try:
                low, high = number(spec["low"]), number(spec["high"])
            except (TypeError, ValueError) as err:
                raise ConfigError(f"{where}: low and high must be {kind}s ({err})") from err
            if not low <= high or (spec.get("log") and low <= 0):
                raise ConfigError(f"{where}: need low <= high{' and low > 0 with log: true' if spec.get('log') else ''}"
                                  f", got low={low}, high={high}")
        out[name] = dict(spec)
    return out


def space_sampler(space: dict[str, dict]) -> Callable[[Any], dict[str, Any]]:
    """`hp_space(trial)` for optuna from a checked `hp_search.space`."""

    def hp_space(trial: Any) -> dict[str, Any]:
        values = {}
        for name, spec in space.items():
            kind = spec["type"]
            if kind == "categorical":
                values[name] = trial.suggest_categorical(name, spec["choices"])
            elif kind == "float":
                values[name] = trial.suggest_float(name, float(spec["low"]), float(spec["high"]),
                                                   log=bool(spec.get("log", False)), step=spec.get("step"))
            else:
                values[name] = trial.suggest_int(name, int(spec["low"]), int(spec["high"]),
                                                 log=bool(spec.get("log", False)), step=int(spec.get("step", 1)))
        return values

    return hp_space


def make_sampler(name: str, seed: int | None, space: dict[str, dict]) -> Any:
    """optuna's sampler by name: tpe (optuna's default), random, or grid (every categorical combination)."""
    optuna = _import_optuna()
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    grid = {k: v["choices"] for k, v in space.items() if v["type"] == "categorical"}
    if len(grid) != len(space):
        raise ConfigError("hp_search.sampler grid needs every hp_search.space entry to be categorical (the grid "
                          "is their product)")
    return optuna.samplers.GridSampler(grid, seed=seed)
