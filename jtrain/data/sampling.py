"""Row order of an epoch: a pure function of (seed, epoch), for every `train_sampling_strategy`.

Why pure: the loader's whole state is `LoaderPosition(epoch, batch_index)`, so a resumed run
recomputes the same order and starts at its batch directly. `group_by_length` follows HF's
`LengthGroupedSampler`: a random permutation cut into megabatches of
`min(n // (4 * batch), 50) * batch` rows, each sorted longest first, and the longest row of the
epoch swapped to the very front (an out-of-memory error shows on the first step, not late).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jtrain.errors import ConfigError

STRATEGIES = ("random", "sequential", "group_by_length")


def random_order(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation that depends only on (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


def length_grouped_order(lengths: Sequence[int], batch_size: int, perm: np.ndarray,
                         mega_batch_mult: int | None = None) -> np.ndarray:
    """HF's `get_length_grouped_indices`, with the random permutation `perm` given (not drawn).

    >>> length_grouped_order([1, 5, 3, 2], 2, np.array([0, 1, 2, 3])).tolist()
    [1, 0, 2, 3]
    """
    lengths = np.asarray(lengths)
    n = len(lengths)
    if mega_batch_mult is None:
        mega_batch_mult = max(min(n // (batch_size * 4), 50), 1)
    size = mega_batch_mult * batch_size
    megabatches = []
    for start in range(0, n, size):
        chunk = np.asarray(perm[start:start + size])
        # Stable sort on the negated length == Python's sorted(..., reverse=True) that HF uses.
        megabatches.append(chunk[np.argsort(-lengths[chunk], kind="stable")])
    longest = int(np.argmax([lengths[m[0]] for m in megabatches]))
    first, other = megabatches[0][0], megabatches[longest][0]
    megabatches[0][0], megabatches[longest][0] = other, first
    return np.concatenate(megabatches)


def epoch_order(num_rows: int, seed: int, epoch: int, strategy: str = "random",
                lengths: Sequence[int] | None = None, batch_size: int = 1) -> np.ndarray:
    """Row order of one epoch for `strategy` ("random", "sequential", "group_by_length")."""
    if strategy == "sequential":
        return np.arange(num_rows)
    if strategy == "random":
        return random_order(num_rows, seed, epoch)
    if strategy == "group_by_length":
        if lengths is None or len(lengths) != num_rows:
            raise ConfigError("group_by_length needs one length per row (the `length_column_name` column, or "
                              "rows with `input_ids`)")
        return length_grouped_order(lengths, batch_size, random_order(num_rows, seed, epoch))
    raise ConfigError(f"`train_sampling_strategy` must be one of {list(STRATEGIES)}, got {strategy!r}")
