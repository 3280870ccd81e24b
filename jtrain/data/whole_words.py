"""Whole-word masking's words: which tokens belong together, read from the tokenizer's ``offset_mapping``
as HF's ``DataCollatorForLanguageModeling(whole_word_mask=True)`` reads it (no vocabulary convention such as
WordPiece's ``##`` is assumed, so byte-level BPE and SentencePiece pieces group the same way).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def word_starts(offsets: np.ndarray, special: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(word id of each token, -1 on special tokens and padding; True where a token starts a word), from the
    tokenizer's ``offset_mapping`` as HF's whole-word masking reads it: a token starts a word when it does not
    begin where the token before it ended, or follows a special token."""
    starts, ends = offsets[..., 0], offsets[..., 1]
    previous_end = np.roll(ends, 1, axis=1)
    previous_end[:, 0] = -1
    previous_special = np.roll(special, 1, axis=1)
    previous_special[:, 0] = False
    first = ~special & ((starts != previous_end) | previous_special)
    ids = np.cumsum(first, axis=1)
    ids[special] = -1
    return ids, first


def whole_words(word_ids: np.ndarray, selected: np.ndarray) -> np.ndarray:
    """Every token of a word with a selected token is selected (HF's result, in linear memory: HF compares
    every pair of tokens, [B, L, L])."""
    inside = word_ids != -1
    rows, length = word_ids.shape
    key = np.where(inside, word_ids + np.arange(rows)[:, None] * (length + 1), 0)  # one id per (row, word)
    hit = np.zeros(rows * (length + 1), bool)
    hit[key[selected & inside]] = True
    return inside & hit[key]


def pad_offsets(values: list[Any], length: int, side: str) -> np.ndarray:
    """``offset_mapping`` rows (``[n, 2]`` each) padded with (0, 0) to ``[B, length, 2]``."""
    out = np.zeros((len(values), length, 2), np.int32)
    for i, row in enumerate(values):
        arr = np.asarray(row, np.int32).reshape(-1, 2)
        if len(arr) > length:
            raise ValueError(f"row {i}'s offset_mapping has {len(arr)} entries, more than the padded length {length}")
        if side == "right":
            out[i, :len(arr)] = arr
        else:
            out[i, length - len(arr):] = arr
    return out
