"""The loader a `Trainer` builds for a dataset, from HF's data arguments.

Kept out of `Trainer` so that the data side knows no model: the caller passes the model's input
names and label count. HF's arguments honoured here: `remove_unused_columns`, `label_names`,
`dataloader_drop_last`, `dataloader_num_workers`, `dataloader_prefetch_factor`,
`train_sampling_strategy` / `group_by_length` with `length_column_name`, `data_seed`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from jtrain.data.loader import ArrayDataset, HostLoader
from jtrain.data.sources import (
    as_rows,
    check_labels,
    check_not_empty,
    check_single_split,
    is_stream,
    row_lengths,
    stream_rows,
)
from jtrain.data.stream import StreamLoader
from jtrain.errors import ConfigError

logger = logging.getLogger(__name__)


def sampling_strategy(args: Any) -> str:
    """HF: `group_by_length=True` is the older spelling of train_sampling_strategy='group_by_length'."""
    return "group_by_length" if getattr(args, "group_by_length", False) else args.train_sampling_strategy


def make_loader(dataset: Any, args: Any, *, collate: Callable, model_inputs: Sequence[str], train: bool,
                accum: int | None, batch_rows: int, what: str) -> HostLoader | StreamLoader:
    """A `HostLoader` for a sized dataset, a `StreamLoader` for a training stream.

    An evaluation stream is read once into memory (evaluation needs its row count to drop the
    filler rows of the last batch; eval sets are finite).
    """
    options = {"what": what, "model_inputs": model_inputs, "label_names": args.label_names,
               "remove_unused_columns": args.remove_unused_columns}
    workers = max(0, int(args.dataloader_num_workers or 0))
    prefetch = max(1, args.dataloader_prefetch_factor or 2)
    if is_stream(dataset):
        stream = stream_rows(dataset, **options)
        if train:
            if sampling_strategy(args) not in ("random", "sequential"):
                logger.warning("train_sampling_strategy=%r is ignored for a stream without a length: rows come in "
                               "the stream's own order (as HF's Trainer does)", sampling_strategy(args))
            return StreamLoader(stream, global_batch_size=batch_rows, collate_fn=collate, accum_steps=accum,
                                prefetch=prefetch, num_workers=workers, what=what)
        dataset = list(_one_pass(stream))
    rows = as_rows(dataset, **options)
    strategy = sampling_strategy(args) if train else "sequential"
    lengths = None
    if strategy == "group_by_length":  # read before remove_unused_columns could drop the length column
        everything = as_rows(dataset, **{**options, "remove_unused_columns": False})
        lengths = row_lengths(everything, args.length_column_name)
    return HostLoader(rows, global_batch_size=batch_rows,
                      collate_fn=None if isinstance(rows, ArrayDataset) else collate,
                      accum_steps=accum, sampling=strategy, lengths=lengths, seed=args.resolved_data_seed,
                      drop_last=train and args.dataloader_drop_last, prefetch=prefetch, num_workers=workers, what=what)


def _one_pass(stream: Any) -> Any:
    source = stream.source
    for row in source:
        yield row if stream.keep is None else {k: v for k, v in row.items() if k in stream.keep}


def check_dataset(dataset: Any, what: str, *, num_labels: int | None = None, several_splits: bool = False) -> None:
    """What a Trainer checks when it is given a dataset: one split (unless `several_splits`: HF's dict
    of eval sets, or a DatasetDict), not empty, classification labels in [0, num_labels)."""
    if dataset is None:
        return
    if not several_splits:
        check_single_split(dataset, what)
    check_not_empty(dataset, what, several_splits)
    named = several_splits and hasattr(dataset, "items") and not isinstance(dataset, ArrayDataset)
    for name, split in (dataset.items() if named else [(None, dataset)]):
        label = what if name is None else f"{what}[{name!r}]"
        if num_labels is not None and not is_stream(split):
            rows = as_rows(split, what=label, model_inputs=(), label_names=None, remove_unused_columns=False)
            check_labels(rows, num_labels, label)


def default_collator(processing_class: Any, length_buckets: Sequence[int] | None = None) -> Callable:
    """HF's default when a Trainer gets no `data_collator`: pad with the tokenizer when
    `processing_class` is one (rows of different lengths then just work), else stack as they are.

    As in HF each batch is padded to its longest row, which compiles the step once per distinct
    length (jtrain warns when that happens); `length_buckets` (TrainingArguments) pads to the
    smallest bucket that fits instead, so the step compiles at most once per bucket.
    """
    from jtrain.data.collators import DataCollatorWithPadding, DefaultDataCollator, tokenizer_info

    try:  # tokenizer_info reads both tokenizer kinds and refuses anything else (an image processor)
        info = None if processing_class is None else tokenizer_info(processing_class)
    except TypeError:
        info = None
    if info is not None:
        if info.pad_token_id is None:
            raise ConfigError("the Trainer pads rows with its processing_class (HF's default collator), but that "
                              "tokenizer has no pad token: set one (tokenizer.pad_token = tokenizer.eos_token), or "
                              "pass data_collator=DataCollatorWithPadding(pad_token_id=...)")
        buckets = tuple(int(b) for b in length_buckets) if length_buckets else None
        return DataCollatorWithPadding(processing_class, length_buckets=buckets)
    return DefaultDataCollator()
