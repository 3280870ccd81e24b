"""What a `Trainer` refuses, and where: bad datasets, optimizer arguments that exclude each
other or that are not optax's, a subclass written for HF's torch Trainer (its `compute_loss`
signature, or overrides of methods jtrain never calls), `save_on_each_node` across hosts and a
`compute_metrics` that cannot take `compute_result` at construction, a loader from an overridden
getter that jtrain cannot place, bad `ignore_keys`, and (with `nonfinite_policy: error`) a
non-finite update in the loop.

The methods are bound onto `jtrain.Trainer` under their underscored names.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from jtrain.data.loader import HostLoader
from jtrain.data.stream import StreamLoader
from jtrain.errors import ConfigError, DataError, NonFiniteError
from jtrain.hf_only_args import NO_UPLOAD
from jtrain.losses import IGNORE_INDEX


def check_datasets(self: Any) -> None:
    """Bad datasets fail here, before anything compiles: evaluations asked for without an
    eval_dataset (as HF), a DatasetDict where one split is needed
    (the error names its splits), an empty dataset or split, a class label outside [0, num_labels).
    Regression and multi-label heads (`labels_are_class_ids`) take numbers of any sign and size."""
    from jtrain.data.trainer_loader import check_dataset

    num_labels = getattr(self.model.config, "num_labels", None) if self.model.task == "sequence_classification" \
        and labels_are_class_ids(self.model) else None
    check_dataset(self.train_dataset, "train_dataset", num_labels=num_labels)
    check_dataset(self.eval_dataset, "eval_dataset", num_labels=num_labels, several_splits=True)
    if self.args.eval_strategy != "no" and self.eval_dataset is None:  # HF's refusal, before any training
        raise ConfigError(f"eval_strategy is {self.args.eval_strategy!r} but the Trainer got no eval_dataset: pass "
                          "eval_dataset, or set eval_strategy to 'no'")


def check_model(model: Any) -> None:
    """A `model` that is not a jtrain Model fails here with the way to get one, not later with an
    AttributeError from deep inside the Trainer (a PyTorch `transformers` model is the usual case)."""
    from jtrain.trainer_helpers import _is_model

    if _is_model(model):
        return
    kind = f"{type(model).__module__}.{type(model).__name__}"
    if hasattr(model, "save_pretrained") and hasattr(model, "state_dict"):
        raise ConfigError(f"Trainer got a PyTorch model ({kind}); jtrain trains JAX models: save it with "
                          "model.save_pretrained(path) and load it with jtrain.models.from_pretrained(path)")
    raise ConfigError(f"Trainer's `model` must be a jtrain Model, got {kind}; create one with "
                      "jtrain.models.create_model(model_type, config) or jtrain.models.from_pretrained(path)")


def check_optimizer_arguments(self: Any) -> None:
    """An `optimizers` pair that is not optax's (`check_optimizer_pair`), and HF's two refusals:
    `optimizers` with `optimizer_cls_and_kwargs` (two optimizers), and `optimizers` with `model_init`
    (every train() rebuilds the model, so a prebuilt optimizer and schedule would be dropped)."""
    if self.optimizer_cls_and_kwargs is not None and self.optimizer is not None:
        raise ConfigError("pass either `optimizers` or `optimizer_cls_and_kwargs`, not both")
    check_optimizer_pair(self.optimizer, self.lr_scheduler, "optimizers")
    if self.model_init is not None and (self.optimizer is not None or self.lr_scheduler is not None):
        raise ConfigError("`model_init` rebuilds the model at every train(), so a prebuilt `optimizers` pair cannot "
                          "follow it: pass `optimizer_cls_and_kwargs`, or subclass Trainer and override "
                          "create_optimizer_and_scheduler")


def check_optimizer_pair(optimizer: Any, scheduler: Any, where: str) -> None:
    """The optimizer must be an optax transformation and the schedule a function of the update
    count: a torch optimizer or scheduler (code ported from HF's Trainer) would otherwise fail at the
    first step with an AttributeError or TypeError from inside jtrain.state or optax."""
    if optimizer is not None and not (callable(getattr(optimizer, "init", None)) and
                                      callable(getattr(optimizer, "update", None))):
        raise ConfigError(f"{where}: the optimizer is a {_kind(optimizer)}, not an optax GradientTransformation; "
                          "jtrain's optimizers are optax chains: set TrainingArguments(optim=...), pass "
                          "optimizer_cls_and_kwargs=(optax.adamw, {...}), or pass an optax transformation")
    if scheduler is not None and not callable(scheduler):
        raise ConfigError(f"{where}: the learning-rate schedule is a {_kind(scheduler)}, not a function of the "
                          "update count; set TrainingArguments(lr_scheduler_type=...) or pass an optax schedule "
                          "(e.g. optax.linear_schedule(3e-4, 0.0, 1000))")


def _kind(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


# HF Trainer methods that jtrain's Trainer never calls, and what does their job here. A subclass
# ported from HF that overrides one would otherwise train as if the override were not there.
HF_ONLY_METHODS: dict[str, str] = {
    "training_step": "the train step is one compiled function: put the loss in compute_loss(outputs, batch) "
                     "or compute_loss_func, and host-side work in a TrainerCallback (on_step_end)",
    "evaluation_loop": "override prediction_step(outputs, batch) for what each batch keeps, compute_metrics "
                       "for the metrics, or evaluate()",
    "_inner_training_loop": "use a TrainerCallback (on_step_begin/on_step_end/on_log/on_evaluate/on_save)",
    "_maybe_log_save_evaluate": "use a TrainerCallback (on_log, on_evaluate, on_save) or log()",
    "_prepare_inputs": "change the batches through data_collator or get_train_dataloader()",
    "_prepare_input": "change the batches through data_collator or get_train_dataloader()",
    "get_batch_samples": "change the batches through data_collator or get_train_dataloader()",
    "_get_train_sampler": "use TrainingArguments (group_by_length, length_buckets, seed) or get_train_dataloader()",
    "_get_eval_sampler": "override get_eval_dataloader()",
    "compute_loss_context_manager": "precision comes from TrainingArguments (bf16, fp16)",
    "autocast_smart_context_manager": "precision comes from TrainingArguments (bf16, fp16)",
    "_save": "override save_model(output_dir) or use a TrainerCallback's on_save",
    "_save_checkpoint": "use a TrainerCallback's on_save (checkpoints are orbax directories in checkpoint-N/)",
    "_load_from_checkpoint": "use train(resume_from_checkpoint=...) or jtrain.models.from_pretrained",
    "create_accelerator_and_postprocess": "jtrain has no accelerate; devices come from the mesh (mesh_shape)",
}
# HF Trainer attributes with no jtrain counterpart: reading one raises an AttributeError that says why and what
# to use (hasattr() stays False), instead of Python's bare "has no attribute".
HF_ONLY_ATTRIBUTES: dict[str, str] = {
    "accelerator": "jtrain has no accelerate: devices come from the mesh (TrainingArguments.mesh_shape), "
                   "precision from bf16/fp16",
    "model_wrapped": "nothing wraps the model (no DDP/FSDP module): the model is `trainer.model` and its "
                     "parameters `trainer.params`, sharded over the mesh",
    "place_model_on_device": "the mesh's shardings place the parameters when train(), evaluate() or predict() "
                             "sets up",
    "is_deepspeed_enabled": "jtrain has no DeepSpeed: ZeRO-style sharding is the `fsdp` mesh axis",
    "is_fsdp_enabled": "jtrain has no torch FSDP: parameter sharding is the `fsdp` mesh axis (mesh_shape)",
    "store_flos": "every update adds its FLOPs to state.total_flos already (one count for all processes)",
    "get_optimizer_group": "the optimizer is one optax transformation over the parameter tree, with no param "
                           "groups: get_decay_parameter_names() names what decays, get_learning_rates() the rate",
    "init_hf_repo": NO_UPLOAD,
}

# The parameters that only HF's signatures of jtrain's two traced override points have.
_HF_SIGNATURES = {
    "compute_loss": ("compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None)",
                     {"return_outputs", "num_items_in_batch"},
                     "compute_loss(self, outputs, batch) -> jtrain.losses.LossOutput(loss_sum, weight, stats), "
                     "traced into the compiled step with the model's outputs already computed (or pass "
                     "compute_loss_func=fn(outputs, labels, num_items_in_batch) written with jax.numpy)"),
    "prediction_step": ("prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None)",
                        {"prediction_loss_only", "ignore_keys"},
                        "prediction_step(self, outputs, batch) -> what evaluate/predict keep of the batch (any "
                        "pytree of arrays with rows first), traced into the compiled predict step"),
}


def check_overrides(self: Any, base: type) -> None:
    """A subclass of `base` (jtrain's Trainer) written for HF's: an override of a method jtrain never
    calls, or `compute_loss` / `prediction_step` with HF's torch-side signature (which jtrain would
    call with the model's outputs and fail inside the traced step), is refused with what to use."""
    cls = type(self)
    if cls is base:
        return
    ignored = [name for name in HF_ONLY_METHODS if getattr(cls, name, None) is not None]
    if ignored:
        raise ConfigError(f"{cls.__name__} overrides {', '.join(ignored)}, which jtrain's Trainer never calls "
                          f"(HF's torch loop has no counterpart here): "
                          + "; ".join(f"{name}: {HF_ONLY_METHODS[name]}" for name in ignored))
    for name, (hf_form, hf_only, jtrain_form) in _HF_SIGNATURES.items():
        method = getattr(cls, name)
        if method is getattr(base, name):
            continue
        try:
            params = list(inspect.signature(method).parameters)
        except (TypeError, ValueError):  # not introspectable: the traced call decides
            continue
        if params[1:2] == ["model"] or hf_only & set(params):
            raise ConfigError(f"{cls.__name__}.{name} has HF's torch signature ({hf_form}); jtrain's is "
                              f"{jtrain_form}")


def check_process_roles(self: Any) -> None:
    """`save_on_each_node` asks every host to write its own copy of the outputs (disks the hosts do
    not share); jtrain's orbax checkpoints are written collectively into one directory, so with
    several hosts that cannot work. One host: its first process is process 0, nothing changes."""
    from jtrain.distributed import host_count

    if self.args.save_on_each_node and host_count() > 1:
        raise ConfigError(f"`save_on_each_node: true` with {host_count()} hosts: jtrain writes each checkpoint "
                          "collectively into one directory every host must see; put output_dir on a shared "
                          "filesystem and set save_on_each_node false")


def check_compute_metrics(self: Any) -> None:
    """As HF: `batch_eval_metrics` calls `compute_metrics(..., compute_result=...)` per batch, so a
    function without that argument would fail only at the first evaluation; refuse it now."""
    if self.args.batch_eval_metrics and self.compute_metrics is not None:
        try:
            parameters = inspect.signature(self.compute_metrics).parameters
        except (TypeError, ValueError):  # a builtin or C callable: let the call itself decide
            return
        takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        if "compute_result" not in parameters and not takes_kwargs:
            raise ConfigError("`batch_eval_metrics` calls compute_metrics(eval_pred, compute_result=...) after "
                              "every eval batch (true on the last one, whose result is returned): add a "
                              "`compute_result` argument to compute_metrics, or set batch_eval_metrics false")


def uses_builtin_loss(trainer: Any) -> bool:
    """Whether the step runs jtrain's loss for the model's task (no `compute_loss_func`, no
    overridden `compute_loss`, either of which may read other columns and conventions)."""
    from jtrain.trainer import Trainer

    return trainer.compute_loss_func is None and type(trainer).compute_loss is Trainer.compute_loss


def labels_are_class_ids(model: Any) -> bool:
    """Whether the task's labels are class (or token) ids: every task but the sequence-classification
    heads whose problem type (the config's, or HF's rule when unset: one output) is a regression or
    multi-label (integer 0/1 targets there are per-class, float targets are checked by nobody)."""
    if model.task != "sequence_classification":
        return True
    problem = getattr(model.config, "problem_type", None)
    return problem == "single_label_classification" or (problem is None and getattr(model.config, "num_labels", 2) != 1)


def label_ids_checked(trainer: Any) -> bool:
    """Whether the batches' labels are class or token ids for jtrain's built-in loss, where -100 is
    the only negative label (HF's ignore index): not with a user's loss, nor for regression or
    multi-label heads."""
    return uses_builtin_loss(trainer) and labels_are_class_ids(trainer.model)


_LABELS_HINT = {
    "causal_lm": "for a causal LM, DataCollatorForLanguageModeling(tokenizer, mlm=False) copies input_ids into "
                 "labels (or add a labels column equal to input_ids; the loss shifts it)",
    "masked_lm": "DataCollatorForLanguageModeling(tokenizer) masks tokens and writes their labels",
    "sequence_classification": "add a label (or labels) column with each row's class id",
    "token_classification": "add a labels column with each token's class id (-100 where no label applies)",
}


def check_train_labels(trainer: Any, batch: Any) -> None:
    """A training batch without `labels` under the built-in loss fails here, naming the columns it
    has and how to get labels, instead of a KeyError from inside the traced loss. (Evaluation and
    prediction accept unlabeled data: they compute no loss then, as HF.)"""
    if not isinstance(batch, Mapping) or "labels" in batch or not uses_builtin_loss(trainer):
        return
    task = trainer.model.task
    raise DataError(f"train_dataset: the training batches have no 'labels' (they have {sorted(batch)}), and the "
                    f"built-in {task} loss needs them: "
                    + _LABELS_HINT.get(task, "add a labels column, or pass compute_loss_func"))


def label_classes(trainer: Any) -> int | None:
    """How many classes the built-in loss's logits have, so a label must lie in [0, this): the
    vocabulary for the language-model tasks, `num_labels` for the classification heads; None where
    the config does not say."""
    key = "vocab_size" if trainer.model.task in ("causal_lm", "masked_lm") else "num_labels"
    return getattr(trainer.model.config, key, None)


def check_token_ids(batch: Any, vocab_size: int | None, what: str, *, label_ids: bool = False,
                    classes: int | None = None) -> None:
    """Float token ids, or ids outside the model's vocabulary, are a DataError naming the id and the
    vocabulary. On the device JAX would not fail clearly: float ids stop the compile deep inside
    the embedding, and an out-of-range lookup gives NaN (a "non-finite loss" that blames the learning
    rate) or a clamped row. With `label_ids`, a negative integer label other than -100 is one too,
    and so is a label at or past `classes`: PyTorch's cross-entropy rejects both, while on the device
    they would silently read another class's logit or NaN (XLA's ops) or be skipped (the CPU loss
    kernel). A max and min over the host batch: microseconds per step."""
    if not isinstance(batch, Mapping):
        return
    if batch.get("input_ids") is not None:  # first: labels copied from bad ids are the ids' fault
        _check_ids(np.asarray(batch["input_ids"]), vocab_size, what)
    if label_ids and batch.get("labels") is not None:
        _check_label_ids(np.asarray(batch["labels"]), what, classes)


def _check_ids(arr: np.ndarray, vocab_size: int | None, what: str) -> None:
    if arr.dtype.kind not in "iu":
        raise DataError(f"{what}: input_ids must be integer token ids, got {arr.dtype} values; tokenize the "
                        "text, or cast the column to int")
    if vocab_size and arr.size:
        low, high = int(arr.min()), int(arr.max())
        if low < 0 or high >= vocab_size:
            raise DataError(f"{what}: token id {high if high >= vocab_size else low} is outside the model's "
                            f"vocabulary [0, {vocab_size}); the data was tokenized for another vocabulary, or "
                            "the model's vocab_size is too small (resize it to the tokenizer's)")


def _check_label_ids(labels: np.ndarray, what: str, classes: int | None) -> None:
    if labels.dtype.kind not in "iu" or not labels.size:
        return
    if int(labels.min()) < 0:
        wrong = np.unique(labels[(labels < 0) & (labels != IGNORE_INDEX)])
        if wrong.size:
            raise DataError(f"{what}: label {int(wrong[0])} is negative; positions the loss should ignore take "
                            f"{IGNORE_INDEX} (HF's ignore index), and every other label is a class or token id >= 0")
    high = int(labels.max())
    if classes and high >= classes:
        raise DataError(f"{what}: label {high} is outside the model's {classes} output classes [0, {classes}); "
                        "the labels come from another label set or vocabulary, or the model's num_labels (or "
                        f"vocab_size) is too small: it must be at least {high + 1}")


def batch_check(trainer: Any, what: str) -> Callable[[Any], None]:
    """`check_token_ids` for `trainer`'s batches: its model's vocabulary, its loss's label rule and
    its output classes, read once here rather than per batch; and the token ids must be there (a
    text column the model cannot read is dropped with the unused columns, so an untokenized
    dataset arrives without them and would fail inside the model's call)."""
    vocab_size = getattr(trainer.model.config, "vocab_size", None)
    label_ids = label_ids_checked(trainer)
    classes = label_classes(trainer) if label_ids else None
    needs_ids = "input_ids" in getattr(trainer.model, "input_names", ())

    def check(batch: Any) -> None:
        if needs_ids and isinstance(batch, Mapping) and "input_ids" not in batch:
            raise DataError(f"{what}: the batches have no 'input_ids' (they have {sorted(batch)}): tokenize the text "
                            "first (dataset.map(lambda rows: tokenizer(rows['text']), batched=True)), or rename the "
                            "column that holds the token ids to input_ids")
        check_token_ids(batch, vocab_size, what, label_ids=label_ids, classes=classes)

    return check


def checked_placement(place: Callable[[dict], Any], check: Callable[[Any], None]) -> Callable[[dict], Any]:
    """`place` (host batch -> device batch) behind `check` (a `batch_check`)."""
    def place_checked(batch: dict) -> Any:
        check(batch)
        return place(batch)

    return place_checked


def check_finite(self: Any, metrics: Mapping[str, Any], step: int) -> None:
    """`nonfinite_policy: error`: a non-finite update (never applied) stops the run, naming the step."""
    if metrics.get("nonfinite", 0) and self.args.nonfinite_policy == "error":
        raise NonFiniteError(
            f"non-finite loss or gradient at step {step} (loss={metrics.get('loss')}, "
            f"grad_norm={metrics.get('grad_norm')}); the update was not applied and the last checkpoint "
            "is intact. Lower the learning rate, check the data, or set nonfinite_policy=skip")


def keeps_logits(ignore_keys: Any) -> bool:
    """Whether predictions survive `ignore_keys` (jtrain models output `logits` only)."""
    if ignore_keys is not None and (isinstance(ignore_keys, str) or not all(isinstance(k, str) for k in ignore_keys)):
        raise ConfigError(f"ignore_keys must be a list of model-output names, got {ignore_keys!r}")
    return not ignore_keys or "logits" not in ignore_keys


def checked_loader(loader: Any, getter: str) -> Any:
    """A loader from an (overridable) getter must be jtrain's: the compiled steps place its batches."""
    if not isinstance(loader, (HostLoader, StreamLoader)):
        raise ConfigError(f"{getter}() returned a {type(loader).__name__}; jtrain iterates its own loaders "
                          "(jtrain.data.loader.HostLoader, built by the Trainer's getter): change the batches "
                          "through data_collator, the dataset or the TrainingArguments instead")
    return loader
