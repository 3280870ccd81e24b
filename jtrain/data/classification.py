"""Sequence classification data: text column(s) + a label column -> padded rows with one label each.

As in HF's `run_classification.py`: the problem type comes from the labels unless `do_regression`
says (float labels: a regression, one output and mean-squared error; lists of labels: multi-label,
one 0/1 target per label; anything else: single-label classes), class labels of any type are mapped
to ids (as HF's script: each label as a string, sorted as strings, so "10" comes before "2") over the labels of
every split (an evaluation label the training split lacks is added with a warning), `num_labels` comes from
the data, and the text is one
column, several joined by `text_column_delimiter`, or two columns encoded as a pair with the
tokenizer's template, truncated to `max_seq_length`. Training rows are padded per batch to a length
bucket (a few compiled shapes); evaluation splits are padded once. The baseline is the majority class
(or, for a regression, the mean training label), scored on each evaluated split.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from tokenizers import Tokenizer

from jtrain.config import DataSection
from jtrain.data.classification_metrics import metrics_function
from jtrain.data.collators import DataCollatorWithPadding
from jtrain.data.local_tokenizers import role_id
from jtrain.data.stdlib_text import DEFAULT_CLASSES, split_by_file, stdlib_docstrings
from jtrain.data.task_data import Baseline, TaskData, TokenizerFactory, collate_all, first, read_table, resolve_buckets
from jtrain.data.tokenizer import truncated
from jtrain.errors import DataError

NO_LABEL = -100
REGRESSION, SINGLE_LABEL, MULTI_LABEL = "regression", "single_label_classification", "multi_label_classification"
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    texts: tuple[str, ...]  # one text, or a pair
    label: Any  # a class (str), a regression target (float), a tuple of classes (multi-label); None: unlabelled


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


def _label(value: Any) -> Any:
    """A file's label as read (numbers stay numbers, for the problem type); lists become tuples of names."""
    if isinstance(value, (list, tuple)):
        return tuple(str(v) for v in value)
    return value


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
            if labels is not None and label is None and split != "test":
                raise DataError(f"{path!r} row {i}: column {d.label_column!r} is empty")
            texts = tuple(_text(table[c][i], path, c, i) for c in cols)
            if d.text_column_delimiter is not None:
                texts = (d.text_column_delimiter.join(texts),)
            rows.append(Example(texts, None if label is None else _label(label)))
        out[split] = rows
    return out


def problem_type(examples: dict[str, list[Example]], do_regression: bool | None) -> str:
    """HF's rule: `do_regression` when given, else float training labels are a regression; lists of
    labels are multi-label; anything else single-label."""
    source = examples.get("train") or examples.get("eval") or examples.get("test") or []
    values = [e.label for e in source if e.label is not None]
    if do_regression is None:
        numbers = values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        do_regression = bool(numbers and any(isinstance(v, float) for v in values))
    if do_regression:
        return REGRESSION
    return MULTI_LABEL if any(isinstance(v, tuple) for v in values) else SINGLE_LABEL


def _names_of(label: Any) -> tuple[str, ...]:
    return label if isinstance(label, tuple) else (str(label),)


def _unlabelled_marker(label: Any) -> bool:
    """-1, the label of GLUE's (and HF datasets') unlabelled test rows. HF's run_classification means to remove
    it from the label list (its comment and warning), but compares the int -1 with labels it has already made
    strings, so "-1" becomes a class there; jtrain removes it. Only a test split may carry it (HF's loss fails
    on it in training or evaluation)."""
    return isinstance(label, (int, float)) and not isinstance(label, bool) and label == -1


def label_names(examples: dict[str, list[Example]], known: Sequence[str] | None) -> list[str]:
    """The label list, as HF's run_classification builds it: a pretrained classifier's own (`known`) when
    nothing is trained, else every split's labels as strings, sorted as strings ("10" before "2", also for a
    column of numbers): the training labels, with a warning those only an evaluation split adds.

    One difference: when training a classifier on labels it already has, its own list is kept, so each row
    of its head keeps its meaning (HF re-sorts them: the same unless the checkpoint's order is unsorted)."""
    if known and not examples.get("train"):
        return list(known)
    names = _labels_in(examples)
    if known and set(names) <= set(known):
        return list(known)
    if known:
        logger.warning("The label2id key in the model config.json is not equal to the label2id key of this run "
                       "(HF's warning: fine when fine-tuning): the model's labels %s become %s", list(known),
                       names)
    return names


def _labels_in(examples: dict[str, list[Example]]) -> list[str]:
    """Every split's labels, -1 markers removed, sorted as strings."""
    if any(_unlabelled_marker(e.label) for rows in examples.values() for e in rows):
        logger.warning("Label -1 found in label list, removing it (it marks unlabelled rows; HF's "
                       "run_classification says so, but keeps \"-1\" as a class)")

    def of(split: str) -> set[str]:
        return {n for e in examples.get(split, []) if e.label is not None and not _unlabelled_marker(e.label)
                for n in _names_of(e.label)}

    train = of("train")
    names = set(train)
    for split in ("eval", "test"):
        extra = of(split) - names
        if extra and train:
            logger.warning("labels %s in the %s split but not in the training split: added to the label list",
                           sorted(extra), split)
        names |= extra
    if len(names) < 2:
        raise DataError(f"classification needs at least 2 distinct labels, found {sorted(names)}")
    return sorted(names)


def _float_label(value: Any, split: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise DataError(f"the {split} split has the label {value!r}, which a regression cannot read as a number: "
                        "give numeric labels, or do_regression: false for classes") from None


def label_encoder(kind: str, names: list[str] | None, split: str) -> Any:
    """Example label -> the row's `labels` value for this problem type (unlabelled rows: -100, or NaN)."""
    if kind == REGRESSION:
        return lambda label: np.float32(np.nan if label is None else _float_label(label, split))
    ids = {name: i for i, name in enumerate(names or [])}

    def class_id(name: str, why: str = "") -> int:
        if name not in ids:
            raise DataError(f"the {split} split has a label the model does not know: {name!r}{why}; "
                            f"known: {list(ids)}")
        return ids[name]

    if kind == MULTI_LABEL:
        def multi_hot(label: Any) -> np.ndarray:
            if label is None:
                return np.full(len(ids), np.nan, np.float32)
            out = np.zeros(len(ids), np.float32)
            out[[class_id(n) for n in _names_of(label)]] = 1.0
            return out
        return multi_hot
    def class_of(label: Any) -> int:
        if label is None or (split == "test" and _unlabelled_marker(label)):
            return NO_LABEL
        why = (" (-1 marks an unlabelled row, as in GLUE's test files: only the test split may have them)"
               if _unlabelled_marker(label) else "")
        return class_id(str(label), why)

    return class_of


def encode(tok: Tokenizer, rows: list[Example], to_label: Any, max_len: int) -> list[dict]:
    """Token ids (with the tokenizer's template) truncated to `max_len`, and the row's label."""
    labels = [to_label(e.label) for e in rows]  # an unknown label fails before the tokenizer runs
    with truncated(tok, max_len):
        encodings = tok.encode_batch([e.texts if len(e.texts) == 2 else e.texts[0] for e in rows],
                                     add_special_tokens=True)
    features = []
    for e, enc, label in zip(rows, encodings, labels):
        row = {"input_ids": enc.ids, "labels": label}
        if len(e.texts) == 2:
            row["token_type_ids"] = enc.type_ids
        features.append(row)
    return features


def baseline(kind: str, train: list[Example], split: list[Example]) -> Baseline | None:
    """The majority training class's accuracy, or for a regression the mean training label's mse."""
    labelled = [e.label for e in split
                if e.label is not None and (kind == REGRESSION or not _unlabelled_marker(e.label))]
    if not train or not labelled or kind == MULTI_LABEL:
        return None
    if kind == REGRESSION:
        mean = np.mean([_float_label(e.label, "train") for e in train])
        targets = np.asarray([_float_label(v, "evaluation") for v in labelled])
        return Baseline("mean_label", "mse", float(np.mean((targets - mean) ** 2)))
    majority = Counter(str(e.label) for e in train).most_common(1)[0][0]
    return Baseline("majority_class", "accuracy", float(np.mean([str(lab) == majority for lab in labelled])))


def shuffled(rows: list[Example], d: DataSection) -> list[Example]:
    """The training rows in HF datasets' `shuffle(seed=shuffle_seed)` order (numpy's `default_rng(seed)`
    permutation) when `shuffle_train_dataset` is on, so `max_train_samples` picks the rows HF's script picks."""
    if not d.shuffle_train_dataset:
        return rows
    return [rows[i] for i in np.random.default_rng(d.shuffle_seed).permutation(len(rows))]


def build_classification_data(examples: dict[str, list[Example]], get_tokenizer: TokenizerFactory, d: DataSection,
                              *, length_buckets: Sequence[int] | None = None,
                              known_labels: Sequence[str] | None = None) -> TaskData:
    """Tokenized, label-mapped rows; `examples` maps "train"/"eval"/"test" to examples.

    As in HF's script, the problem type and the label list come from every row of every split, before
    `max_*_samples` take the first rows (of the training rows shuffled once, with `shuffle_train_dataset`)."""
    kind = problem_type(examples, d.do_regression)
    names = None if kind == REGRESSION else label_names(examples, known_labels)
    examples = {"train": first(shuffled(examples.get("train", []), d), d.max_train_samples),
                **{k: first(v, d.max_predict_samples if k == "test" else d.eval_limit)
                   for k, v in examples.items() if k != "train"}}
    tok = get_tokenizer([t for e in examples["train"] for t in e.texts])
    pad = role_id(tok, "pad") or role_id(tok, "eos") or 0
    collator = DataCollatorWithPadding(pad_token_id=pad, length_buckets=resolve_buckets(length_buckets,
                                                                                        d.max_seq_length))
    config = {"num_labels": 1, "problem_type": kind} if names is None else \
        {"num_labels": len(names), "id2label": dict(enumerate(names)), "problem_type": kind}
    data = TaskData(tok, None, collator, label_names=names, model_config=config, problem_type=kind,
                    compute_metrics=metrics_function(kind, d.metric_name, len(names or [1])))
    if examples["train"]:
        data.train = encode(tok, examples["train"], label_encoder(kind, names, "train"), d.max_seq_length)
    for split in ("eval", "test"):
        if examples.get(split):
            rows = encode(tok, examples[split], label_encoder(kind, names, split), d.max_seq_length)
            data.splits[split] = collate_all(rows, collator)
            found = baseline(kind, examples["train"], examples[split])
            if found is not None:
                data.baselines[split] = found
    what = "regression (one output)" if names is None else f"{len(names)} labels" + (
        ", multi-label" if kind == MULTI_LABEL else "")
    counts = "" if names is None else "; train label counts " + str(dict(Counter(
        n for e in examples["train"] if e.label is not None for n in _names_of(e.label)).most_common()))
    data.summary = (f"classification: {what}, {len(examples['train'])} train / "
                    f"{len(examples.get('eval', []))} eval examples{counts}")
    return data
