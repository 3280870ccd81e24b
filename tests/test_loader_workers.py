"""dataloader_num_workers / dataloader_prefetch_factor: background preparation, same batches (issue #7)."""

import threading
import time

import numpy as np
import pytest
from tokenizers import Tokenizer, models

from jtrain.data.background import prepared
from jtrain.data.collators import (
    DataCollatorForLanguageModeling,
    DataCollatorWithPadding,
)
from jtrain.data.loader import HostLoader
from jtrain.errors import DataError


def _rows(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(5, 60, size=int(rng.integers(3, 20))).tolist()} for _ in range(n)]




def _mlm_collator():
    """MLM masking (random per batch): its masks must follow the batch index, not the call order."""
    vocab = {"[PAD]": 0, "[MASK]": 1, **{f"t{i}": i for i in range(2, 64)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[PAD]"))
    tok.add_special_tokens(["[PAD]", "[MASK]"])
    return DataCollatorForLanguageModeling(tok, mlm=True, seed=7, length_buckets=(8, 16, 32))


MLM = _mlm_collator()


def _epoch(loader, epoch=1, start=0):
    return [{k: v.copy() for k, v in b.items()} for b in loader.iterate(epoch, start)]


@pytest.mark.parametrize("collate", [DataCollatorWithPadding(pad_token_id=0, length_buckets=(8, 16, 32)), MLM],
                         ids=["padding", "mlm"])
def test_same_batches_for_any_worker_count_and_on_resume(collate):
    runs = {}
    for workers in (0, 1, 3):
        loader = HostLoader(_rows(), global_batch_size=8, collate_fn=collate, accum_steps=2, seed=3,
                            num_workers=workers, prefetch=2)
        runs[workers] = _epoch(loader)
    for workers in (1, 3):
        assert len(runs[workers]) == len(runs[0]) == 5
        for a, b in zip(runs[0], runs[workers]):
            assert a.keys() == b.keys()
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])
    # Resuming at batch 2 (fresh loader, MLM masks included) equals the uninterrupted batches 2..4.
    resumed = _epoch(HostLoader(_rows(), global_batch_size=8, collate_fn=collate, accum_steps=2, seed=3,
                                num_workers=3), start=2)
    for a, b in zip(runs[0][2:], resumed):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize("workers,factor", [(1, 1), (2, 2), (3, 1)])
def test_prefetch_factor_bounds_the_batches_prepared_ahead(workers, factor):
    made, lock = [], threading.Lock()

    def make(i):
        with lock:
            made.append(i)
        return i

    it = prepared((lambda i=i: make(i) for i in range(50)), num_workers=workers, prefetch=factor)
    taken = [next(it) for _ in range(3)]
    time.sleep(0.3)  # let the workers run as far ahead as they are allowed
    with lock:
        ahead = len(made) - len(taken)
    # HF's meaning: num_workers * prefetch_factor batches are loaded in advance, no more.
    assert taken == [0, 1, 2]
    assert ahead <= workers * factor
    assert ahead == workers * factor - 1  # the next one is submitted when the consumer asks for it
    assert list(it) == list(range(3, 50))


def test_worker_errors_reach_the_consumer_with_the_dataset_row():
    rows = _rows(16)
    rows[11] = {"input_ids": list(range(1, 40))}  # longer than the largest bucket
    loader = HostLoader(rows, global_batch_size=4, collate_fn=DataCollatorWithPadding(pad_token_id=0,
                                                                                      length_buckets=(8, 16, 32)),
                        shuffle=False, num_workers=2)
    with pytest.raises(DataError, match="the dataset row 11 has length 39, longer than the largest length bucket"):
        _epoch(loader, epoch=0)
