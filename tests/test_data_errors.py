"""Bad input in the data pipeline: each error names the problem, where it is and the fix (issue #7)."""

import logging

import datasets
import jax.numpy as jnp
import pytest
from tiny import tiny_llama

from jtrain import Trainer, TrainingArguments
from jtrain.data.collators import DataCollatorWithPadding
from jtrain.data.files import load_local_dataset
from jtrain.data.task_data import read_table
from jtrain.errors import DataError
from jtrain.models import create_model

datasets.disable_progress_bars()
BERT = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 64, "max_position_embeddings": 32, "num_labels": 3}


def _args(tmp_path, **kw):
    return TrainingArguments(output_dir=str(tmp_path / "out"), save_strategy="no", report_to=["none"],
                             disable_tqdm=True, per_device_train_batch_size=1, **kw)


def _classifier():
    return create_model("bert", BERT, "sequence_classification")


def _labelled(labels):
    return [{"input_ids": [2, 3, 4], "label": y} for y in labels]


@pytest.mark.parametrize("as_hf", [False, True])
def test_label_outside_num_labels_names_the_row(tmp_path, as_hf):
    rows = _labelled([0, 2, 1, -100, 3, 0])
    data = datasets.Dataset.from_list(rows) if as_hf else rows
    with pytest.raises(DataError, match=r"`train_dataset` row 4 has label 3, outside \[0, 3\)"):
        Trainer(_classifier(), _args(tmp_path), train_dataset=data)
    with pytest.raises(DataError, match=r"`eval_dataset\['b'\]` row 0 has label -1"):
        Trainer(_classifier(), _args(tmp_path), eval_dataset={"a": _labelled([0]), "b": _labelled([-1])})
    Trainer(_classifier(), _args(tmp_path), train_dataset=_labelled([0, 1, 2, -100]))  # in range: accepted


def test_empty_dataset_or_split_says_which(tmp_path):
    with pytest.raises(DataError, match="`train_dataset` is empty"):
        Trainer(tiny_llama(), _args(tmp_path), train_dataset=[])
    empty = datasets.Dataset.from_dict({"input_ids": []}, split="validation")
    with pytest.raises(DataError, match=r"`eval_dataset` \(split 'validation'\) is empty"):
        Trainer(tiny_llama(), _args(tmp_path), eval_dataset=empty)


def test_no_usable_column_names_the_columns(tmp_path):
    ds = datasets.Dataset.from_dict({"sentence": ["a b"], "target": [1]})
    trainer = Trainer(tiny_llama(), _args(tmp_path))
    with pytest.raises(DataError, match=r"it has \['sentence', 'target'\].*remove_unused_columns=False"):
        trainer._loader(ds, train=True, accum=None, batch_rows=8)


def test_sequence_longer_than_max_length_names_row_and_length(tmp_path):
    rows = [{"input_ids": [1] * 5, "labels": [1] * 5} for _ in range(16)]
    rows[13] = {"input_ids": [1] * 20, "labels": [1] * 20}
    collate = DataCollatorWithPadding(pad_token_id=0, padding="longest", max_length=16)
    trainer = Trainer(tiny_llama(), _args(tmp_path, train_sampling_strategy="sequential"), data_collator=collate)
    loader = trainer._loader(rows, train=True, accum=None, batch_rows=8)
    with pytest.raises(DataError, match="train_dataset row 13 has length 20, longer than max_length \\(16\\)"):
        list(loader.iterate(0))


@pytest.mark.parametrize("name,content,where", [
    ("bad.txt", b"hello\nok\nwor\xffld\n", "bad.txt line 3: not valid UTF-8"),
    ("bad.csv", b"text,label\na,1\n\xe9t\xe9,0\n", "bad.csv line 3: not valid UTF-8"),
    ("bad.jsonl", b'{"text": "a"}\n{"text": "b"}\n{"text": "c",}\n', "bad.jsonl line 3: not valid JSON"),
    ("bad.json", b'[\n {"text": "a"},\n {"text": }\n]\n', "bad.json line 3: not valid JSON"),
])
def test_broken_file_names_the_file_and_line(tmp_path, name, content, where):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=where):
        load_local_dataset(str(path), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=where):  # the run pipeline reads its files the same way
        read_table(str(path), ["text"])


def test_filtered_rows_are_counted_in_the_log(tmp_path, caplog):
    from jtrain.config import DataSection
    from jtrain.data.text_lm import file_texts

    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "kept"}\n{"text": ""}\n{"text": "  "}\n{"text": "also kept"}\n')
    with caplog.at_level(logging.WARNING, logger="jtrain.data.text_lm"):
        texts = file_texts(DataSection(source="files", train_file=str(path)), ["train"])
    assert texts["train"] == ["kept", "also kept"]
    assert "filtered out 2 of 4 rows" in caplog.text


def test_token_ids_outside_the_vocabulary_or_not_integers_are_named(tmp_path):
    """On the device an out-of-range embedding lookup is NaN (a "non-finite loss") and float ids fail
    inside the compile; the Trainer names the id and the vocabulary, or the dtype, instead."""
    model = tiny_llama()  # vocabulary of 64
    rows = [{"input_ids": [1, 2, 3, 4], "labels": [1, 2, 3, 4]}] * 3 + [{"input_ids": [1, 70, 3, 4],
                                                                        "labels": [1, 70, 3, 4]}]
    args = _args(tmp_path, max_steps=4, mesh_shape={"data": 1}, train_sampling_strategy="sequential")
    with pytest.raises(DataError, match=r"train_dataset: token id 70 is outside the model's vocabulary \[0, 64\)"):
        Trainer(model, args, train_dataset=rows).train()  # the fourth batch: found at placement, not at planning
    with pytest.raises(DataError, match=r"eval_dataset: token id -1 is outside"):
        Trainer(model, args, eval_dataset=[{"input_ids": [1, -1, 3], "labels": [1, 2, 3]}]).evaluate()
    floats = [{"input_ids": [1.0, 2.0, 3.0], "labels": [1, 2, 3]}] * 2
    with pytest.raises(DataError, match="input_ids must be integer token ids, got float"):
        Trainer(model, args, train_dataset=floats).train()


def test_negative_labels_other_than_the_ignore_index_are_named(tmp_path):
    """PyTorch's cross-entropy rejects a label of -1; on the device it would silently read another
    token's logit (XLA's gather wraps) or be skipped (the CPU loss kernel). The Trainer names it.
    A user's own loss may use other conventions, and a regression head takes any number."""
    model = tiny_llama()
    good = [{"input_ids": [1, 2, 3, 4], "labels": [1, 2, -100, 4]}] * 2
    bad = good + [{"input_ids": [1, 2, 3, 4], "labels": [1, -1, 3, 4]}]
    args = _args(tmp_path, max_steps=3, mesh_shape={"data": 1}, train_sampling_strategy="sequential")
    with pytest.raises(DataError, match=r"train_dataset: label -1 is negative; positions the loss should ignore "
                                        r"take -100"):
        Trainer(model, args, train_dataset=bad).train()  # the third batch: found at placement
    with pytest.raises(DataError, match=r"eval_dataset: label -1 is negative"):
        Trainer(model, args, eval_dataset=bad).evaluate()

    def own_loss(outputs, batch):  # treats -1 as "ignore" itself
        from jtrain.losses import token_cross_entropy
        labels = batch["labels"]
        return token_cross_entropy(outputs["logits"], jnp.where(labels < 0, -100, labels))

    Trainer(model, args, train_dataset=bad, compute_loss_func=own_loss).train()
    regression = create_model("bert", dict(BERT, num_labels=1), "sequence_classification")
    rows = [{"input_ids": [1, 2, 3], "labels": -2}, {"input_ids": [4, 5, 6], "labels": 3}]
    Trainer(regression, _args(tmp_path, max_steps=2, mesh_shape={"data": 1}), train_dataset=rows).train()


def test_labels_past_the_output_classes_are_named(tmp_path):
    """PyTorch's cross-entropy rejects a target >= the number of classes; on the device the label
    would read NaN or another class's logit. The Trainer names the label and the bound, for token
    labels past the vocabulary (LM) and past num_labels (token classification), and still trains
    on labels inside [0, classes)."""
    model = tiny_llama()
    vocab = model.config.vocab_size
    good = [{"input_ids": [1, 2, 3, 4], "labels": [1, 2, 3, vocab - 1]}] * 2
    bad = good + [{"input_ids": [1, 2, 3, 4], "labels": [1, vocab, 3, 4]}]
    args = _args(tmp_path, max_steps=3, mesh_shape={"data": 1}, train_sampling_strategy="sequential")
    with pytest.raises(DataError, match=rf"train_dataset: label {vocab} is outside the model's {vocab} output "
                                        rf"classes \[0, {vocab}\).*at least {vocab + 1}"):
        Trainer(model, args, train_dataset=bad).train()
    Trainer(model, args, train_dataset=good).train()
    tagger = create_model("bert", BERT, "token_classification")
    rows = [{"input_ids": [2, 3, 4], "labels": [0, 2, -100]}, {"input_ids": [2, 3, 4], "labels": [1, 3, 0]}]
    with pytest.raises(DataError, match=r"eval_dataset: label 3 is outside the model's 3 output classes"):
        Trainer(tagger, _args(tmp_path, mesh_shape={"data": 1}), eval_dataset=rows).evaluate()


def test_untokenized_text_and_string_labels_are_named_with_the_fix(tmp_path):
    """An untokenized dataset (its text column is dropped as unused, so the batches reach the model
    without input_ids) and class names instead of ids (dropped as strings, so the loss would see no
    labels) were a TypeError from inside the model call and a misleading 'no labels': each now says
    what the batch holds and how to fix it, for training and evaluation alike."""
    text = datasets.Dataset.from_dict({"text": ["a b", "c d"] * 4, "label": [0, 1] * 4})
    with pytest.raises(DataError, match=r"train_dataset: the batches have no 'input_ids' \(they have \['labels'\]\): "
                                        r"tokenize the text first"):
        Trainer(_classifier(), _args(tmp_path, max_steps=1), train_dataset=text).train()
    with pytest.raises(DataError, match=r"eval_dataset: the batches have no 'input_ids'"):
        Trainer(_classifier(), _args(tmp_path)).evaluate(text)
    names = datasets.Dataset.from_dict({"input_ids": [[2, 3, 4]] * 4, "label": ["neg"] * 4})
    with pytest.raises(DataError, match=r"train_dataset row \d has the string label 'neg': labels must be class "
                                        r"ids.*class_encode_column"):
        Trainer(_classifier(), _args(tmp_path, max_steps=1), train_dataset=names).train()


@pytest.mark.parametrize("problem_type", ["regression", "multi_label_classification"])
def test_integer_targets_of_regression_and_multi_label_heads_are_not_class_ids(tmp_path, problem_type):
    """The class-id checks (no negative label but -100, none at or past num_labels) are for
    single-label heads: with the config's problem_type a regression or multi-label head, integer
    targets are scores (any sign, any size) or per-class 0/1, and training them is not refused."""
    config = {**BERT, "problem_type": problem_type}
    target = [7, -3, 12] if problem_type == "regression" else [1, 0, 1]
    rows = [{"input_ids": [2, 3, 4], "labels": target} for _ in range(4)]
    trainer = Trainer(create_model("bert", config, "sequence_classification"), _args(tmp_path, max_steps=1),
                      train_dataset=rows)
    assert jnp.isfinite(trainer.train().training_loss)
