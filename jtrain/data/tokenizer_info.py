"""What collators need to know about a tokenizer (pad, mask and special ids, vocabulary size, padding
side), read once from a transformers tokenizer, a ``tokenizers.Tokenizer`` or explicit ids, so the
per-batch path never calls into the tokenizer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TokenizerInfo:
    """What collators need from a tokenizer, read once so the per-batch path never calls into it."""

    pad_token_id: int | None = None
    mask_token_id: int | None = None
    special_token_ids: frozenset[int] = frozenset()
    vocab_size: int | None = None
    padding_side: str = "right"
    pad_token_type_id: int = 0


def _raw_tokenizer_info(tokenizer: Any) -> TokenizerInfo:
    """Facts from a ``tokenizers.Tokenizer``, which has no notion of pad/mask roles: use its padding
    config if enabled, else `role_id`'s (its tokenizer_config.json's names, then the conventional spellings)."""
    from jtrain.data.tokenizer import role_id

    padding = tokenizer.padding or {}
    pad_id = padding["pad_id"] if padding else role_id(tokenizer, "pad")
    special = frozenset(int(i) for i, tok in tokenizer.get_added_tokens_decoder().items() if tok.special)
    return TokenizerInfo(pad_id, role_id(tokenizer, "mask"), special,
                         int(tokenizer.get_vocab_size(with_added_tokens=True)),
                         padding.get("direction", "right"), int(padding.get("pad_type_id", 0)))


def _hf_tokenizer_info(tokenizer: Any) -> TokenizerInfo:
    """Facts from a transformers tokenizer; ``len(tokenizer)`` counts added tokens, as HF's MLM uses."""
    special = frozenset(int(i) for i in tokenizer.all_special_ids)
    return TokenizerInfo(tokenizer.pad_token_id, tokenizer.mask_token_id, special, len(tokenizer),
                         tokenizer.padding_side, int(getattr(tokenizer, "pad_token_type_id", 0)))


def tokenizer_info(
    tokenizer: Any | None,
    *,
    pad_token_id: int | None = None,
    mask_token_id: int | None = None,
    padding_side: str | None = None,
) -> TokenizerInfo:
    """Read pad/mask/special ids from a transformers tokenizer, a ``tokenizers.Tokenizer`` or None.

    Explicit arguments win over what the tokenizer says.

    >>> tokenizer_info(None, pad_token_id=0).pad_token_id
    0
    """
    if tokenizer is None:
        info = TokenizerInfo()
    elif hasattr(tokenizer, "all_special_ids"):
        info = _hf_tokenizer_info(tokenizer)
    elif hasattr(tokenizer, "get_added_tokens_decoder"):
        info = _raw_tokenizer_info(tokenizer)
    else:
        raise TypeError(f"tokenizer must be a transformers tokenizer, tokenizers.Tokenizer or None: {type(tokenizer)}")
    pad = info.pad_token_id if pad_token_id is None else pad_token_id
    mask = info.mask_token_id if mask_token_id is None else mask_token_id
    side = padding_side or info.padding_side
    if side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {side!r}")
    special = info.special_token_ids | {i for i in (pad, mask) if i is not None}
    return TokenizerInfo(pad, mask, frozenset(special), info.vocab_size, side, info.pad_token_type_id)
