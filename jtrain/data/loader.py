"""The host loader: a pure function from (seed, epoch, position) to a global, sharded batch.

Why pure: resuming at update N starts there directly, in constant time, without replaying
earlier batches; the loader's whole state is `LoaderPosition(epoch, batch_index)`. Batches are
padded to a static shape (a short last batch gets rows with no real tokens, so it adds nothing
to the summed loss) and prepared and transferred ahead of the step by a background thread.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import numpy as np

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
        fill = np.full((missing,) + value.shape[1:], _PAD_VALUES.get(key, 0), dtype=value.dtype)
        out[key] = np.concatenate([value, fill])
    return out


def epoch_order(num_rows: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """Row order of one epoch: a pure function of (seed, epoch)."""
    if not shuffle:
        return np.arange(num_rows)
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


class HostLoader:
    """Global batches of `global_batch_size` rows, shaped [accum, rows / accum, ...] when accum > 1.

    Each process collates only its own contiguous share of every global batch, and the global
    array is assembled from the process-local pieces by `place`.
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
    ):
        if len(dataset) == 0:
            raise DataError("the dataset is empty: check the data files and split")
        self.dataset, self.collate_fn = dataset, collate_fn
        self.global_batch_size, self.accum_steps = global_batch_size, accum_steps
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.place, self.prefetch = place or (lambda b: b), prefetch
        self.num_processes, self.process_index = jax.process_count(), jax.process_index()
        if global_batch_size % self.num_processes:
            raise DataError(f"global batch {global_batch_size} does not divide over {self.num_processes} processes")
        if drop_last and len(dataset) < global_batch_size:
            raise DataError(f"the dataset has {len(dataset)} rows, fewer than one batch of {global_batch_size} "
                            "with dataloader_drop_last=True")

    def __len__(self) -> int:
        n, b = len(self.dataset), self.global_batch_size
        return n // b if self.drop_last else -(-n // b)

    def host_batch(self, epoch: int, batch_index: int) -> dict[str, np.ndarray]:
        """This process's rows of global batch `batch_index` of `epoch`, collated and padded."""
        order = epoch_order(len(self.dataset), self.seed, epoch, self.shuffle)
        per_process = self.global_batch_size // self.num_processes
        start = batch_index * self.global_batch_size + self.process_index * per_process
        indices = order[start:start + per_process]
        if isinstance(self.dataset, ArrayDataset):
            batch = self.dataset.take(indices) if len(indices) else _empty_like(self.dataset)
        else:
            batch = self.collate_fn([self.dataset[int(i)] for i in indices])
        batch = pad_rows(batch, per_process)
        if self.accum_steps:
            batch = {k: v.reshape((self.accum_steps, per_process // self.accum_steps) + v.shape[1:])
                     for k, v in batch.items()}
        return batch

    def iterate(self, epoch: int, start: int = 0) -> Iterator[Any]:
        """Placed batches of `epoch` from batch `start`, prepared ahead in a background thread."""
        indices = range(start, len(self))
        if self.prefetch <= 0:
            for i in indices:
                yield self.place(self.host_batch(epoch, i))
            return
        yield from _prefetched((lambda i=i: self.place(self.host_batch(epoch, i)) for i in indices), self.prefetch)


def _empty_like(dataset: ArrayDataset) -> dict[str, np.ndarray]:
    return {k: v[:0] for k, v in dataset.columns.items()}


_DONE = object()


def _prefetched(makers: Iterator[Callable[[], Any]], depth: int) -> Iterator[Any]:
    """Run the makers in a daemon thread, `depth` ahead; exceptions re-raise in the consumer."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work() -> None:
        try:
            for make in makers:
                if stop.is_set():
                    return
                q.put(make())
            q.put(_DONE)
        except BaseException as err:  # hand the error to the consumer
            q.put(err)

    thread = threading.Thread(target=work, daemon=True, name="jtrain-prefetch")
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        # Unblock a worker waiting on a full queue so that it sees `stop` and exits (no leaked thread
        # when the consumer stops early, e.g. at max_steps or should_training_stop).
        stop.set()
        while thread.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)
