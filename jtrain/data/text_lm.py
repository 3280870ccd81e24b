"""Causal-LM data from raw text: read documents, get a tokenizer, pack into fixed-length rows.

Documents come from the standard library's own source (no download) or from local files read
with `datasets.load_dataset`. Each document ends with EOS and is packed with segment ids, so no
token attends to or predicts across a document boundary. The baseline is an add-one unigram
model fit on the training tokens, scored on exactly the tokens the evaluation loss scores.
"""

from __future__ import annotations

import logging

import numpy as np

from jtrain.config import DataSection
from jtrain.data.corpus import stdlib_corpus
from jtrain.data.loader import ArrayDataset
from jtrain.data.local_tokenizers import role_id
from jtrain.data.packing import pack_documents
from jtrain.data.stdlib_text import stdlib_source_splits
from jtrain.data.task_data import Baseline, TaskData, TokenizerFactory, predicted_label_mask, read_table, unigram_loss
from jtrain.data.tokenizer import encode_batch
from jtrain.errors import ConfigError, DataError

logger = logging.getLogger(__name__)


def stdlib_texts(d: DataSection) -> dict[str, list[str]]:
    """Whole source files of the standard library (only `stdlib_packages`, when given), split by file."""
    if d.stdlib_packages:
        train, validation = stdlib_source_splits(d.stdlib_packages, d.max_files, d.validation_percent)
    else:
        corpus = stdlib_corpus(d.max_files, d.validation_percent)
        train, validation = corpus.train, corpus.validation
    return {"train": train, "eval": validation}


def file_texts(d: DataSection, wanted: list[str]) -> dict[str, list[str]]:
    """Non-empty texts of `data.text_column` in the files of the `wanted` splits.

    Without a validation file, evaluation takes the training file's first `validation_percent` rows and
    training the rest, as HF's run_clm/run_mlm split `train[:5%]` / `train[5%:]` (rows rounded as
    `datasets` does)."""
    paths = {"train": d.train_file, "eval": d.validation_file, "test": d.test_file}
    raw = {split: read_table(paths[split], [d.text_column])[d.text_column]
           for split in wanted if paths[split] is not None}
    if "eval" in wanted and d.validation_file is None:
        rows = raw["train"] if "train" in raw else read_table(d.train_file, [d.text_column])[d.text_column]
        cut = int(round(len(rows) * d.validation_percent / 100.0))
        if cut == 0:
            raise DataError(f"{d.train_file!r}: {d.validation_percent:g}% of its {len(rows)} rows is no row to "
                            "evaluate on: give a validation file or a larger validation_split_percentage")
        raw["eval"] = rows[:cut]
        if "train" in wanted:
            raw["train"] = rows[cut:]
        logger.info("no validation file: evaluating on the first %d of %d rows of %s (validation_percent %g), "
                    "training on the rest", cut, len(rows), d.train_file, d.validation_percent)
        paths["eval"] = f"the first {d.validation_percent:g}% of {d.train_file}"
    out = {}
    for split, column in raw.items():
        out[split] = [t for t in column if isinstance(t, str) and t.strip()]
        if not out[split]:
            raise DataError(f"{paths[split]!r} holds no non-empty text in column {d.text_column!r}")
        if len(out[split]) < len(column):  # nothing is dropped silently
            logger.warning("%s: filtered out %d of %d rows whose %r is empty or not text", paths[split],
                           len(column) - len(out[split]), len(column), d.text_column)
    return out


def _pack(tok_docs: list[list[int]], block_size: int, pad: int, limit: int | None) -> dict[str, np.ndarray]:
    packed = pack_documents(tok_docs, block_size, pad)
    return {k: v[:limit] for k, v in packed.items()} if limit else packed


def build_clm_data(texts: dict[str, list[str]], get_tokenizer: TokenizerFactory, d: DataSection) -> TaskData:
    """Tokenize, append EOS, pack into `block_size` rows; baselines for each evaluated split."""
    tok = get_tokenizer(texts.get("train", []))
    eos = role_id(tok, "eos")
    if eos is None:
        raise ConfigError("the tokenizer has no end-of-sequence token (</s> or <|endoftext|>) to end documents with")
    pad = role_id(tok, "pad")
    pad = eos if pad is None else pad
    data = TaskData(tok, None, None)
    train_ids = np.zeros(0, np.int64)
    if texts.get("train"):
        packed = _pack([ids + [eos] for ids in encode_batch(tok, texts["train"])], d.block_size, pad,
                       d.max_train_samples)
        data.train = ArrayDataset(packed)
        train_ids = packed["input_ids"][packed["attention_mask"] == 1]
    for split in ("eval", "test"):
        if texts.get(split):
            packed = _pack([ids + [eos] for ids in encode_batch(tok, texts[split])], d.block_size, pad, d.eval_limit)
            data.splits[split] = ArrayDataset(packed)
            scored = packed["labels"][predicted_label_mask(packed["labels"], shifted=True)]
            if len(train_ids):
                data.baselines[split] = Baseline("unigram", "loss", unigram_loss(train_ids, scored,
                                                                                 tok.get_vocab_size()))
    rows = len(data.train) if data.train is not None else 0
    eval_rows = len(data.validation) if data.validation is not None else 0
    data.summary = (f"clm: {rows} train rows x {d.block_size} tokens ({len(train_ids)} tokens), {eval_rows} eval "
                    f"rows; vocab {tok.get_vocab_size()}")
    return data
