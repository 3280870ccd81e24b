"""Sequence classification data: text column(s) + a label column -> padded rows with one label each.

As in HF's `run_classification.py`: labels of any type are mapped to ids (sorted, numbers in
numeric order), `num_labels` comes from the data, one or two text columns (a pair) are encoded
with the tokenizer's template and truncated to `max_seq_length`. Training rows are padded per
batch to a length bucket (a few compiled shapes); evaluation splits are padded once.
The baseline is the majority class of the training labels, scored on each evaluated split.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from tokenizers import Tokenizer

from jtrain.config import DataSection
from jtrain.data.collators import DataCollatorWithPadding
from jtrain.data.local_tokenizers import role_id
from jtrain.data.stdlib_text import DEFAULT_CLASSES, split_by_file, stdlib_docstrings
from jtrain.data.task_data import Baseline, TaskData, TokenizerFactory, collate_all, first, read_table, resolve_buckets
from jtrain.errors import DataError

NO_LABEL = -100


@dataclass(frozen=True)
class Example:
    texts: tuple[str, ...]  # one text, or a pair
    label: str | None  # None: unlabelled (a test file without the label column)


def stdlib_examples(d: DataSection) -> dict[str, list[Example]]:
    """Docstrings labelled by their standard-library package, split by file."""
    docs = stdlib_docstrings(d.stdlib_packages or DEFAULT_CLASSES, d.max_files)
    splits = split_by_file(docs, d.validation_percent, per_package=True)
    return {"train": [Example((x.text,), x.package) for x in splits.train],
            "eval": [Example((x.text,), x.package) for x in splits.validation]}


def _text(value: Any, path: str, column: str, row: int) -> str:
    if value is None:
        raise DataError(f"{path!r} row {row}: column {column!r} is empty")
    return str(value)


def file_examples(d: DataSection, wanted: Sequence[str]) -> dict[str, list[Example]]:
    """Examples of the train/validation/test files of the `wanted` splits ("train", "eval", "test")."""
    paths = {"train": d.train_file, "eval": d.validation_file, "test": d.test_file}
    cols = d.classification_columns
    out = {}
    for split in wanted:
        path = paths[split]
        table = read_table(path, cols, optional=(d.label_column,)) if split == "test" else \
            read_table(path, cols + [d.label_column])
        labels = table.get(d.label_column)
        rows = []
        for i in range(len(table[cols[0]])):
            label = None if labels is None else labels[i]
            if labels is not None and label is None:
                raise DataError(f"{path!r} row {i}: column {d.label_column!r} is empty")
            rows.append(Example(tuple(_text(table[c][i], path, c, i) for c in cols),
                                None if label is None else str(label)))
        out[split] = rows
    return out


def _label_order(name: str) -> tuple:
    try:
        return (0, float(name), name)
    except ValueError:
        return (1, 0.0, name)


def label_names(examples: dict[str, list[Example]], known: Sequence[str] | None) -> list[str]:
    """The label list: a pretrained classifier's own, else the training (or evaluation) labels, sorted."""
    if known:
        return list(known)
    source = examples.get("train") or examples.get("eval") or []
    names = {e.label for e in source if e.label is not None}
    if len(names) < 2:
        raise DataError(f"classification needs at least 2 distinct labels, found {sorted(names)}")
    return sorted(names, key=_label_order)


def encode(tok: Tokenizer, rows: list[Example], ids: dict[str, int], max_len: int, split: str) -> list[dict]:
    """Token ids (with the tokenizer's template) truncated to `max_len`, and the label id."""
    unknown = sorted({e.label for e in rows if e.label is not None and e.label not in ids})
    if unknown:
        raise DataError(f"the {split} split has labels the model does not know: {unknown[:5]}; known: {list(ids)}")
    previous = tok.truncation
    tok.enable_truncation(max_len)
    try:
        inputs = [e.texts if len(e.texts) == 2 else e.texts[0] for e in rows]
        encodings = tok.encode_batch(inputs, add_special_tokens=True)
    finally:
        tok.enable_truncation(**previous) if previous else tok.no_truncation()
    features = []
    for e, enc in zip(rows, encodings):
        row = {"input_ids": enc.ids, "labels": NO_LABEL if e.label is None else ids[e.label]}
        if len(e.texts) == 2:
            row["token_type_ids"] = enc.type_ids
        features.append(row)
    return features


def majority_baseline(train: list[Example], split: list[Example]) -> Baseline | None:
    labelled = [e.label for e in split if e.label is not None]
    if not train or not labelled:
        return None
    majority = Counter(e.label for e in train).most_common(1)[0][0]
    return Baseline("majority_class", "accuracy", float(np.mean([lab == majority for lab in labelled])))


def build_classification_data(examples: dict[str, list[Example]], get_tokenizer: TokenizerFactory, d: DataSection,
                              *, length_buckets: Sequence[int] | None = None,
                              known_labels: Sequence[str] | None = None) -> TaskData:
    """Tokenized, label-mapped rows; `examples` maps "train"/"eval"/"test" to examples."""
    examples = {"train": first(examples.get("train", []), d.max_train_samples),
                **{k: first(v, d.eval_limit) for k, v in examples.items() if k != "train"}}
    names = label_names(examples, known_labels)
    ids = {name: i for i, name in enumerate(names)}
    tok = get_tokenizer([t for e in examples["train"] for t in e.texts])
    pad = role_id(tok, "pad") or role_id(tok, "eos") or 0
    collator = DataCollatorWithPadding(pad_token_id=pad, length_buckets=resolve_buckets(length_buckets,
                                                                                        d.max_seq_length))
    data = TaskData(tok, None, collator, label_names=names,
                    model_config={"num_labels": len(names), "id2label": dict(enumerate(names))})
    if examples["train"]:
        data.train = encode(tok, examples["train"], ids, d.max_seq_length, "train")
    for split in ("eval", "test"):
        if examples.get(split):
            data.splits[split] = collate_all(encode(tok, examples[split], ids, d.max_seq_length, split), collator)
            baseline = majority_baseline(examples["train"], examples[split])
            if baseline is not None:
                data.baselines[split] = baseline
    counts = Counter(e.label for e in examples["train"])
    data.summary = (f"classification: {len(names)} labels, {len(examples['train'])} train / "
                    f"{len(examples.get('eval', []))} eval examples; train label counts {dict(counts.most_common())}")
    return data
