"""What every task's data builder hands the pipeline, and the pieces they share.

A builder (clm, classification, mlm, sft) returns a `TaskData`: the tokenizer, the training rows
with their collator, evaluation splits already collated into fixed arrays (one compiled eval
shape, and masks or padding that never change between evaluations), the config.json fields the
data decides (vocab size, special ids, labels) and the baseline each split's result is judged
against.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
from tokenizers import Tokenizer

from jtrain.data.collators import default_length_buckets
from jtrain.data.files import FORMATS
from jtrain.data.loader import ArrayDataset
from jtrain.errors import ConfigError, DataError
from jtrain.jsonfile import read_json_object


@dataclass(frozen=True)
class Baseline:
    """A trivial predictor's score on a split: what a trained model must beat to have learned."""

    name: str  # "unigram", "majority_class", "most_frequent_token", "mean_label"
    metric: str  # "loss" or "mse" (lower is better), or "accuracy"
    value: float

    def metrics(self, prefix: str) -> dict[str, float]:
        key = f"{prefix}_{self.name}_baseline"
        out = {f"{key}_{self.metric}": self.value}
        if self.metric == "loss":
            out[f"{key}_perplexity"] = math.exp(min(self.value, 700.0))
        return out

    def describe(self, metrics: dict, prefix: str) -> str:
        """One line: the result beside the baseline."""
        label = self.name.replace("_", "-")
        if self.metric == "loss":
            loss = metrics[f"{prefix}_loss"]
            return (f"{prefix} loss {loss:.4f} (perplexity {math.exp(min(loss, 700.0)):.2f}) vs {label} baseline "
                    f"{self.value:.4f} (perplexity {math.exp(min(self.value, 700.0)):.2f})")
        score = metrics.get(f"{prefix}_{self.metric}")
        shown = "n/a" if score is None else f"{score:.4f}"  # a compute_metrics of the user's may not report it
        return (f"{prefix} {self.metric} {shown} (loss {metrics[f'{prefix}_loss']:.4f}) vs "
                f"{label} baseline {self.metric} {self.value:.4f}")


@dataclass
class TaskData:
    tokenizer: Tokenizer
    train: Any  # ArrayDataset (fixed rows) or a sequence of feature dicts for `collator`; None without training
    collator: Callable | None
    splits: dict[str, ArrayDataset] = field(default_factory=dict)  # "eval", "test": already collated
    baselines: dict[str, Baseline] = field(default_factory=dict)  # per split prefix
    model_config: dict = field(default_factory=dict)  # vocab_size, special ids, num_labels, id2label
    summary: str = ""
    label_names: list[str] | None = None  # classification: the class of each output (None for a regression)
    problem_type: str | None = None  # classification: HF's problem_type of the data
    compute_metrics: Callable | None = None  # what HF's example script computes (None: the Trainer's own)

    @property
    def validation(self) -> ArrayDataset | None:
        return self.splits.get("eval")


TokenizerFactory = Callable[[Sequence[str]], Tokenizer]
"""Given the training texts, the tokenizer to use: the configured one, or one trained on them."""


def read_table(path: str, columns: Sequence[str], what: str = "data file",
               optional: Sequence[str] = ()) -> dict[str, list]:
    """The named columns (and those of `optional` that exist) of one local file, or of a directory
    written by `datasets`' `Dataset.save_to_disk` (one split of a saved `DatasetDict` is its
    `<dir>/<split>` subdirectory), via `datasets`.

    Errors name the file, the missing column and the columns the file has.
    """
    if os.path.isdir(path):
        ds = _load_saved(path, what)
    elif not os.path.isfile(path):
        raise DataError(f"{what} {path!r} not found")
    else:
        fmt = FORMATS.get(os.path.splitext(path)[1].lower())
        if fmt is None:
            raise DataError(f"{what} {path!r}: unknown extension; use one of {sorted(FORMATS)}, or a directory "
                            "written by datasets' save_to_disk")
        ds = _load_quietly(fmt, path)
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise DataError(f"{path!r} has no column {missing[0]!r} (needed by this task); its columns are "
                        f"{ds.column_names}: set the matching *_column option")
    if len(ds) == 0:
        raise DataError(f"{path!r} holds no rows")
    return {c: ds[c] for c in list(columns) + [c for c in optional if c in ds.column_names]}


def _load_saved(path: str, what: str) -> Any:
    """A `Dataset.save_to_disk` directory; a whole saved DatasetDict is refused naming its splits."""
    dict_file = os.path.join(path, "dataset_dict.json")
    if os.path.isfile(dict_file):
        splits = read_json_object(dict_file, what="a saved DatasetDict's index", error=DataError).get("splits", [])
        raise DataError(f"{what} {path!r} holds a saved DatasetDict with splits {list(splits)}: point the option at "
                        f"one split's directory, e.g. {os.path.join(path, str(splits[0]) if splits else 'train')!r}")
    if not os.path.isfile(os.path.join(path, "state.json")):
        raise DataError(f"{what} {path!r} is a directory but not one written by datasets' save_to_disk (no "
                        "state.json); give a file (.txt .json .jsonl .csv .parquet) or such a directory")
    import datasets

    try:
        return datasets.load_from_disk(path)
    except Exception as err:  # a damaged arrow file or state.json: name the directory
        raise DataError(f"cannot read the saved dataset {path!r}: {str(err).splitlines()[0]}") from err


def _load_quietly(fmt: str, path: str) -> Any:
    """`datasets.load_dataset` without its progress bars; a broken file is named with its line."""
    from jtrain.data.files import load_local_dataset

    return load_local_dataset(path, fmt)


def first(rows: list, limit: int | None) -> list:
    return rows if limit is None else rows[:limit]


def resolve_buckets(buckets: Sequence[int] | None, max_length: int) -> tuple[int, ...]:
    """Padded lengths a run may compile for: the user's, or geometric ones up to `max_length`."""
    if buckets:
        buckets = tuple(sorted(int(b) for b in buckets))
        if buckets[-1] < max_length:
            raise ConfigError(f"the largest length bucket {buckets[-1]} is below max_seq_length {max_length}: "
                              "add a bucket of max_seq_length")
        return buckets
    return default_length_buckets(max_length, multiple=min(32, max_length))


def collate_all(features: list[dict], collator: Callable) -> ArrayDataset:
    """One fixed array dataset of every row (evaluation: one shape, one compilation)."""
    if not features:
        raise DataError("an evaluation split is empty")
    return ArrayDataset(collator(features))


def predicted_label_mask(labels_BL: np.ndarray, shifted: bool) -> np.ndarray:
    """Positions whose label is scored (causal losses score labels[:, 1:])."""
    scored = labels_BL != -100
    if shifted:
        scored[:, 0] = False
    return scored


def unigram_loss(train_ids: np.ndarray, eval_ids: np.ndarray, vocab_size: int) -> float:
    """Nats per token of an add-one unigram model fit on `train_ids`, scored on `eval_ids`."""
    counts = np.bincount(np.asarray(train_ids, np.int64), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[np.asarray(eval_ids, np.int64)].mean()) if len(eval_ids) else float("nan")
