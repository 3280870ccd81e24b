"""train_sampling_strategy / group_by_length and compilations per epoch with length buckets (issue #7)."""


import datasets
import numpy as np
import pytest
from tiny import hf_source_function, tiny_llama

from jtrain import Trainer, TrainingArguments
from jtrain.data.collators import DataCollatorWithPadding
from jtrain.data.sampling import length_grouped_order

BUCKETS = (16, 32, 64)
COLLATE = DataCollatorWithPadding(pad_token_id=0, length_buckets=BUCKETS)


def _args(tmp_path, **kw):
    return TrainingArguments(output_dir=str(tmp_path / "out"), save_strategy="no", report_to=["none"],
                             disable_tqdm=True, per_device_train_batch_size=1, seed=5, **kw)


def _rows(n, seed=0, low=3, high=61):
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(1, 64, size=int(rng.integers(low, high))).tolist()} for _ in range(n)]


@pytest.mark.parametrize("n,batch", [(300, 4), (37, 8), (5, 2)])
def test_matches_hf_length_grouped_indices(n, batch):
    torch = pytest.importorskip("torch")
    get_length_grouped_indices = hf_source_function(torch, "trainer_pt_utils.py", "get_length_grouped_indices")
    lengths = np.random.default_rng(n).integers(1, 40, size=n).tolist()  # many ties: the sort must be stable
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(11)).numpy()
    expected = get_length_grouped_indices(lengths, batch, generator=torch.Generator().manual_seed(11))
    assert length_grouped_order(lengths, batch, perm).tolist() == list(expected)


def _order(trainer, dataset, epoch=0):
    return trainer._loader(dataset, train=True, accum=None, batch_rows=8).order(epoch)


def test_group_by_length_in_the_trainer_is_pure_and_groups(tmp_path):
    rows = _rows(400)
    lengths = np.array([len(r["input_ids"]) for r in rows])
    ds = datasets.Dataset.from_list([{**r, "length": int(n)} for r, n in zip(rows, lengths)])
    make = lambda **kw: Trainer(tiny_llama(), _args(tmp_path, **kw), data_collator=COLLATE)
    grouped = make(train_sampling_strategy="group_by_length")
    order = _order(grouped, ds)
    # A pure function of (seed, epoch): a fresh trainer (a resumed run) computes the same order.
    np.testing.assert_array_equal(order, _order(make(group_by_length=True), ds))
    np.testing.assert_array_equal(order, _order(make(train_sampling_strategy="group_by_length"), rows))  # no column
    assert not np.array_equal(order, _order(grouped, ds, epoch=1))
    assert sorted(order.tolist()) == list(range(400))
    # HF's promise: the longest row is first; rows of a batch have similar lengths.
    assert lengths[order[0]] == lengths.max()
    # The length column wins over len(input_ids), as in HF, though remove_unused_columns drops it from batches.
    by_column = datasets.Dataset.from_list([{**r, "length": i} for i, r in enumerate(rows)])
    assert _order(grouped, by_column)[0] == 399
    spread = lambda o: np.mean([np.ptp(lengths[o[i:i + 8]]) for i in range(8, 400, 8)])
    assert spread(order) < 0.25 * spread(_order(make(), ds))
    # Batch i of a fresh loader is batch i of the uninterrupted epoch (resume starts there directly).
    loader = grouped._loader(ds, train=True, accum=None, batch_rows=8)
    full = list(loader.iterate(2))
    again = grouped._loader(ds, train=True, accum=None, batch_rows=8)
    np.testing.assert_array_equal(again.host_batch(2, 17)["input_ids"], full[17]["input_ids"])
    sequential = make(train_sampling_strategy="sequential")
    np.testing.assert_array_equal(_order(sequential, ds), np.arange(400))


def test_train_compilations_per_epoch_at_most_the_number_of_buckets(tmp_path):
    # Six batches of 8 mixed-length rows whose longest rows fall in buckets 16, 32, 64, 16, 32, 64.
    rng = np.random.default_rng(3)
    rows = []
    for cap in (14, 30, 60) * 2:
        lengths = [cap] + rng.integers(3, cap, size=7).tolist()
        rows += [{"input_ids": rng.integers(1, 64, size=n).tolist()} for n in lengths]
    rows = [{**r, "labels": r["input_ids"]} for r in rows]
    trainer = Trainer(tiny_llama(), _args(tmp_path, num_train_epochs=1, length_buckets=list(BUCKETS),
                                          train_sampling_strategy="sequential"),
                      data_collator=COLLATE, train_dataset=rows)
    out = trainer.train()
    log = trainer.steps.compile_log
    assert out.global_step == 6  # 48 rows / (1 row x 8 devices)
    # Six steps over three padded lengths: one compilation per bucket, never one per step.
    assert log.counts["train"] == len(BUCKETS)
    assert sorted(shapes["input_ids"][-1] for shapes in log.shapes["train"]) == list(BUCKETS)
