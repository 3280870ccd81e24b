"""Masked-LM data: texts -> `[CLS] text [SEP]` token streams, concatenated and cut into rows (HF's
`run_mlm.py` grouping), masked by `DataCollatorForLanguageModeling` (BERT's 80/10/10 rule).

Masks are a pure function of the batch: each training batch's generator is seeded with
(seed, the dataset rows it holds), so a resumed run sees the masks an uninterrupted run would, and
since the rows of a batch change every epoch, so do the masks. Evaluation rows are masked once,
up front, so every evaluation scores the same positions. The baseline always predicts the most
frequent maskable training token; it is scored on the evaluation split's masked positions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
from tokenizers import Tokenizer

from jtrain.config import DataSection
from jtrain.data.collators import DataCollatorForLanguageModeling, tokenizer_info
from jtrain.data.loader import ArrayDataset
from jtrain.data.stdlib_text import split_by_file, stdlib_docstrings
from jtrain.data.task_data import Baseline, TaskData, TokenizerFactory, resolve_buckets
from jtrain.data.tokenizer import truncated
from jtrain.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

EVAL_MASK_STREAM = 2**31 - 1  # seeds the one-off evaluation masks apart from every training batch


def stdlib_texts(d: DataSection) -> dict[str, list[str]]:
    """Docstrings of the standard library (prose), held out by file."""
    splits = split_by_file(stdlib_docstrings(d.stdlib_packages, d.max_files), d.validation_percent, per_package=False)
    return {"train": [x.text for x in splits.train], "eval": [x.text for x in splits.validation]}


def group_rows(tok: Tokenizer, texts: Sequence[str], length: int, limit: int | None) -> np.ndarray:
    """`[rows, length]` ids: every text with the tokenizer's template, concatenated, remainder dropped."""
    stream = np.fromiter((i for e in tok.encode_batch(list(texts), add_special_tokens=True) for i in e.ids),
                         dtype=np.int32)
    rows = len(stream) // length
    if rows == 0:
        raise DataError(f"the texts hold {len(stream)} tokens, less than one row of max_seq_length={length}")
    if len(stream) > rows * length:  # nothing is dropped silently
        logger.info("mlm: dropped the last %d of %d tokens (less than one row of %d)", len(stream) - rows * length,
                    len(stream), length)
    out = stream[:rows * length].reshape(rows, length)
    return out[:limit] if limit else out


def line_rows(tok: Tokenizer, texts: Sequence[str], length: int, limit: int | None) -> list[np.ndarray]:
    """HF's `--line_by_line`: each text (a file's line) its own row, with the tokenizer's template,
    truncated to `length`; padded per batch by the collator."""
    with truncated(tok, length):
        encodings = tok.encode_batch(list(texts[:limit] if limit else texts), add_special_tokens=True)
    return [np.asarray(e.ids, np.int32) for e in encodings]


class RowSeededMasking:
    """Wraps an MLM collator: a batch's masks come from a generator seeded by (seed, its row ids)."""

    def __init__(self, collator: DataCollatorForLanguageModeling, seed: int) -> None:
        self.collator, self.seed = collator, seed

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
        row_ids = [int(f["row_id"]) for f in features]
        rng = np.random.default_rng([self.seed, *row_ids])
        return self.collator([{"input_ids": f["input_ids"]} for f in features], rng=rng)


@dataclass(frozen=True)
class RowDataset:
    """Rows of ids as feature dicts that carry their row id (for `RowSeededMasking`)."""

    rows: np.ndarray | list[np.ndarray]  # [rows, length], or one array per line (`line_by_line`)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.rows[i], "row_id": i}


def mask_collator(tok: Tokenizer, probability: float,
                  length_buckets: tuple[int, ...] | None = None) -> DataCollatorForLanguageModeling:
    try:
        return DataCollatorForLanguageModeling(tok, mlm=True, mlm_probability=probability,
                                               length_buckets=length_buckets)
    except ValueError as err:
        raise ConfigError(f"masked LM: {err}") from err


def most_frequent_token(rows: np.ndarray | list[np.ndarray], special: frozenset[int]) -> int:
    ids = rows.ravel() if isinstance(rows, np.ndarray) else np.concatenate(rows)  # grouped rows, or lines
    counts = np.bincount(ids[~np.isin(ids, list(special))])
    return int(np.argmax(counts))


def build_mlm_data(texts: dict[str, list[str]], get_tokenizer: TokenizerFactory, d: DataSection,
                   seed: int, length_buckets: Sequence[int] | None = None) -> TaskData:
    """Rows cut from the concatenated texts (HF's grouping), or one row per text with `line_by_line`
    (padded per batch to a length bucket); masked per batch in training, once for evaluation."""
    tok = get_tokenizer(texts.get("train", []))
    rows_of = line_rows if d.line_by_line else group_rows
    buckets = resolve_buckets(length_buckets, d.max_seq_length) if d.line_by_line else None
    collator = mask_collator(tok, d.mlm_probability, buckets)
    data = TaskData(tok, None, None)
    special = tokenizer_info(tok).special_token_ids  # includes pad and mask
    top = None
    if texts.get("train"):
        train_rows = rows_of(tok, texts["train"], d.max_seq_length, d.max_train_samples)
        data.train, data.collator = RowDataset(train_rows), RowSeededMasking(collator, seed)
        top = most_frequent_token(train_rows, special)
    for i, split in enumerate(("eval", "test")):
        if texts.get(split):
            rows = rows_of(tok, texts[split], d.max_seq_length, d.eval_limit)
            batch = collator([{"input_ids": r} for r in rows], rng=np.random.default_rng([seed, EVAL_MASK_STREAM, i]))
            data.splits[split] = ArrayDataset(batch)
            masked = batch["labels"][batch["labels"] != -100]
            if top is not None and masked.size:
                data.baselines[split] = Baseline("most_frequent_token", "accuracy", float(np.mean(masked == top)))
    n_train = len(data.train) if data.train is not None else 0
    n_eval = len(data.validation) if data.validation is not None else 0
    top_text = f"; most frequent token {tok.id_to_token(top)!r}" if top is not None else ""
    data.summary = (f"mlm: {n_train} train / {n_eval} eval rows x {'at most ' if d.line_by_line else ''}"
                    f"{d.max_seq_length} tokens{' (a line each)' if d.line_by_line else ''}, "
                    f"{d.mlm_probability:.0%} masked; vocab {tok.get_vocab_size()}{top_text}")
    return data
