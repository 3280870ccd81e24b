"""What a `Trainer` refuses, and where: bad datasets, optimizer arguments that exclude each
other, `save_on_each_node` across hosts and a `compute_metrics` that cannot take
`compute_result` at construction, a loader from an overridden getter that jtrain cannot place,
bad `ignore_keys`, and (with `nonfinite_policy: error`) a non-finite update in the loop.

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
from jtrain.losses import IGNORE_INDEX


def check_datasets(self: Any) -> None:
    """Bad datasets fail here, before anything compiles: a DatasetDict where one split is needed
    (the error names its splits), an empty dataset or split, a class label outside [0, num_labels).
    A one-output head is a regression (HF's rule for `num_labels=1`): its labels are numbers, any sign."""
    from jtrain.data.trainer_loader import check_dataset

    num_labels = getattr(self.model.config, "num_labels", None) if self.model.task == "sequence_classification" \
        else None
    num_labels = None if num_labels == 1 else num_labels
    check_dataset(self.train_dataset, "train_dataset", num_labels=num_labels)
    check_dataset(self.eval_dataset, "eval_dataset", num_labels=num_labels, several_splits=True)


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
    """HF's two refusals: `optimizers` with `optimizer_cls_and_kwargs` (two optimizers), and
    `optimizers` with `model_init` (every train() rebuilds the model, so a prebuilt optimizer and
    schedule would be dropped)."""
    if self.optimizer_cls_and_kwargs is not None and self.optimizer is not None:
        raise ConfigError("pass either `optimizers` or `optimizer_cls_and_kwargs`, not both")
    if self.model_init is not None and (self.optimizer is not None or self.lr_scheduler is not None):
        raise ConfigError("`model_init` rebuilds the model at every train(), so a prebuilt `optimizers` pair cannot "
                          "follow it: pass `optimizer_cls_and_kwargs`, or subclass Trainer and override "
                          "create_optimizer_and_scheduler")


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


def label_ids_checked(trainer: Any) -> bool:
    """Whether the batches' labels are class or token ids for jtrain's built-in loss, where -100 is
    the only negative label (HF's ignore index): not with a user's loss (`compute_loss_func` or an
    overridden `compute_loss`, which may use other conventions), nor for a one-output regression head."""
    from jtrain.trainer import Trainer

    if trainer.compute_loss_func is not None or type(trainer).compute_loss is not Trainer.compute_loss:
        return False
    return trainer.model.task != "sequence_classification" or getattr(trainer.model.config, "num_labels", 2) != 1


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
    its output classes, read once here rather than per batch."""
    vocab_size = getattr(trainer.model.config, "vocab_size", None)
    label_ids = label_ids_checked(trainer)
    classes = label_classes(trainer) if label_ids else None
    return lambda batch: check_token_ids(batch, vocab_size, what, label_ids=label_ids, classes=classes)


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
