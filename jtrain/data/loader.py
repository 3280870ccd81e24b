"""The host loader: a pure function from (seed, epoch, position) to a global, sharded batch.

Why pure: resuming at update N starts there directly, in constant time, without replaying
earlier batches; the loader's whole state is `LoaderPosition(epoch, batch_index)`. Batches are
padded to a static shape (a short last batch gets rows with no real tokens, so it adds nothing
to the summed loss) and prepared and transferred ahead of the step in the background (`jtrain.data.background`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from jtrain.data.background import prepared
from jtrain.data.sampling import epoch_order
from jtrain.errors import DataError
from jtrain.losses import IGNORE_INDEX

Collate = Callable[[list[dict]], dict[str, np.ndarray]]
# Filler values for rows that only pad a batch to its static shape.
_PAD_VALUES = {"labels": IGNORE_INDEX, "attention_mask": 0, "segment_ids": 0}


@dataclass(frozen=True)
class LoaderPosition:
    """Where the next batch starts: saved with each checkpoint."""

    epoch: int = 0
    batch_index: int = 0

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "batch_index": self.batch_index}


class ArrayDataset:
    """Rows already padded to one length, as a dict of equal-length numpy arrays (fast path)."""

    def __init__(self, columns: Mapping[str, np.ndarray]):
        lengths = {k: len(v) for k, v in columns.items()}
        if len(set(lengths.values())) != 1:
            raise DataError(f"columns have different numbers of rows: {lengths}")
        self.columns = {k: np.asarray(v) for k, v in columns.items()}
        self.num_rows = next(iter(lengths.values()))

    def __len__(self) -> int:
        return self.num_rows

    def take(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        return {k: v[indices] for k, v in self.columns.items()}


def pad_rows(batch: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """Append filler rows (no real tokens, labels ignored) so that the batch has `rows` rows."""
    missing = rows - len(next(iter(batch.values())))
    if missing <= 0:
        return batch
    out = {}
    for key, value in batch.items():
        # Float labels (regression, multi-label targets) take NaN: -100 would be a target like any other.
        pad = np.nan if key == "labels" and value.dtype.kind == "f" else _PAD_VALUES.get(key, 0)
        fill = np.full((missing,) + value.shape[1:], pad, dtype=value.dtype)
        out[key] = np.concatenate([value, fill])
    return out


class HostLoader:
    """Global batches of `global_batch_size` rows, shaped [accum, rows / accum, ...] when accum > 1.

    Each process collates only its own contiguous share of every global batch, and the global
    array is assembled from the process-local pieces by `place`. `sampling` is HF's
    `train_sampling_strategy` ("random", "sequential", "group_by_length" with `lengths`);
    `num_workers` threads prepare batches `prefetch` each ahead (see `jtrain.data.background`).
    A collator with `rng_for_step` (MLM masking) gets the generator of the batch's global index,
    so its masks too are a function of (seed, epoch, position), for any worker count or resume.
    """

    def __init__(
        self,
        dataset: ArrayDataset | Sequence[dict],
        *,
        global_batch_size: int,
        collate_fn: Collate | None = None,
        accum_steps: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        place: Callable[[dict[str, np.ndarray]], Any] | None = None,
        prefetch: int = 2,
        num_workers: int = 0,
        sampling: str | None = None,
        lengths: Sequence[int] | None = None,
        what: str = "the dataset",
    ):
        if len(dataset) == 0:
            raise DataError(f"{what} is empty: check the data files and split")
        if num_workers < 0:
            raise DataError(f"dataloader_num_workers must be >= 0, got {num_workers}")
        self.dataset, self.collate_fn, self.what = dataset, collate_fn, what
        self.global_batch_size, self.accum_steps = global_batch_size, accum_steps
        self.sampling = sampling or ("random" if shuffle else "sequential")
        self.shuffle, self.seed, self.drop_last = self.sampling != "sequential", seed, drop_last
        self.lengths = None if lengths is None else np.asarray(lengths)
        self.place, self.prefetch, self.num_workers = place or (lambda b: b), prefetch, num_workers
        self.num_processes, self.process_index = jax.process_count(), jax.process_index()
        self._order_cache: tuple[int, np.ndarray] | None = None
        if global_batch_size % self.num_processes:
            raise DataError(f"global batch {global_batch_size} does not divide over {self.num_processes} processes")
        if drop_last and len(dataset) < global_batch_size:
            raise DataError(f"{what} has {len(dataset)} rows, fewer than one batch of {global_batch_size} "
                            "with dataloader_drop_last=True")

    def __len__(self) -> int:
        n, b = len(self.dataset), self.global_batch_size
        return n // b if self.drop_last else -(-n // b)

    def order(self, epoch: int) -> np.ndarray:
        """Row order of `epoch` (cached: every batch of an epoch reads it)."""
        if self._order_cache is None or self._order_cache[0] != epoch:
            order = epoch_order(len(self.dataset), self.seed, epoch, self.sampling, self.lengths,
                                self.global_batch_size)
            self._order_cache = (epoch, order)
        return self._order_cache[1]

    def shape_probe(self) -> dict[str, np.ndarray]:
        """A batch shaped like the training batches, for planning only (compiling on abstract
        inputs); it is not a training batch, so the loader's position is not involved."""
        return self._batch(0, 0)

    def host_batch(self, epoch: int, batch_index: int) -> dict[str, np.ndarray]:
        """This process's rows of global batch `batch_index` of `epoch`, collated and padded."""
        return self._batch(epoch, batch_index)

    def _batch(self, epoch: int, batch_index: int) -> dict[str, np.ndarray]:
        per_process = self.global_batch_size // self.num_processes
        start = batch_index * self.global_batch_size + self.process_index * per_process
        indices = self.order(epoch)[start:start + per_process]
        if isinstance(self.dataset, ArrayDataset):
            batch = self.dataset.take(indices) if len(indices) else _empty_like(self.dataset)
        else:
            rows = self.dataset.take_rows(indices) if hasattr(self.dataset, "take_rows") else [
                self.dataset[int(i)] for i in indices]
            step = (epoch * len(self) + batch_index) * self.num_processes + self.process_index
            batch = collate_rows(self.collate_fn, rows, step, [int(i) for i in indices], self.what)
        return shape_share(batch, per_process, self.accum_steps)

    def __iter__(self) -> Iterator[Any]:
        """The first epoch's batches, like iterating a DataLoader (host arrays until a Trainer sets `place`)."""
        return iter(self.iterate(0))

    def iterate(self, epoch: int, start: int = 0) -> Iterator[Any]:
        """Placed batches of `epoch` from batch `start`, prepared ahead in the background."""
        makers = (lambda i=i: self.place(self.host_batch(epoch, i)) for i in range(start, len(self)))
        return prepared(makers, num_workers=self.num_workers, prefetch=self.prefetch)


_ROW = re.compile(r"\b(row|feature|features) (\d+)")


def collate_rows(collate_fn: Collate, rows: list, step: int, where: list, what: str) -> dict[str, np.ndarray]:
    """`collate_fn(rows)`, with its per-step generator if it has one; errors name the dataset rows.

    Collators name the row of the batch ("row 3"); `where[i]` is the dataset row (or stream row)
    of batch row i, so the message is rewritten to name the row the user can look up.
    """
    try:
        if hasattr(collate_fn, "rng_for_step"):
            return _host_arrays(collate_fn(rows, rng=collate_fn.rng_for_step(step)))
        return _host_arrays(collate_fn(rows))
    except (ValueError, KeyError, TypeError) as err:
        text = str(err.args[0]) if err.args else str(err)

        def name(match: re.Match) -> str:
            i = int(match.group(2))
            return f"{what} row {where[i]}" if i < len(where) else match.group(0)

        hint = ("; rows of different lengths need padding: pass data_collator=DataCollatorWithPadding(...)"
                if "rows differ in shape" in text else "")
        raise DataError(f"cannot collate a batch of {what}: {_ROW.sub(name, text)}{hint}") from err


def _host_arrays(batch: Any) -> Any:
    """A `transformers` collator returns torch tensors by default (`return_tensors="pt"`), which JAX
    cannot read ("Cannot interpret 'torch.int64' as a data type"): they become numpy arrays here,
    so HF's collators work as they come. Anything else passes through unchanged."""
    if not isinstance(batch, Mapping):
        return batch
    return {k: v.detach().cpu().numpy() if hasattr(v, "detach") and hasattr(v, "numpy") else v
            for k, v in batch.items()}


def shape_share(batch: dict[str, np.ndarray], rows: int, accum: int | None) -> dict[str, np.ndarray]:
    """Pad a process's share to `rows` rows and split it into `accum` micro-batches."""
    batch = pad_rows(batch, rows)
    if accum:
        batch = {k: v.reshape((accum, rows // accum) + v.shape[1:]) for k, v in batch.items()}
    return batch


def _empty_like(dataset: ArrayDataset) -> dict[str, np.ndarray]:
    return {k: v[:0] for k, v in dataset.columns.items()}
