"""Sequence layouts for language-model training: block grouping, document packing, flattening, SFT labels.

Label convention (shared with :mod:`jtrain.data.collators`): ``labels`` are aligned with
``input_ids`` and the loss shifts them, so the logits at position ``t`` are scored against
``labels[t + 1]``. When several documents share a row, the position after the last token of one
document holds the first token of the next. Predicting it from the previous document would train
the model on a meaningless cross-document transition (and with segment-masked attention it is
not even predictable), so **the first token of every document gets label -100**. Each document
then contributes exactly ``len(doc) - 1`` predicted tokens, as it does when trained alone (where the
shift drops its first token), so a packed batch has the same loss sum and token count as the
unpacked documents. HF's ``DataCollatorWithFlattening`` uses the same rule (``separator_id``).

Packed rows also carry ``segment_ids`` (1, 2, 3, ... per document, 0 on padding) and
``position_ids`` that restart at 0 per document. ``attention_mask`` is 1 on every real token, so it
does **not** stop attention between documents: the model must build its block-diagonal mask from
``segment_ids``.
"""
from __future__ import annotations

import itertools
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from jtrain.data.collators import IGNORE_INDEX, DataCollatorWithPadding, PaddingSpec, normalize_features

_OVERFLOW = ("split", "truncate", "error")


def group_texts(examples: Mapping[str, Sequence[Sequence[Any]]], block_size: int) -> dict[str, list[list[Any]]]:
    """HF ``run_clm``'s concatenate-and-chunk, for ``datasets.map(batched=True)``.

    Every key is concatenated across the batch and cut into ``block_size`` blocks; the remainder
    shorter than a block is dropped (as HF does), and ``labels`` is a copy of ``input_ids``. Documents
    are not separated: labels cross document boundaries. Use :func:`pack_documents` to avoid that.

    >>> group_texts({"input_ids": [[1, 2, 3], [4, 5]]}, 2)
    {'input_ids': [[1, 2], [3, 4]], 'labels': [[1, 2], [3, 4]]}
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    concatenated = {key: list(itertools.chain.from_iterable(rows)) for key, rows in examples.items()}
    totals = {key: len(values) for key, values in concatenated.items()}
    if len(set(totals.values())) > 1:
        raise ValueError(f"keys have different total lengths, cannot group them together: {totals}")
    total = (next(iter(totals.values()), 0) // block_size) * block_size
    result = {key: [values[i:i + block_size] for i in range(0, total, block_size)]
              for key, values in concatenated.items()}
    if "input_ids" in result:
        result["labels"] = [list(block) for block in result["input_ids"]]
    return result


def _as_row(values: Sequence[int], what: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.int64).reshape(-1)
    if arr.size and (arr.min() < np.iinfo(np.int32).min or arr.max() > np.iinfo(np.int32).max):
        raise ValueError(f"{what} has ids outside int32 range")
    return arr.astype(np.int32)


def _doc_pieces(
    docs: Sequence[Sequence[int]], labels: Sequence[Sequence[int]] | None, block_size: int, overflow: str
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, labels) pieces of at most ``block_size`` tokens; a split document's pieces are separate
    segments (positions restart, first token unpredicted), since attention cannot span rows anyway."""
    if overflow not in _OVERFLOW:
        raise ValueError(f"overflow must be one of {_OVERFLOW}, got {overflow!r}")
    if labels is not None and len(labels) != len(docs):
        raise ValueError(f"got {len(docs)} documents but {len(labels)} label rows")
    pieces = []
    for i, doc in enumerate(docs):
        ids = _as_row(doc, f"document {i}")
        lab = ids if labels is None else _as_row(labels[i], f"labels of document {i}")
        if lab.shape != ids.shape:
            raise ValueError(f"document {i} has {ids.size} tokens but {lab.size} labels")
        if ids.size > block_size and overflow == "error":
            raise ValueError(f"document {i} has length {ids.size}, longer than block_size {block_size}")
        stop = block_size if overflow == "truncate" else ids.size
        pieces += [(ids[s:s + block_size], lab[s:s + block_size]) for s in range(0, min(stop, ids.size), block_size)]
    return pieces


def _next_fit(lengths: Sequence[int], block_size: int) -> list[list[int]]:
    """Group consecutive pieces into rows in order (next-fit): deterministic and order-preserving,
    so a row is a pure function of the document stream."""
    rows: list[list[int]] = []
    used = block_size
    for i, n in enumerate(lengths):
        if used + n > block_size:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows


def layout_row(
    pieces: Sequence[tuple[np.ndarray, np.ndarray]],
    length: int,
    pad_id: int,
    *,
    separator_id: int = IGNORE_INDEX,
    position_start: int = 0,
) -> dict[str, np.ndarray]:
    """One row of ``length`` tokens holding ``pieces`` back to back, then padding.

    Each piece's first label becomes ``separator_id`` (see the module docstring for why).
    """
    used = sum(len(ids) for ids, _ in pieces)
    if used > length:
        raise ValueError(f"{len(pieces)} segments hold {used} tokens, more than the row length {length}")
    row = {"input_ids": np.full(length, pad_id, np.int32), "labels": np.full(length, IGNORE_INDEX, np.int32),
           "attention_mask": np.zeros(length, np.int32), "position_ids": np.zeros(length, np.int32),
           "segment_ids": np.zeros(length, np.int32)}
    offset = 0
    for segment, (ids, labels) in enumerate(pieces, start=1):
        span = slice(offset, offset + len(ids))
        row["input_ids"][span], row["labels"][span] = ids, labels
        row["labels"][offset] = separator_id
        row["attention_mask"][span] = 1
        row["position_ids"][span] = position_start + np.arange(len(ids))
        row["segment_ids"][span] = segment
        offset += len(ids)
    return row


def pack_documents(
    docs: Sequence[Sequence[int]],
    block_size: int,
    pad_id: int,
    *,
    labels: Sequence[Sequence[int]] | None = None,
    overflow: str = "split",
) -> dict[str, np.ndarray]:
    """Pack token documents into ``[rows, block_size]`` int32 arrays with per-document segments.

    Returns ``input_ids``, ``attention_mask``, ``segment_ids`` (1.. per document, 0 on padding),
    ``position_ids`` (restarting at 0 per document) and ``labels`` (``labels`` if given, else the ids;
    -100 on padding and on each document's first token so no label is predicted across a boundary).
    Documents longer than ``block_size`` are split into separate segments (``overflow='split'``),
    cut (``'truncate'``) or rejected (``'error'``). Empty documents are dropped.

    >>> pack_documents([[5, 6, 7], [8, 9]], 4, pad_id=0)["segment_ids"].tolist()
    [[1, 1, 1, 0], [1, 1, 0, 0]]
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    pieces = _doc_pieces(docs, labels, block_size, overflow)
    rows = [layout_row([pieces[i] for i in group], block_size, pad_id)
            for group in _next_fit([len(ids) for ids, _ in pieces], block_size)]
    keys = ("input_ids", "attention_mask", "segment_ids", "position_ids", "labels")
    if not rows:
        return {key: np.zeros((0, block_size), np.int32) for key in keys}
    return {key: np.stack([row[key] for row in rows]) for key in keys}


@dataclass
class DataCollatorWithFlattening:
    """HF's padding-free collator: the batch becomes one ``[1, total]`` row, positions restart per example.

    Adds ``segment_ids`` (1.. per example, 0 on padding) and ``attention_mask``. HF's row length varies
    with every batch, which would recompile the step each time; set ``max_length`` (pad to exactly
    that) or ``length_buckets`` (pad to the smallest bucket that fits) to keep shapes static.
    Labels: each example's ``labels`` (else its ids) with ``separator_id`` on its first token.
    """

    separator_id: int = IGNORE_INDEX
    position_ids_start: int = 0
    pad_token_id: int = 0
    max_length: int | None = None
    length_buckets: tuple[int, ...] | None = None
    return_tensors: str = "np"
    _spec: PaddingSpec = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.return_tensors != "np":
            raise ValueError(f"jtrain collators return numpy arrays; return_tensors must be 'np', "
                             f"got {self.return_tensors!r}")
        padding = "max_length" if self.max_length is not None else "longest"
        self._spec = PaddingSpec(padding, self.max_length, None, self.length_buckets)

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
        rows = [f for f in normalize_features(features) if len(f["input_ids"]) > 0]
        if not rows:
            raise ValueError("DataCollatorWithFlattening received a batch where every example is empty")
        pieces = [(_as_row(f["input_ids"], f"example {i}"), _as_row(f.get("labels", f["input_ids"]), f"labels {i}"))
                  for i, f in enumerate(rows)]
        total = sum(len(ids) for ids, _ in pieces)
        length = self._spec.target_length([total])
        row = layout_row(pieces, length, self.pad_token_id, separator_id=self.separator_id,
                         position_start=self.position_ids_start)
        return {key: value[None, :] for key, value in row.items()}


# --------------------------------------------------------------------------- completion-only (SFT)


def completion_only_labels(prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> dict[str, list[int]]:
    """``input_ids = prompt + completion`` with labels -100 on the prompt, so only the completion is trained.

    The first completion token is predicted from the last prompt token (the loss shifts labels).

    >>> completion_only_labels([1, 2], [3, 4])
    {'input_ids': [1, 2, 3, 4], 'labels': [-100, -100, 3, 4]}
    """
    prompt, completion = [int(t) for t in prompt_ids], [int(t) for t in completion_ids]
    return {"input_ids": prompt + completion, "labels": [IGNORE_INDEX] * len(prompt) + completion}


def _find(haystack: Sequence[int], needle: Sequence[int]) -> int:
    """Index of the first occurrence of ``needle`` in ``haystack``, or -1."""
    n = len(needle)
    return next((i for i in range(len(haystack) - n + 1) if list(haystack[i:i + n]) == list(needle)), -1)


def _template_labels(ids: Sequence[int], template: Sequence[int], row: int) -> list[int]:
    """-100 up to and including the first response template (TRL's rule); all -100 if it is absent."""
    start = _find(ids, template)
    if start < 0:
        warnings.warn(f"row {row}: response template {list(template)} not found; the row gets no loss", stacklevel=3)
        return [IGNORE_INDEX] * len(ids)
    end = start + len(template)
    return [IGNORE_INDEX] * end + [int(t) for t in ids[end:]]


@dataclass
class DataCollatorForCompletionOnlyLM:
    """Pad SFT examples with labels only on the completion (-100 on prompt and padding).

    Each feature is one of: ``prompt_ids`` + ``completion_ids``; ``input_ids`` + ``completion_mask``
    (TRL's tokenized format, 1 on completion tokens); or ``input_ids`` alone with
    ``response_template`` set (TRL's older rule: everything up to and including the first template
    occurrence is prompt). Padding, ``max_length`` and ``length_buckets`` behave as in
    :class:`~jtrain.data.collators.DataCollatorWithPadding`. Returns ``input_ids``, ``attention_mask``, ``labels``.
    """

    tokenizer: Any = None
    pad_token_id: int | None = None
    response_template: tuple[int, ...] | None = None
    max_length: int | None = None
    pad_to_multiple_of: int | None = None
    length_buckets: tuple[int, ...] | None = None
    padding_side: str | None = None
    _padder: DataCollatorWithPadding = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._padder = DataCollatorWithPadding(
            self.tokenizer, True, self.max_length, self.pad_to_multiple_of, self.pad_token_id,
            self.padding_side, self.length_buckets)

    def _lm_row(self, row: int, feature: Mapping[str, Any]) -> dict[str, list[int]]:
        if "prompt_ids" in feature and "completion_ids" in feature:
            return completion_only_labels(feature["prompt_ids"], feature["completion_ids"])
        if "input_ids" in feature and "completion_mask" in feature:
            ids, keep = np.asarray(feature["input_ids"]), np.asarray(feature["completion_mask"]).astype(bool)
            if ids.shape != keep.shape:
                raise ValueError(f"row {row}: input_ids has {ids.size} tokens, completion_mask {keep.size}")
            return {"input_ids": ids.tolist(), "labels": np.where(keep, ids, IGNORE_INDEX).tolist()}
        if "input_ids" in feature and self.response_template is not None:
            ids = [int(t) for t in feature["input_ids"]]
            return {"input_ids": ids, "labels": _template_labels(ids, self.response_template, row)}
        raise KeyError(f"feature {row} needs prompt_ids+completion_ids, input_ids+completion_mask, or input_ids "
                       f"with response_template set; keys present: {sorted(feature)}")

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
        if len(features) == 0:
            raise ValueError("collator received an empty list of features")
        return self._padder([self._lm_row(i, f) for i, f in enumerate(features)])
