"""Preparing batches ahead of the step: one prefetch thread, or a pool of worker threads.

Why threads, not processes: collation is numpy work that releases the GIL for the heavy parts,
the placed batches must end up in this process's device buffers anyway, and threads need no
pickling of the dataset or the collator. Order never depends on the worker count: each batch is a
pure function of its index, the workers only compute them, and results are yielded in index order.
HF's meaning of `dataloader_prefetch_factor` holds: at most `num_workers * prefetch_factor`
batches are prepared ahead of the one the step consumes.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

_DONE = object()


def prepared(makers: Iterator[Callable[[], Any]], *, num_workers: int, prefetch: int) -> Iterator[Any]:
    """Results of `makers`, in order: made inline (prefetch <= 0 and no workers), by one background
    thread `prefetch` ahead (no workers), or by `num_workers` threads, `num_workers * prefetch` ahead."""
    if num_workers > 0:
        return _pooled(makers, num_workers, num_workers * max(prefetch, 1))
    if prefetch <= 0:
        return (make() for make in makers)
    return _prefetched(makers, prefetch)


def _pooled(makers: Iterator[Callable[[], Any]], workers: int, depth: int) -> Iterator[Any]:
    """Submit up to `depth` makers to a thread pool; yield their results in submission order."""
    pool = ThreadPoolExecutor(workers, thread_name_prefix="jtrain-data-worker")
    pending: deque[Future] = deque()
    try:
        for make in makers:
            pending.append(pool.submit(make))
            if len(pending) >= depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


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
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, which re-raises it
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
