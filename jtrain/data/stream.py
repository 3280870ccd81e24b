"""The loader for a training stream without a length (HF streaming `IterableDataset`, a generator).

A stream cannot seek, so it has no epochs of known size: the rows of pass 0, 1, 2, ... are read
back to back (HF's Trainer re-iterates an exhausted `IterableDataset` the same way, calling its
`set_epoch`), and global batch N is rows [N * B, (N + 1) * B) of that sequence. The run needs
`max_steps`, as HF requires. Resuming at batch N replays the stream from its start and skips the
N * B rows already consumed (reading, not collating or transferring them): the resumed run sees
exactly the batches an uninterrupted run would have, at the cost of re-reading those rows.
Sampling strategies do not apply (HF ignores them for streams too): rows come in stream order.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from jtrain.data.background import prepared
from jtrain.data.loader import Collate, collate_rows, shape_share
from jtrain.data.sources import RowStream
from jtrain.errors import DataError


class StreamLoader:
    """Global batches of `global_batch_size` rows from a `RowStream`, in stream order.

    Same interface as `HostLoader` (`iterate(epoch, start)`, `place`); `epoch` is always 0 for a
    stream (the run is one long epoch of `max_steps` updates). With several processes each reads
    the stream and collates only its contiguous share of every global batch.
    """

    def __init__(self, stream: RowStream, *, global_batch_size: int, collate_fn: Collate,
                 accum_steps: int | None = None, place: Callable[[dict[str, np.ndarray]], Any] | None = None,
                 prefetch: int = 2, num_workers: int = 0, what: str = "the training stream"):
        self.dataset, self.collate_fn, self.what = stream, collate_fn, what
        self.global_batch_size, self.accum_steps = global_batch_size, accum_steps
        self.place, self.prefetch, self.num_workers = place or (lambda b: b), prefetch, num_workers
        self.num_processes, self.process_index = jax.process_count(), jax.process_index()
        if global_batch_size % self.num_processes:
            raise DataError(f"global batch {global_batch_size} does not divide over {self.num_processes} processes")

    def _shares(self, start: int) -> Iterator[tuple[int, list[dict]]]:
        """(batch index, this process's rows) from batch `start` on, after skipping earlier rows."""
        rows = self.dataset.passes()
        skipped = start * self.global_batch_size
        if skipped:
            consumed = sum(1 for _ in itertools.islice(rows, skipped))
            if consumed < skipped:  # pragma: no cover - passes() restarts or raises first
                raise DataError(f"{self.what} ended after {consumed} rows while skipping to batch {start}")
        per = self.global_batch_size // self.num_processes
        lo = self.process_index * per
        for index in itertools.count(start):
            batch_rows = list(itertools.islice(rows, self.global_batch_size))
            yield index, batch_rows[lo:lo + per]

    def host_batch(self, epoch: int, batch_index: int) -> dict[str, np.ndarray]:
        """This process's share of global batch `batch_index` (reads the stream up to it: O(index))."""
        index, rows = next(self._shares(batch_index))
        return self.host_batch_from(index, rows)

    def shape_probe(self) -> dict[str, np.ndarray]:
        """A batch shaped like the training batches (the stream's first), for planning only."""
        index, rows = next(self._shares(0))
        return self.host_batch_from(index, rows)

    def host_batch_from(self, index: int, rows: list[dict]) -> dict[str, np.ndarray]:
        per = self.global_batch_size // self.num_processes
        first = index * self.global_batch_size + self.process_index * per
        step = index * self.num_processes + self.process_index
        batch = collate_rows(self.collate_fn, rows, step, list(range(first, first + len(rows))), self.what)
        return shape_share(batch, per, self.accum_steps)

    def __iter__(self) -> Iterator[Any]:
        """The stream's batches from its start, like iterating a DataLoader."""
        return iter(self.iterate(0))

    def iterate(self, epoch: int = 0, start: int = 0) -> Iterator[Any]:
        """Placed batches from batch `start`, endlessly (the loop stops at max_steps)."""
        makers = (lambda i=i, r=r: self.place(self.host_batch_from(i, r)) for i, r in self._shares(start))
        return prepared(makers, num_workers=self.num_workers, prefetch=self.prefetch)
