"""`TrainingArguments`: HF's names, defaults and meaning, as frozen plain data.

Only fields that jtrain honours are listed; an unknown key is an error that suggests the
closest valid one (see `jtrain.coerce`). jtrain-only fields (mesh, buckets, non-finite policy)
sit at the end with a `jtrain:` note in their help.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import enum
import functools
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

from jtrain.args_setters import TrainingArgumentsSetters
from jtrain.coerce import build_dataclass, coerce, dataclass_to_dict
from jtrain.errors import ConfigError
from jtrain.hf_only_args import HF_ONLY_FIELDS, hf_only_values, unknown_keys_message

_STRATEGIES = ("no", "steps", "epoch")
LOG_LEVELS = {"detail": 10, "debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
"""HF's `log_level` names and their `logging` levels ("passive" leaves the level alone)."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a one-line help text (shown by `--help`)."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass(frozen=True)
class TrainingArguments(TrainingArgumentsSetters):
    """HF `TrainingArguments` for the fields jtrain honours (HF's setters and helpers: jtrain.args_setters). Example::

        args = TrainingArguments(output_dir="out", learning_rate=3e-4, max_steps=100)
    """

    output_dir: str = _f("trainer_output", "Where checkpoints, logs and the final model go.")
    overwrite_output_dir: bool = _f(False, "Allow writing into an output_dir that holds another run.")
    do_train: bool = _f(False, "Run training (read by scripts and jtrain.run, not by Trainer, as in HF); HF's "
                               "default is false, but a jtrain.run config trains unless it sets do_train: false.")
    do_eval: bool = _f(False, "Run evaluation on the validation split.")
    do_predict: bool = _f(False, "Run prediction on the test split.")
    eval_strategy: str = _f("no", "When to evaluate: no | steps | epoch.")
    prediction_loss_only: bool = _f(False, "evaluate/predict return only the loss.")
    per_device_train_batch_size: int = _f(8, "Rows per device per micro-batch in training.")
    per_device_eval_batch_size: int = _f(8, "Rows per device in evaluation.")
    gradient_accumulation_steps: int = _f(1, "Micro-batches accumulated (inside the step) per update.")
    eval_accumulation_steps: int | None = _f(None, "Eval steps between moves of predictions to the host.")
    eval_delay: float = _f(0.0, "Steps (or epochs) to wait before the first evaluation.")
    learning_rate: float = _f(5e-5, "Peak learning rate.")
    weight_decay: float = _f(0.0, "Decoupled weight decay (not on biases and norm scales).")
    adam_beta1: float = _f(0.9, "Adam beta1.")
    adam_beta2: float = _f(0.999, "Adam beta2.")
    adam_epsilon: float = _f(1e-8, "Adam epsilon.")
    max_grad_norm: float = _f(1.0, "Global-norm gradient clipping; 0 disables.")
    num_train_epochs: float = _f(3.0, "Epochs to train (may be fractional); max_steps overrides.")
    max_steps: int = _f(-1, "Total optimizer updates; -1 means use num_train_epochs.")
    lr_scheduler_type: str = _f("linear", "Learning-rate schedule (HF's names).")
    lr_scheduler_kwargs: dict | str | None = _f({}, "Extra schedule options (num_cycles, min_lr, ...).")
    warmup_steps: float = _f(0, "Warmup updates: an int count, or a float in [0, 1) as a ratio.")
    warmup_ratio: float | None = _f(None, "Deprecated in HF: same as a float warmup_steps.")
    log_level: str = _f("passive", "Logging verbosity of jtrain's logger on processes that log (should_log): "
                                   "debug | info | warning | error | critical | passive (leave it as set).")
    log_level_replica: str = _f("warning", "Logging verbosity on the other processes (same choices).")
    log_on_each_node: bool = _f(True, "With several hosts, the first process of every host logs (should_log), not "
                                      "only process 0.")
    logging_dir: str | None = _f(None, "TensorBoard/JSONL log directory (default output_dir/runs).")
    logging_strategy: str = _f("steps", "When to log: no | steps | epoch.")
    logging_first_step: bool = _f(False, "Also log after the first update.")
    logging_steps: float = _f(500, "Updates between logs (a float < 1 is a ratio of max_steps).")
    logging_nan_inf_filter: bool = _f(True, "Drop non-finite losses from the logged running mean.")
    save_strategy: str = _f("steps", "When to save: no | steps | epoch | best.")
    save_steps: float = _f(500, "Updates between checkpoints (a float < 1 is a ratio).")
    save_total_limit: int | None = _f(None, "Keep at most this many checkpoints (plus the best).")
    save_only_model: bool = _f(False, "Checkpoints hold the params only (no optimizer state).")
    save_on_each_node: bool = _f(False, "Each host writes its own copy of the output files; refused with several "
                                        "hosts: jtrain's checkpoints are one shared directory.")
    seed: int = _f(42, "Seed for initialisation, dropout and data order.")
    data_seed: int | None = _f(None, "Seed for data order only (default: seed).")
    bf16: bool = _f(False, "Compute in bfloat16; float32 master weights, optimizer state, logits and loss.")
    fp16: bool = _f(False, "Compute in float16 with dynamic loss scaling (init 2**16, GradScaler's rules).")
    bf16_full_eval: bool = _f(False, "Evaluate with the params cast to bfloat16.")
    fp16_full_eval: bool = _f(False, "Evaluate with the params cast to float16.")
    tf32: bool | None = _f(None, "Matmul precision: true = tensorfloat32, false = highest, unset = JAX's default.")
    eval_steps: float | None = _f(None, "Updates between evaluations (default logging_steps).")
    dataloader_drop_last: bool = _f(False, "Drop the last incomplete training batch.")
    dataloader_num_workers: int = _f(0, "Background threads preparing batches (0: one prefetch thread).")
    dataloader_prefetch_factor: int | None = _f(None, "Batches prepared ahead per worker.")
    run_name: str | None = _f(None, "Name of the run in loggers.")
    disable_tqdm: bool = _f(False, "Hide the progress bar.")
    remove_unused_columns: bool = _f(True, "Drop dataset columns the model does not take.")
    label_names: list[str] | None = _f(None, "Batch keys that hold labels.")
    load_best_model_at_end: bool = _f(False, "Reload the best checkpoint after training.")
    metric_for_best_model: str | None = _f(None, "Metric that decides the best checkpoint.")
    greater_is_better: bool | None = _f(None, "Whether a larger metric_for_best_model is better.")
    optim: str = _f("adamw_torch", "Optimizer name (HF's names).")
    optim_args: str | None = _f(None, "Optimizer options as 'k=v,k2=v2'.")
    optim_target_modules: None | str | list[str] = _f(None, "Modules for galore/apollo optimizers: a list of names, "
                                                            "or one string, a regex or 'all-linear' (as HF's).")
    group_by_length: bool = _f(False, "Batch rows of similar length together.")
    length_column_name: str = _f("length", "Column with precomputed lengths for group_by_length.")
    train_sampling_strategy: str = _f("random", "random | sequential | group_by_length.")
    report_to: list[str] = _f(["none"], "Loggers: none | jsonl | tensorboard | wandb | mlflow | all.")
    resume_from_checkpoint: str | None = _f(None, "Checkpoint to resume from ('true' = latest).")
    activation_checkpointing: bool | None = _f(None, "transformers 5's name for gradient_checkpointing (either "
                                                     "name sets both).")
    activation_checkpointing_kwargs: dict | str | None = _f(None, "transformers 5's name for "
                                                            "gradient_checkpointing_kwargs.")
    gradient_checkpointing: bool = _f(False, "Rematerialise each layer's activations in the backward pass.")
    gradient_checkpointing_kwargs: dict | str | None = _f(None, "Remat policy: {policy: full | dots_saveable | "
                                                    "nothing_saveable | ...} (default full).")
    ignore_data_skip: bool = _f(False, "On resume, start the data from its beginning instead of the saved position "
                                       "(step, optimizer and schedule still continue).")
    average_tokens_across_devices: bool = _f(True, "Divide the summed loss by the token count of the whole global "
                                                   "batch (the only mode jtrain has; false is refused).")
    restore_callback_states_from_checkpoint: bool = _f(False, "On resume, give stateful callbacks (early-stopping "
                                                              "patience, ...) the state saved in the checkpoint.")
    include_num_input_tokens_seen: str | bool = _f("no", "Count input tokens in state.num_input_tokens_seen (and the "
                                                         "logs): no | all (padding included) | non_padding "
                                                         "(attention-mask ones); true means all, as in HF 5.")
    neftune_noise_alpha: float | None = _f(None, "NEFTune embedding noise (training only).")
    label_smoothing_factor: float = _f(0.0, "Label smoothing of the cross-entropy.")
    eval_on_start: bool = _f(False, "Evaluate once before the first update.")
    auto_find_batch_size: bool = _f(False, "Shrink the per-device batch to the largest whose compiled step fits.")
    skip_memory_metrics: bool = _f(True, "Skip the per-phase memory metrics (init/train/eval_mem_*).")
    include_for_metrics: list[str] = _f([], "Extra inputs for compute_metrics: inputs | loss.")
    batch_eval_metrics: bool = _f(False, "Call compute_metrics(eval_pred, compute_result) after every eval batch "
                                         "(true on the last) instead of once on all predictions held in memory.")
    eval_do_concat_batches: bool = _f(True, "Concatenate per-batch predictions, labels, inputs and losses; false "
                                            "keeps lists with one array per batch.")
    use_cpu: bool = _f(False, "Compute on the CPU even where an accelerator exists (JAX_PLATFORMS=cpu; set before "
                              "JAX starts).")
    full_determinism: bool = _f(False, "Deterministic XLA:GPU ops (--xla_gpu_deterministic_ops, set before JAX "
                                       "starts); CPU and TPU runs are deterministic already.")
    # jtrain-only fields.
    mesh_shape: dict | str | None = _f({}, "jtrain: mesh axes, e.g. {data: -1, fsdp: 2, tensor: 2}.")
    fsdp: str = _f("", "jtrain: HF-style shortcut: full_shard | shard_grad_op | hybrid_shard.")
    nonfinite_policy: str = _f("error", "jtrain: on a non-finite loss/grad: error | skip.")
    length_buckets: list[int] | None = _f(None, "jtrain: padded lengths allowed (bounds recompiles).")
    compilation_cache_dir: str | None = _f(None, "jtrain: persistent XLA compilation cache directory.")
    max_device_memory_bytes: int | None = _f(None, "jtrain: memory budget per device for planning (and for "
                                             "auto_find_batch_size); the device's own limit applies too.")
    profile_start_step: int | None = _f(None, "jtrain: capture a JAX profiler trace from this update (1-based) "
                                              "into logging_dir/plugins/profile (TensorBoard, XProf, Perfetto).")
    profile_num_steps: int = _f(3, "jtrain: updates in the profiler trace (with profile_start_step).")

    default_optim = "adamw_torch"  # HF's class attribute: the `optim` default (not a field: no annotation)
    extra_init_keys = frozenset(HF_ONLY_FIELDS)  # HF's PyTorch/Hub fields, accepted by __init__ (hf_only_args)

    def __getattr__(self, name: str) -> Any:
        """HF's PyTorch/Hub fields read back as given, else HF's default (`if args.push_to_hub:` in
        ported code); only called for names that are not attributes."""
        if name in HF_ONLY_FIELDS:
            return self.__dict__.get("_hf_only", {}).get(name, HF_ONLY_FIELDS[name].default)
        raise AttributeError(f"'TrainingArguments' object has no attribute {name!r}")

    def __post_init__(self) -> None:
        _coerce_fields(self)
        _mappings(self)
        _counts_as_ints(self)
        if self.report_to in (["none"], ("none",)):  # HF reads back no loggers as []
            object.__setattr__(self, "report_to", [])
        _resolve_checkpointing_names(self)
        _resolve_token_counting(self)
        _validate(self)

    # ---- derived values -------------------------------------------------------------
    @property
    def resolved_data_seed(self) -> int:
        return self.seed if self.data_seed is None else self.data_seed

    @property
    def resolved_logging_dir(self) -> str:
        """Where loggers and profiler traces write: `logging_dir`, by default `output_dir/runs`."""
        import os

        return self.logging_dir or os.path.join(self.output_dir, "runs")

    # ---- process roles (HF's properties; read them on every process: the first read is collective) ----
    @property
    def process_index(self) -> int:
        """This process's index in the job (HF's `process_index`): jax.process_index()."""
        import jax

        return jax.process_index()

    @property
    def local_process_index(self) -> int:
        """This process's index among the job's processes on its host (0 with one process per host)."""
        from jtrain.distributed import local_process_index

        return local_process_index()

    @property
    def world_size(self) -> int:
        """Processes in the job (HF's `world_size`); each may drive several devices."""
        import jax

        return jax.process_count()

    @property
    def device(self) -> Any:
        """This process's first JAX device (HF's is a torch.device). A process drives every device
        it has (`jax.local_devices()`); the mesh spreads the step over all of them."""
        import jax

        return jax.local_devices()[0]

    @property
    def n_gpu(self) -> int:
        """GPUs this process drives (HF's `n_gpu`; 0 on CPU and TPU)."""
        import jax

        return sum(d.platform == "gpu" for d in jax.local_devices())

    @property
    def parallel_mode(self) -> "ParallelMode":
        """HF's `parallel_mode`, as the ported scripts' start-up line reads it (`.value`): several
        processes are `distributed`, several devices in one process `not_distributed`."""
        import jax

        if jax.default_backend() == "tpu":
            return ParallelMode.TPU
        if jax.process_count() > 1:
            return ParallelMode.DISTRIBUTED
        return ParallelMode.NOT_DISTRIBUTED if jax.local_device_count() > 1 else ParallelMode.NOT_PARALLEL

    @property
    def ddp_timeout_delta(self) -> datetime.timedelta:
        """HF's `ddp_timeout` as a timedelta (jtrain's processes do not use it)."""
        return datetime.timedelta(seconds=self.ddp_timeout)

    @property
    def should_log(self) -> bool:
        """Whether this process logs: each host's first process with `log_on_each_node`, else process 0."""
        return (self.local_process_index if self.log_on_each_node else self.process_index) == 0

    @property
    def should_save(self) -> bool:
        """Whether this process writes the output files: each host's first with `save_on_each_node`, else process 0."""
        return (self.local_process_index if self.save_on_each_node else self.process_index) == 0

    @property
    def process_log_level_name(self) -> str:
        """This process's `log_level` name: `log_level` where `should_log`, else `log_level_replica`."""
        return self.log_level if self.should_log else self.log_level_replica

    def get_process_log_level(self) -> int:
        """The `logging` level of `process_log_level_name`; "passive" keeps jtrain's logger's own level."""
        import logging

        name = self.process_log_level_name
        return logging.getLogger("jtrain").getEffectiveLevel() if name == "passive" else LOG_LEVELS[name]

    @contextlib.contextmanager
    def main_process_first(self, local: bool = True, desc: str = "work") -> Iterator[None]:
        """Run the block on the main process (each host's first with `local`, else process 0) before
        the others, as HF's: e.g. a `datasets.map` that writes a cache the others then read. The other
        processes wait at a barrier of the whole job; a single-process run just runs the block."""
        if self.world_size == 1:
            yield
            return
        from jax.experimental.multihost_utils import sync_global_devices

        main = (self.local_process_index if local else self.process_index) == 0
        barrier = f"jtrain.main_process_first:{desc}"
        if not main:
            sync_global_devices(barrier)
        try:
            yield
        finally:
            if main:
                sync_global_devices(barrier)

    def warmup_for(self, num_training_steps: int) -> int:
        """Warmup updates for a run of `num_training_steps` (HF: ratio -> ceil)."""
        warmup = self.warmup_steps
        if self.warmup_ratio is not None and not warmup:
            warmup = self.warmup_ratio
        if isinstance(warmup, float) and 0 <= warmup < 1:
            return math.ceil(warmup * num_training_steps)
        return int(warmup)

    def replace(self, **changes: Any) -> "TrainingArguments":
        for new, old in _CHECKPOINTING_NAMES:  # one name of a pair changes both
            if (new in changes) != (old in changes):
                changes[new] = changes[old] = changes[new] if new in changes else changes[old]
        hf_only = {key: changes.pop(key) for key in list(changes) if key in HF_ONLY_FIELDS}
        new = dataclasses.replace(self, **changes)
        kept = {**self.__dict__.get("_hf_only", {}), **hf_only_values(hf_only, "TrainingArguments.replace")}
        object.__setattr__(new, "_hf_only", kept)
        return new

    def to_dict(self) -> dict:
        return dataclass_to_dict(self)

    @classmethod
    def from_hf(cls, hf_args: Any) -> "TrainingArguments":
        """jtrain's arguments for a `transformers.TrainingArguments` instance: the values it sets away from HF's
        defaults, so code that builds HF's arguments runs on jtrain's Trainer as written."""
        defaults = type(hf_args)(output_dir=hf_args.output_dir).to_dict()
        given = hf_args.to_dict()
        changed = {k: v for k, v in given.items() if k not in defaults or v != defaults[k]}
        changed.pop("hub_token", None)  # to_dict masks it; jtrain never uploads
        return cls(output_dir=hf_args.output_dir, **changed)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], section: str = "training") -> "TrainingArguments":
        """Build from a loosely typed mapping; unknown keys and bad types raise ConfigError."""
        return build_dataclass(cls, values, section)


def _refusing_unknown_keywords(init: Any) -> Any:
    """The dataclass `__init__`, taking HF's PyTorch/Hub fields too (`jtrain.hf_only_args`: kept to be
    read back, four refused when switched on) and naming every unknown keyword at once with the
    closest field, instead of Python's TypeError for the first."""
    names = frozenset(f.name for f in dataclasses.fields(TrainingArguments) if f.init)

    @functools.wraps(init)
    def checked(self: TrainingArguments, *args: Any, **kwargs: Any) -> None:
        unknown = [key for key in kwargs if key not in names and key not in HF_ONLY_FIELDS]
        if unknown:
            raise ConfigError(f"TrainingArguments: {unknown_keys_message(unknown, names)}")
        hf_only = hf_only_values({key: kwargs.pop(key) for key in list(kwargs) if key in HF_ONLY_FIELDS},
                                 "TrainingArguments")
        init(self, *args, **kwargs)
        object.__setattr__(self, "_hf_only", hf_only)

    return checked


TrainingArguments.__init__ = _refusing_unknown_keywords(TrainingArguments.__init__)


class ParallelMode(enum.Enum):
    """HF's `ParallelMode` values that a JAX job can be in."""

    NOT_PARALLEL = "not_parallel"
    NOT_DISTRIBUTED = "not_distributed"
    DISTRIBUTED = "distributed"
    TPU = "tpu"

_CHECKPOINTING_NAMES = (("activation_checkpointing", "gradient_checkpointing"),
                        ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs"))


def _resolve_checkpointing_names(a: TrainingArguments) -> None:
    """transformers 5 names gradient checkpointing `activation_checkpointing(_kwargs)` and keeps
    `gradient_checkpointing(_kwargs)` as deprecated aliases: either name sets both here, so
    a config written for transformers 4 or 5 means the same; two different values are refused."""
    defaults = {f.name: f.default for f in dataclasses.fields(a)}
    for new, old in _CHECKPOINTING_NAMES:
        value, alias = getattr(a, new), getattr(a, old)
        if value is None:
            value = alias
        elif alias != defaults[old] and alias != value:
            raise ConfigError(f"`{new}`={value!r} and its older name `{old}`={alias!r} disagree: set only one")
        object.__setattr__(a, new, value)
        object.__setattr__(a, old, value)


_TOKEN_COUNTING = {True: "all", False: "no", "true": "all", "false": "no", "all": "all", "no": "no",
                   "non_padding": "non_padding"}


def _resolve_token_counting(a: TrainingArguments) -> None:
    """HF 5's `include_num_input_tokens_seen` is one of no | all | non_padding, with booleans meaning all/no."""
    value = a.include_num_input_tokens_seen
    key = value.strip().lower() if isinstance(value, str) else value
    if key not in _TOKEN_COUNTING:
        raise ConfigError(f"`include_num_input_tokens_seen` must be no, all, non_padding or a boolean, got {value!r}")
    object.__setattr__(a, "include_num_input_tokens_seen", _TOKEN_COUNTING[key])


@functools.cache
def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainingArguments)


def _coerce_fields(a: TrainingArguments) -> None:
    """Each value read by its field's type, as the config file's are (`jtrain.coerce`): a dict loaded
    with PyYAML gives `learning_rate: 3e-4` as the string '3e-4', which would otherwise reach the
    optimizer (HF's dataclass takes it as it is and fails inside torch); a value of the wrong kind is
    a ConfigError naming the field. None is left alone (HF passes None for several of these)."""
    hints = _field_types()
    for f in dataclasses.fields(a):
        value = getattr(a, f.name)
        if f.init and value is not None:
            typed = coerce(value, hints[f.name], f.name)
            if typed is not value:
                object.__setattr__(a, f.name, typed)


_COUNTS_OR_RATIOS = ("logging_steps", "save_steps", "eval_steps", "warmup_steps")


_MAPPINGS = {"lr_scheduler_kwargs": {}, "mesh_shape": {}, "activation_checkpointing_kwargs": None,
             "gradient_checkpointing_kwargs": None}


def _mappings(a: TrainingArguments) -> None:
    """The mapping fields are annotated `dict | str | None` as HF's are (its HfArgumentParser reads such a field
    as a string, JSON or YAML here); what is left a string did not parse as a mapping."""
    for name, empty in _MAPPINGS.items():
        value = getattr(a, name)
        if value is None:
            object.__setattr__(a, name, empty)
        elif not isinstance(value, dict):
            raise ConfigError(f"`{name}`: expected a mapping (JSON or YAML, e.g. '{{\"data\": 2}}'), got {value!r}")


def _counts_as_ints(a: TrainingArguments) -> None:
    """The step fields are floats, as HF annotates them (so HF's HfArgumentParser reads them): a value >= 1 is
    a count, kept as an int, and one below 1 a ratio of the run's updates. A count with a fraction is refused
    (HF refuses it for logging/eval/save steps and truncates a warm-up's)."""
    for name in _COUNTS_OR_RATIOS:
        value = getattr(a, name)
        if isinstance(value, float) and value >= 1:
            if not value.is_integer():
                raise ConfigError(f"`{name}` {value}: a value >= 1 is a number of updates and must be whole "
                                  "(below 1 it is a ratio of the run's updates)")
            object.__setattr__(a, name, int(value))


def _validate(a: TrainingArguments) -> None:
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    need(a.max_steps == -1 or a.max_steps > 0, f"`max_steps` must be > 0 (or -1 to use epochs), got {a.max_steps}")
    need(a.max_steps > 0 or a.num_train_epochs > 0, f"`num_train_epochs` must be > 0, got {a.num_train_epochs}")
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        need(getattr(a, name) >= 1, f"`{name}` must be >= 1, got {getattr(a, name)}")
    for name in ("logging_steps", "save_steps"):
        need(getattr(a, name) > 0, f"`{name}` must be > 0, got {getattr(a, name)}")
    need(a.eval_steps is None or a.eval_steps > 0, f"`eval_steps` must be > 0, got {a.eval_steps}")
    need(a.learning_rate >= 0, f"`learning_rate` must be >= 0, got {a.learning_rate}")
    need(a.warmup_steps >= 0, f"`warmup_steps` must be >= 0, got {a.warmup_steps}")
    for name, allowed in (
        ("eval_strategy", _STRATEGIES),
        ("logging_strategy", _STRATEGIES),
        ("save_strategy", _STRATEGIES + ("best",)),
        ("nonfinite_policy", ("error", "skip")),
        ("train_sampling_strategy", ("random", "sequential", "group_by_length")),
        ("fsdp", ("", "full_shard", "shard_grad_op", "hybrid_shard")),
        ("log_level", (*LOG_LEVELS, "passive")),
        ("log_level_replica", (*LOG_LEVELS, "passive")),
    ):
        value = getattr(a, name)
        need(value in allowed, f"`{name}` must be one of {list(allowed)}, got {value!r}")
    need(a.average_tokens_across_devices, "`average_tokens_across_devices: false` (a per-device loss mean) is not "
                                          "implemented: jtrain divides the summed loss by the global batch's token "
                                          "count, which is HF's default (true)")
    need(not (a.bf16 and a.fp16), "`bf16` and `fp16` are both set: choose one")
    need(not (a.bf16_full_eval and a.fp16_full_eval), "`bf16_full_eval` and `fp16_full_eval` are both set: choose one")
    need(a.profile_start_step is None or a.profile_start_step >= 1,
         f"`profile_start_step` must be >= 1 (the first update is 1), got {a.profile_start_step}")
    need(a.profile_num_steps >= 1, f"`profile_num_steps` must be >= 1, got {a.profile_num_steps}")
    need(a.max_device_memory_bytes is None or a.max_device_memory_bytes > 0,
         f"`max_device_memory_bytes` must be > 0 (or unset), got {a.max_device_memory_bytes}")
    if a.gradient_checkpointing_kwargs is not None:
        from jtrain.memory import remat_policy_from_args

        remat_policy_from_args(True, a.gradient_checkpointing_kwargs)  # raises ConfigError naming the bad key
    from jtrain.optim.factory import check_optimizer_name  # optax is loaded by then: jtrain's __init__ needs it

    check_optimizer_name(a.optim, a.gradient_accumulation_steps)
    need(a.save_strategy != "best" or a.metric_for_best_model, "save_strategy 'best' needs `metric_for_best_model`")
    if a.load_best_model_at_end:
        need(a.eval_strategy != "no", "`load_best_model_at_end` needs an `eval_strategy` other than 'no'")
        _check_load_best(a)


def _check_load_best(a: TrainingArguments) -> None:
    """As HF's at construction: the best model can be reloaded only if every evaluation is followed
    by a save. Two ratios of the run's updates are compared once train() resolves them."""
    if a.save_strategy == "best":
        return
    if a.save_strategy != a.eval_strategy:
        raise ConfigError(f"`load_best_model_at_end` needs save_strategy == eval_strategy (or save_strategy "
                          f"'best'), got save_strategy {a.save_strategy!r} and eval_strategy {a.eval_strategy!r}")
    every = a.eval_steps or a.logging_steps  # eval_steps defaults to logging_steps, as in HF
    if a.eval_strategy != "steps" or (a.save_steps < 1 and every < 1):
        return
    if (a.save_steps < 1) != (every < 1):
        raise ConfigError(f"`load_best_model_at_end` needs save_steps to be a multiple of eval_steps, which a ratio "
                          f"and a number of updates cannot promise: save_steps {a.save_steps}, eval_steps {every}; "
                          f"give both as numbers of updates or both as ratios")
    if a.save_steps % every:
        raise ConfigError(f"`load_best_model_at_end` needs save_steps ({a.save_steps}) to be a multiple of "
                          f"eval_steps ({every})")
