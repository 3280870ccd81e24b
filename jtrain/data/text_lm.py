"""Causal-LM data from raw text: read documents, get a tokenizer, pack into fixed-length rows.

Documents come from the standard library's own source (no download) or from local files read
with `datasets.load_dataset`. Each document ends with EOS and is packed with segment ids, so no
token attends to or predicts across a document boundary.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from jtrain.data.corpus import stdlib_corpus
from jtrain.data.loader import ArrayDataset
from jtrain.data.packing import pack_documents
from jtrain.data.tokenizer import encode_batch, load_tokenizer, token_id, train_bpe_tokenizer
from jtrain.errors import DataError


@dataclass(frozen=True)
class TextSplits:
    train: list[str]
    validation: list[str]


@dataclass
class LMData:
    tokenizer: Tokenizer
    train: ArrayDataset
    validation: ArrayDataset | None
    unigram_baseline: float | None  # cross-entropy (nats/token) of a train-set unigram model on validation
    train_tokens: int


_FORMATS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def read_text_file(path: str, column: str) -> list[str]:
    """Documents of one local file through `datasets.load_dataset`; errors name the file/column."""
    if not os.path.isfile(path):
        raise DataError(f"data file {path!r} not found")
    fmt = _FORMATS.get(os.path.splitext(path)[1].lower())
    if fmt is None:
        raise DataError(f"data file {path!r}: unknown extension; use one of {sorted(_FORMATS)}")
    import datasets

    try:
        ds = datasets.load_dataset(fmt, data_files=path, split="train")
    except Exception as err:  # datasets wraps parse errors deeply; name the file
        raise DataError(f"cannot read {path!r} as {fmt}: {str(err).splitlines()[0]}") from err
    if column not in ds.column_names:
        raise DataError(f"{path!r} has no column {column!r}; columns: {ds.column_names}")
    texts = [t for t in ds[column] if isinstance(t, str) and t.strip()]
    if not texts:
        raise DataError(f"{path!r} holds no non-empty text in column {column!r}")
    return texts


def unigram_cross_entropy(train_docs: list[list[int]], eval_docs: list[list[int]], vocab_size: int) -> float:
    """Nats per token of an add-one-smoothed unigram model fit on train, scored on eval."""
    counts = np.ones(vocab_size, np.float64)
    for doc in train_docs:
        np.add.at(counts, np.asarray(doc, np.int64), 1.0)
    logp = np.log(counts / counts.sum())
    total = sum(len(d) for d in eval_docs)
    return float(-sum(logp[np.asarray(d, np.int64)].sum() for d in eval_docs) / max(total, 1))


def build_lm_data(splits: TextSplits, *, tokenizer: Tokenizer | None, vocab_size: int, block_size: int,
                  max_eval_rows: int | None = None) -> LMData:
    if not splits.train:
        raise DataError("the training split is empty")
    tok = tokenizer or train_bpe_tokenizer(splits.train, vocab_size)
    eos, pad = token_id(tok, "</s>"), token_id(tok, "<pad>")
    train_docs = [ids + [eos] for ids in encode_batch(tok, splits.train)]
    eval_docs = [ids + [eos] for ids in encode_batch(tok, splits.validation)] if splits.validation else []
    train = pack_documents(train_docs, block_size, pad)
    validation = None
    if eval_docs:
        packed = pack_documents(eval_docs, block_size, pad)
        if max_eval_rows:
            packed = {k: v[:max_eval_rows] for k, v in packed.items()}
            eval_docs = [packed["input_ids"][i][packed["attention_mask"][i] == 1].tolist()
                         for i in range(len(packed["input_ids"]))]
        validation = ArrayDataset(packed)
    baseline = unigram_cross_entropy(train_docs, eval_docs, tok.get_vocab_size()) if eval_docs else None
    return LMData(tok, ArrayDataset(train), validation, baseline, sum(map(len, train_docs)))


def stdlib_splits(max_files: int | None, validation_percent: float) -> TextSplits:
    corpus = stdlib_corpus(max_files, validation_percent)
    return TextSplits(corpus.train, corpus.validation)


def file_splits(train_file: str | None, validation_file: str | None, column: str) -> TextSplits:
    if train_file is None:
        raise DataError("data.source is 'files' but `data.train_file` is not set")
    val = read_text_file(validation_file, column) if validation_file else []
    return TextSplits(read_text_file(train_file, column), val)


def load_tokenizer_or_none(path: str | None) -> Tokenizer | None:
    return load_tokenizer(path) if path else None


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))
