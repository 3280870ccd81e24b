"""What a `Trainer` accepts as a dataset, and how each kind becomes rows for the loader.

Accepted: a list (or any sized sequence) of feature dicts, a dict of equal-length columns, an
`ArrayDataset`, an HF `datasets.Dataset`, and for training a stream without a length (an HF
streaming `IterableDataset`, or any iterable of row dicts). A `DatasetDict` is refused where one
split is needed, naming its splits, as HF users meet it. `remove_unused_columns` drops the
columns no model input, label or collator uses, as HF's Trainer does for `datasets` objects.

`datasets` is imported only when the caller already did (an HF object can only exist then), so
plain lists never pay its import time.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from jtrain.data.loader import ArrayDataset
from jtrain.errors import DataError

logger = logging.getLogger(__name__)

LABEL_COLUMNS = ("labels", "label", "label_ids")
COLLATOR_COLUMNS = ("special_tokens_mask", "completion_mask")
"""Columns jtrain's collators consume besides model inputs and labels (kept by remove_unused_columns)."""


def _datasets() -> Any:
    return sys.modules.get("datasets")


def is_dataset_dict(obj: Any) -> bool:
    ds = _datasets()
    return ds is not None and isinstance(obj, (ds.DatasetDict, ds.IterableDatasetDict))


def is_hf_dataset(obj: Any) -> bool:
    ds = _datasets()
    return ds is not None and isinstance(obj, ds.Dataset)


def is_stream(obj: Any) -> bool:
    """A source without a length: iterated, never indexed (HF's IterableDataset or a generator)."""
    if isinstance(obj, (ArrayDataset, Mapping, str, bytes)):
        return False
    return isinstance(obj, Iterable) and not hasattr(obj, "__len__")


def num_rows(obj: Any) -> int | None:
    """Rows in a sized source (a dict of columns counts its rows, not its keys); None for a stream."""
    if is_stream(obj):
        return None
    return len(ColumnRows(obj)) if isinstance(obj, Mapping) and not isinstance(obj, ArrayDataset) else len(obj)


def check_single_split(obj: Any, what: str) -> None:
    """HF users pass `load_dataset(...)` (a DatasetDict) where one split is meant: say which splits exist."""
    if is_dataset_dict(obj):
        splits = list(obj.keys())
        example = splits[0] if splits else "train"
        raise DataError(f"`{what}` is a DatasetDict with splits {splits}; pass one split, e.g. "
                        f"{what}=dataset[{example!r}] (or load_dataset(..., split={example!r}))")


def check_not_empty(obj: Any, what: str, several_splits: bool = False) -> None:
    """An empty dataset (or an empty split of a DatasetDict) is named before anything is compiled.

    `several_splits`: a plain dict is several named datasets (HF's dict of eval sets), not columns.
    """
    if is_dataset_dict(obj) or (several_splits and isinstance(obj, Mapping) and not isinstance(obj, ArrayDataset)):
        for name, split in obj.items():
            check_not_empty(split, f"{what}[{name!r}]")
        return
    if is_stream(obj):
        return
    size = len(ColumnRows(obj)) if isinstance(obj, Mapping) and not isinstance(obj, ArrayDataset) else len(obj)
    if size == 0:
        split = getattr(obj, "split", None)
        where = f" (split {str(split)!r})" if split is not None else ""
        raise DataError(f"`{what}`{where} is empty: check the data files, the split name and any filter")


class ColumnRows(Sequence):
    """A dict of equal-length columns seen as a sequence of row dicts."""

    def __init__(self, columns: Mapping[str, Sequence]):
        lengths = {k: len(v) for k, v in columns.items()}
        if len(set(lengths.values())) > 1:
            raise DataError(f"the dataset's columns have different numbers of rows: {lengths}")
        self.columns, self._n = dict(columns), next(iter(lengths.values()), 0)

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: Any) -> dict:  # type: ignore[override]
        return {k: v[int(i)] for k, v in self.columns.items()}

    @property
    def column_names(self) -> list[str]:
        return list(self.columns)


class HFDatasetRows(Sequence):
    """An HF `datasets.Dataset` as rows; a batch is fetched with one indexed read, not row by row."""

    def __init__(self, dataset: Any):
        self.dataset = dataset.with_format(None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: Any) -> dict:  # type: ignore[override]
        return self.dataset[int(i)]

    def take_rows(self, indices: Sequence[int]) -> list[dict]:
        if len(indices) == 0:
            return []
        columns = self.dataset[[int(i) for i in indices]]
        return [{k: v[j] for k, v in columns.items()} for j in range(len(indices))]

    @property
    def column_names(self) -> list[str]:
        return list(self.dataset.column_names)


def kept_columns(columns: Sequence[str], model_inputs: Sequence[str], label_names: Sequence[str] | None,
                 extra: Sequence[str] = ()) -> list[str]:
    """HF's `_remove_unused_columns`: model inputs, labels (label, label_ids, label_names) survive."""
    wanted = set(model_inputs) | set(LABEL_COLUMNS) | set(label_names or ()) | set(COLLATOR_COLUMNS) | set(extra)
    return [c for c in columns if c in wanted]


def _drop_unused(columns: Sequence[str], keep: list[str], what: str, model_inputs: Sequence[str]) -> None:
    if not keep:
        raise DataError(f"no column of `{what}` is a model input or a label: it has {list(columns)}, the model takes "
                        f"{list(model_inputs)} and labels come from {list(LABEL_COLUMNS)} or `label_names`; rename "
                        "the columns (or tokenize the text) or set remove_unused_columns=False")
    dropped = [c for c in columns if c not in keep]
    if dropped:
        logger.info("the following columns of %s are not model inputs or labels and have been ignored: %s "
                    "(remove_unused_columns=True)", what, ", ".join(dropped))


def as_rows(obj: Any, *, what: str, model_inputs: Sequence[str], label_names: Sequence[str] | None,
            remove_unused_columns: bool) -> Any:
    """The loader's view of a sized source: an ArrayDataset, or an indexable sequence of row dicts."""
    check_single_split(obj, what)
    if isinstance(obj, ArrayDataset):
        return obj
    if is_hf_dataset(obj):
        if remove_unused_columns:
            keep = kept_columns(obj.column_names, model_inputs, label_names)
            _drop_unused(obj.column_names, keep, what, model_inputs)
            obj = obj.select_columns(keep)
        return HFDatasetRows(obj)
    if isinstance(obj, Mapping):
        return ColumnRows(obj)
    return obj


def stream_rows(obj: Any, *, what: str, model_inputs: Sequence[str], label_names: Sequence[str] | None,
                remove_unused_columns: bool) -> RowStream:
    """The loader's view of a stream; HF streaming datasets lose their unused columns row by row."""
    check_single_split(obj, what)
    keep = None
    ds = _datasets()
    if remove_unused_columns and ds is not None and isinstance(obj, ds.IterableDataset):
        names = obj.column_names  # None when the stream's features are not known up front
        if names is not None:
            keep = kept_columns(names, model_inputs, label_names)
            _drop_unused(names, keep, what, model_inputs)
    return RowStream(obj, keep)


class RowStream:
    """An iterable of row dicts that restarts for another pass, as HF's epoch loop re-iterates.

    A one-shot iterator (a generator) cannot restart: running past its end is an error that
    says so, rather than a silently shorter run.
    """

    def __init__(self, source: Iterable, keep: Sequence[str] | None = None):
        self.source, self.keep = source, None if keep is None else set(keep)

    def passes(self) -> Iterator[dict]:
        """Rows of pass 0, 1, 2, ... back to back (set_epoch(pass) first, for shuffling streams)."""
        n_pass, seen = 0, 0
        while True:
            if hasattr(self.source, "set_epoch"):
                self.source.set_epoch(n_pass)
            count = 0
            for row in self.source:
                if not isinstance(row, Mapping):
                    raise DataError(f"row {seen} of the stream is a {type(row).__name__}, expected a dict of features")
                count += 1
                seen += 1
                yield row if self.keep is None else {k: v for k, v in row.items() if k in self.keep}
            if count == 0:
                raise DataError("the training stream is empty" if n_pass == 0 else
                                f"the training stream yielded no rows on pass {n_pass} after {seen} rows: a "
                                "one-shot iterator (a generator) cannot be read twice; pass a re-iterable source "
                                "(a datasets.IterableDataset, or an object whose __iter__ starts over) or lower "
                                "max_steps")
            n_pass += 1


def row_lengths(rows: Any, length_column: str | None, model_input: str = "input_ids") -> np.ndarray:
    """Per-row lengths for group_by_length: the length column if present, else len(row[input_ids])."""
    if isinstance(rows, ArrayDataset):
        if length_column and length_column in rows.columns:
            return np.asarray(rows.columns[length_column])
        mask = rows.columns.get("attention_mask")
        if mask is not None:
            return np.asarray(mask).sum(axis=1)
        return np.full(len(rows), np.shape(rows.columns[model_input])[1])
    names = getattr(rows, "column_names", None)
    if isinstance(rows, HFDatasetRows) and length_column in (names or ()):
        return np.asarray(rows.dataset[length_column])
    if isinstance(rows, ColumnRows) and length_column in rows.columns:
        return np.asarray(rows.columns[length_column])
    source = rows.dataset if isinstance(rows, HFDatasetRows) else None
    if source is not None and model_input in source.column_names:
        return np.asarray([len(x) for x in source[model_input]])
    lengths = []
    for i in range(len(rows)):
        row = rows[i]
        if length_column and length_column in row:
            lengths.append(int(row[length_column]))
        elif model_input in row:
            lengths.append(len(row[model_input]))
        else:
            raise DataError(f"group_by_length: row {i} has neither the length column {length_column!r} nor "
                            f"{model_input!r}; its keys are {sorted(row)}: set length_column_name")
    return np.asarray(lengths)


def check_labels(rows: Any, num_labels: int, what: str) -> None:
    """Classification labels must lie in [0, num_labels) (or be -100): name the first bad row."""
    if isinstance(rows, ArrayDataset):
        values = rows.columns.get("labels")
        _check_label_values(values, num_labels, what)
        return
    if isinstance(rows, HFDatasetRows):
        for key in LABEL_COLUMNS:
            if key in rows.column_names:
                _check_label_values(rows.dataset[key], num_labels, what)
        return
    for i in range(len(rows)):
        row = rows[i]
        if isinstance(row, Mapping):
            for key in LABEL_COLUMNS:
                if key in row:
                    _check_label(row[key], num_labels, what, i)


def _check_label_values(values: Any, num_labels: int, what: str) -> None:
    if values is None:
        return
    arr = np.asarray(values)
    if arr.dtype.kind not in "iu" or arr.ndim != 1:
        return  # float (regression / multi-label) targets or per-token labels: no class range to check
    bad = np.flatnonzero(((arr < 0) | (arr >= num_labels)) & (arr != -100))
    if bad.size:
        _check_label(arr[bad[0]], num_labels, what, int(bad[0]))


def _check_label(value: Any, num_labels: int, what: str, row: int) -> None:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        return
    if value != -100 and not 0 <= value < num_labels:
        raise DataError(f"`{what}` row {row} has label {int(value)}, outside [0, {num_labels}) for a model with "
                        f"num_labels={num_labels}: fix the data or set num_labels in the model config")
