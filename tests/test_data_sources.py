"""Dataset sources in the Trainer: HF Dataset / DatasetDict / streaming IterableDataset, local files (issue #7)."""

import itertools
import json
import math

import datasets
import jax
import numpy as np
import pytest
from tiny import tiny_llama

from jtrain import Trainer, TrainingArguments
from jtrain.data.collators import DataCollatorWithPadding
from jtrain.data.files import load_local_dataset
from jtrain.data.sources import RowStream
from jtrain.data.stream import StreamLoader
from jtrain.errors import ConfigError, DataError

datasets.disable_progress_bars()
COLLATE = DataCollatorWithPadding(pad_token_id=0, length_buckets=(8, 16))


def _args(tmp_path, **kw):
    kw = {"save_strategy": "no", **kw}
    return TrainingArguments(output_dir=str(tmp_path / "out"), report_to=["none"], disable_tqdm=True,
                             per_device_train_batch_size=1, per_device_eval_batch_size=1, **kw)


def _columns(n=16, seed=0):
    rng = np.random.default_rng(seed)
    ids = [rng.integers(1, 64, size=int(rng.integers(3, 15))).tolist() for _ in range(n)]
    return {"text": [f"row {i}" for i in range(n)], "input_ids": ids, "labels": [list(x) for x in ids],
            "idx": list(range(n)), "score": [float(i) for i in range(n)]}


def _first_batch(trainer, dataset, rows=8):
    loader = trainer._loader(dataset, train=False, accum=None, batch_rows=rows)
    return next(iter(loader.iterate(0)))


def test_hf_dataset_remove_unused_columns_and_label_names(tmp_path):
    ds = datasets.Dataset.from_dict(_columns())
    keys = lambda **kw: set(_first_batch(Trainer(tiny_llama(), _args(tmp_path, **kw), data_collator=COLLATE), ds))
    # As HF: columns that are no model input and no label are dropped (the string `text` too).
    assert keys() == {"input_ids", "attention_mask", "labels"}
    assert keys(remove_unused_columns=False) == {"input_ids", "attention_mask", "labels", "idx", "score"}
    assert keys(label_names=["score"]) == {"input_ids", "attention_mask", "labels", "score"}
    batch = _first_batch(Trainer(tiny_llama(), _args(tmp_path), data_collator=COLLATE), ds)
    np.testing.assert_array_equal(batch["input_ids"][0, :len(ds[0]["input_ids"])], ds[0]["input_ids"])


def test_dataset_dict_where_one_split_is_needed_names_the_splits(tmp_path):
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict(_columns(4)),
                               "test": datasets.Dataset.from_dict(_columns(4))})
    with pytest.raises(DataError, match=r"DatasetDict with splits \['train', 'test'\].*dataset\['train'\]"):
        Trainer(tiny_llama(), _args(tmp_path), train_dataset=dd)
    empty = datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"input_ids": []})})
    with pytest.raises(DataError, match=r"eval_dataset\['validation'\].*is empty"):
        Trainer(tiny_llama(), _args(tmp_path), train_dataset=dd["train"], eval_dataset=empty)


def test_train_on_hf_dataset_and_evaluate_each_split_of_a_dataset_dict(tmp_path):
    dd = datasets.DatasetDict({"a": datasets.Dataset.from_dict(_columns(8, seed=1)),
                               "b": datasets.Dataset.from_dict(_columns(8, seed=2))})
    args = _args(tmp_path, max_steps=2, group_by_length=True, dataloader_num_workers=2, dataloader_prefetch_factor=2)
    trainer = Trainer(tiny_llama(), args, data_collator=COLLATE, train_dataset=datasets.Dataset.from_dict(_columns()),
                      eval_dataset=dd)
    out = trainer.train()
    metrics = trainer.evaluate()
    assert out.global_step == 2 and math.isfinite(out.training_loss)
    assert math.isfinite(metrics["eval_a_loss"]) and math.isfinite(metrics["eval_b_loss"])


def _stream(n=10):
    return datasets.Dataset.from_dict(_columns(n)).to_iterable_dataset()


def test_stream_needs_max_steps(tmp_path):
    trainer = Trainer(tiny_llama(), _args(tmp_path), data_collator=COLLATE, train_dataset=_stream())
    with pytest.raises(ConfigError, match="no length.*set `max_steps`"):
        trainer.train()


def _stream_ids(loader, start, count):
    return [b["input_ids"][:, 0].tolist() for b in itertools.islice(loader.iterate(0, start), count)]


def test_stream_order_restarts_and_resume_equals_uninterrupted(tmp_path):
    # Row i's first token is i + 1, so each batch is identified by its rows.
    rows = [{"input_ids": [i + 1, 5, 6], "junk": i} for i in range(10)]
    ds = datasets.Dataset.from_list(rows).to_iterable_dataset()
    trainer = Trainer(tiny_llama(), _args(tmp_path), data_collator=COLLATE)
    loader = trainer._loader(ds, train=True, accum=None, batch_rows=4)
    assert isinstance(loader, StreamLoader)
    full = _stream_ids(loader, 0, 6)
    # Pass 0 then pass 1 back to back (10 rows, batches of 4), in stream order.
    assert full[:3] == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 1, 2]]
    assert full == [[(4 * b + j) % 10 + 1 for j in range(4)] for b in range(6)]
    # Resuming at batch 3 (a fresh loader, skipping the consumed rows) gives the uninterrupted batches.
    resumed = trainer._loader(ds, train=True, accum=None, batch_rows=4)
    assert _stream_ids(resumed, 3, 3) == full[3:]
    assert "junk" not in next(iter(loader.iterate(0)))  # remove_unused_columns applies to streams too
    for workers in (0, 2):
        workers_loader = StreamLoader(RowStream(rows), global_batch_size=4, collate_fn=COLLATE, num_workers=workers)
        assert _stream_ids(workers_loader, 2, 3) == full[2:5]


def test_one_shot_generator_that_runs_out_is_an_error():
    gen = ({"input_ids": [i + 1, 2]} for i in range(5))
    loader = StreamLoader(RowStream(gen), global_batch_size=4, collate_fn=COLLATE, prefetch=0)
    with pytest.raises(DataError, match="one-shot iterator"):
        list(itertools.islice(loader.iterate(0), 3))
    with pytest.raises(DataError, match="stream is empty"):
        next(StreamLoader(RowStream([]), global_batch_size=4, collate_fn=COLLATE).iterate(0))


def test_train_on_a_stream_and_resume_equals_uninterrupted(tmp_path):
    rng = np.random.default_rng(0)
    rows = [{"input_ids": ids, "labels": ids} for ids in rng.integers(1, 64, size=(20, 8)).tolist()]
    stream = datasets.Dataset.from_list(rows).to_iterable_dataset()
    args = _args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2, learning_rate=1e-2)
    full = Trainer(tiny_llama(), args, data_collator=COLLATE, train_dataset=stream)
    out = full.train()  # 4 updates x 8 rows > 20 rows: the stream is read in two passes
    assert out.global_step == 4 and math.isfinite(out.training_loss)
    resumed = Trainer(tiny_llama(), args, data_collator=COLLATE, train_dataset=stream)
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    # The resumed run skipped the 16 rows of updates 1-2 and saw the same batches 3-4: same weights
    # (bit-exact: same program, same inputs, same device order).
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _write(tmp_path, fmt, texts, labels):
    path = tmp_path / f"data.{'jsonl' if fmt == 'json' else 'txt' if fmt == 'text' else fmt}"
    if fmt == "json":
        path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(texts, labels)))
    elif fmt == "csv":
        path.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in zip(texts, labels)))
    elif fmt == "text":
        path.write_text("".join(t + "\n" for t in texts))
    else:
        datasets.Dataset.from_dict({"text": texts, "label": labels}).to_parquet(str(path))
    return str(path)


@pytest.mark.parametrize("fmt", ["json", "csv", "text", "parquet"])
def test_local_files_through_load_dataset(tmp_path, fmt):
    texts, labels = ["abc", "hello world", "xy", "jax"], [0, 1, 0, 1]
    ds = load_local_dataset(_write(tmp_path, fmt, texts, labels), cache_dir=str(tmp_path / "cache"))
    ds = ds.map(lambda r: {"input_ids": [ord(c) % 63 + 1 for c in r["text"]]})
    batch = _first_batch(Trainer(tiny_llama(), _args(tmp_path), data_collator=COLLATE), ds, rows=4)
    assert batch["input_ids"].shape == (4, 16)
    np.testing.assert_array_equal(batch["attention_mask"].sum(1), [len(t) for t in texts])
    if fmt != "text":
        np.testing.assert_array_equal(batch["labels"], labels)


def test_dict_of_columns_and_ragged_rows_without_a_padding_collator(tmp_path):
    cols = {"input_ids": [[1, 2], [3, 4], [5, 6]], "labels": [[1, 2], [3, 4], [5, 6]]}
    trainer = Trainer(tiny_llama(), _args(tmp_path), train_dataset=cols)
    assert trainer._train_rows() == 3  # rows, not the number of columns
    np.testing.assert_array_equal(_first_batch(trainer, cols)["input_ids"][:3], cols["input_ids"])
    ragged = [{"input_ids": [1, 2]}, {"input_ids": [3]}]
    with pytest.raises(DataError, match="rows differ in shape.*DataCollatorWithPadding"):
        _first_batch(Trainer(tiny_llama(), _args(tmp_path)), ragged)
