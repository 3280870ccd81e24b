"""What a `Trainer` refuses, and where: bad datasets and a `compute_metrics` that cannot take
`compute_result` at construction, a loader from an overridden getter that jtrain cannot place,
bad `ignore_keys`, and (with `nonfinite_policy: error`) a non-finite update in the loop.

The methods are bound onto `jtrain.Trainer` under their underscored names.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from jtrain.data.loader import HostLoader
from jtrain.data.stream import StreamLoader
from jtrain.errors import ConfigError, NonFiniteError


def check_datasets(self: Any) -> None:
    """Bad datasets fail here, before anything compiles: a DatasetDict where one split is needed
    (the error names its splits), an empty dataset or split, a class label outside [0, num_labels)."""
    from jtrain.data.trainer_loader import check_dataset

    num_labels = getattr(self.model.config, "num_labels", None) if self.model.task == "sequence_classification" \
        else None
    check_dataset(self.train_dataset, "train_dataset", num_labels=num_labels)
    check_dataset(self.eval_dataset, "eval_dataset", num_labels=num_labels, several_splits=True)


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
