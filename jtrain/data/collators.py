"""Host-side batch collators with Hugging Face names and meaning, returning numpy arrays.

Collators turn a list of feature dicts into one dict of **numpy** arrays (int32 for ids, masks
and labels; float32 for float labels). They never build jax arrays: the loader shards the host
batch onto the mesh, and keeping this side numpy means collators run in any worker without a
device. Labels follow HF's convention: ``labels`` are aligned with ``input_ids`` and the one-token
shift happens in the loss; ``-100`` marks positions that carry no loss.

jtrain additions over HF, all for static shapes (one compilation per shape):

- ``length_buckets``: the padded length is the smallest bucket that fits the longest row, so a run
  compiles at most ``len(length_buckets)`` step variants however the lengths vary.
- ``max_length`` is a hard limit: a longer row is an error naming the row, never a silent
  truncation (truncate at tokenization, where the text is still visible).

Packing, flattening and completion-only (SFT) labels live in :mod:`jtrain.data.packing`.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from jtrain.data.tokenizer_info import TokenizerInfo, tokenizer_info
from jtrain.data.whole_words import pad_offsets, whole_words, word_starts

IGNORE_INDEX = -100
"""Label value that carries no loss (HF's and PyTorch's convention)."""

LABEL_KEYS = ("label", "label_ids")
"""HF feature keys renamed to ``labels`` by the collators."""

_INT32 = np.iinfo(np.int32)


# --------------------------------------------------------------------------- lengths


def _round_up(n: int, multiple: int | None) -> int:
    return n if not multiple else -(-n // multiple) * multiple


def default_length_buckets(max_length: int, multiple: int = 64, growth: float = 2.0) -> tuple[int, ...]:
    """Geometric buckets ``multiple, multiple*growth, ... , max_length`` (each a multiple of ``multiple``).

    Why geometric: the number of compiled step shapes grows like ``log(max_length/multiple)``, while
    padding never exceeds a factor ``growth`` of the longest row (plus ``multiple`` rounding).

    >>> default_length_buckets(512)
    (64, 128, 256, 512)
    """
    if max_length < 1 or multiple < 1 or growth <= 1.0:
        raise ValueError(f"need max_length>=1, multiple>=1, growth>1; got {max_length}, {multiple}, {growth}")
    buckets: list[int] = []
    bucket = multiple
    while bucket < max_length:
        buckets.append(bucket)
        bucket = max(bucket + multiple, _round_up(math.ceil(bucket * growth), multiple))
    buckets.append(max_length)
    return tuple(buckets)


_PADDING_NAMES = {True: "longest", "longest": "longest", False: "do_not_pad", "do_not_pad": "do_not_pad",
                  "max_length": "max_length"}


@dataclass(frozen=True)
class PaddingSpec:
    """How long a padded batch is. Validated once at construction, applied per batch."""

    padding: bool | str = True
    max_length: int | None = None
    pad_to_multiple_of: int | None = None
    length_buckets: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        strategy = _PADDING_NAMES.get(getattr(self.padding, "value", self.padding))
        if strategy is None:
            raise ValueError(f"padding must be True, False, 'longest', 'max_length', 'do_not_pad': {self.padding!r}")
        object.__setattr__(self, "padding", strategy)
        if strategy == "max_length" and self.max_length is None:
            raise ValueError("padding='max_length' needs max_length (jtrain does not guess it from the tokenizer)")
        if self.length_buckets is not None:
            self._check_buckets(strategy)

    def _check_buckets(self, strategy: str) -> None:
        buckets = tuple(int(b) for b in self.length_buckets or ())
        if strategy != "longest":
            raise ValueError(f"length_buckets apply only with padding=True/'longest', got padding={strategy!r}")
        if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] < 1:
            raise ValueError(f"length_buckets must be strictly increasing positive ints, got {self.length_buckets}")
        if self.max_length is not None and buckets[-1] > self.max_length:
            raise ValueError(f"largest length bucket {buckets[-1]} exceeds max_length={self.max_length}")
        bad = [b for b in buckets if b % (self.pad_to_multiple_of or 1)]
        if bad:
            raise ValueError(f"length_buckets {bad} are not multiples of pad_to_multiple_of={self.pad_to_multiple_of}")
        object.__setattr__(self, "length_buckets", buckets)

    def _check_limit(self, lengths: Sequence[int]) -> None:
        what, limit = ("the largest length bucket", self.length_buckets[-1]) if self.length_buckets else (
            "max_length", self.max_length)
        for row, n in enumerate(lengths):
            if limit is not None and n > limit:
                raise ValueError(f"row {row} has length {n}, longer than {what} ({limit}); truncate at "
                                 "tokenization (jtrain collators never truncate silently)")

    def target_length(self, lengths: Sequence[int]) -> int:
        """Padded length for rows of these lengths."""
        self._check_limit(lengths)
        longest = max(lengths)
        if self.padding == "do_not_pad":
            if any(n != longest for n in lengths):
                raise ValueError(f"padding=False needs rows of equal length; got lengths {list(lengths)}")
            return longest
        if self.padding == "max_length":
            return _round_up(int(self.max_length), self.pad_to_multiple_of)  # type: ignore[arg-type]
        if self.length_buckets:
            return next(b for b in self.length_buckets if b >= longest)
        return _round_up(longest, self.pad_to_multiple_of)


# --------------------------------------------------------------------------- array helpers


def to_numpy(values: Any, key: str = "?") -> np.ndarray:
    """Stack values into int32/float32/bool numpy; ints outside int32 are an error, not a wrap-around."""
    try:
        arr = np.asarray(values)
    except ValueError as err:  # ragged lists
        raise ValueError(f"cannot stack key {key!r}: rows differ in shape ({err})") from None
    if arr.dtype.kind in "iu":
        if arr.size and (arr.min() < _INT32.min or arr.max() > _INT32.max):
            raise ValueError(f"key {key!r} has integers outside int32 range")
        return arr.astype(np.int32)
    if arr.dtype.kind == "f":
        return arr.astype(np.float32)
    if arr.dtype.kind == "b":
        return arr
    raise TypeError(f"key {key!r} has unsupported dtype {arr.dtype} (only numbers are collated)")


def pad_rows(rows: Sequence[Sequence[int]], length: int, value: int, side: str = "right") -> np.ndarray:
    """``[len(rows), length]`` int32 array, each row placed on the left (side='right') or right."""
    out = np.full((len(rows), length), value, dtype=np.int32)
    for i, row in enumerate(rows):
        arr = np.asarray(row, dtype=np.int32).reshape(-1)
        if arr.size > length:
            raise ValueError(f"row {i} has length {arr.size}, longer than the padded length {length}")
        if arr.size:
            if side == "right":
                out[i, :arr.size] = arr
            else:
                out[i, length - arr.size:] = arr
    return out


def length_mask(lengths: Sequence[int], length: int, side: str = "right") -> np.ndarray:
    """int32 ``[B, length]``: 1 on real tokens, 0 on padding (derived from lengths, not from pad ids)."""
    pos = np.arange(length)[None, :]
    n = np.asarray(lengths)[:, None]
    real = pos < n if side == "right" else pos >= length - n
    return real.astype(np.int32)


def _is_sequence(value: Any) -> bool:
    return isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.ndim >= 1)


def normalize_features(features: Sequence[Any], required: str | None = "input_ids") -> list[dict[str, Any]]:
    """Features as plain dicts with HF label keys renamed to ``labels``; errors name what is present."""
    if len(features) == 0:
        raise ValueError("collator received an empty list of features")
    out = []
    for row, feature in enumerate(features):
        if not isinstance(feature, Mapping):
            raise TypeError(f"feature {row} is a {type(feature).__name__}, expected a dict of lists/ints")
        for key in (*LABEL_KEYS, "labels"):  # HF's default collator fails on these too, less clearly
            if isinstance(feature.get(key), str):
                raise ValueError(f"feature {row} has the string {key} {feature[key]!r}: labels must be class ids; map "
                                 "the names to integers first (datasets: dataset.class_encode_column(...))")
        feature = {k: v for k, v in feature.items() if v is not None and not isinstance(v, str)}
        for key in LABEL_KEYS:
            if key in feature:
                if "labels" in feature:
                    raise ValueError(f"feature {row} has both {key!r} and 'labels'")
                feature["labels"] = feature.pop(key)
        if required is not None and required not in feature:
            raise KeyError(f"feature {row} has no {required!r} key; keys present: {sorted(feature)}")
        out.append(feature)
    return out


# --------------------------------------------------------------------------- padding core

_SEQUENCE_PAD = {"attention_mask": 0, "special_tokens_mask": 1, "position_ids": 0, "segment_ids": 0,
                 "completion_mask": 0}
"""Pad values of known per-token keys (special_tokens_mask pads with 1, as HF's tokenizer.pad does)."""


def _pad_value(key: str, info: TokenizerInfo, label_pad_token_id: int) -> int | None:
    if key == "input_ids":
        return info.pad_token_id
    if key == "labels":
        return label_pad_token_id
    if key == "token_type_ids":
        return info.pad_token_type_id
    return _SEQUENCE_PAD.get(key)


def _collate_key(key: str, values: list[Any], length: int, info: TokenizerInfo, label_pad: int) -> np.ndarray:
    if key == "offset_mapping":  # (start, end) per token, for whole-word masking
        return pad_offsets(values, length, info.padding_side)
    if not _is_sequence(values[0]) or (key == "labels" and np.asarray(values[0]).dtype.kind == "f"):
        return to_numpy(values, key)  # scalars, and float label vectors (multi-label targets) are stacked
    value = _pad_value(key, info, label_pad)
    if key == "input_ids" and value is None:
        if any(len(v) != length for v in values):
            raise ValueError("padding is needed but there is no pad token: set tokenizer.pad_token or pad_token_id")
        value = 0
    if value is None:  # a per-row key jtrain does not know how to pad: it must already be rectangular
        return to_numpy(values, key)
    return pad_rows(values, length, value, info.padding_side)


def pad_features(
    features: Sequence[Mapping[str, Any]],
    info: TokenizerInfo,
    spec: PaddingSpec,
    label_pad_token_id: int = IGNORE_INDEX,
) -> tuple[dict[str, np.ndarray], list[int]]:
    """Pad every per-token key to ``spec``'s length; return the batch and the unpadded row lengths.

    ``attention_mask`` is built from the lengths when absent, as HF's ``tokenizer.pad`` does.
    """
    rows = normalize_features(features)
    lengths = [len(f["input_ids"]) for f in rows]
    length = spec.target_length(lengths)
    batch: dict[str, np.ndarray] = {}
    for key in rows[0]:
        missing = [i for i, f in enumerate(rows) if key not in f]
        if missing:
            raise KeyError(f"key {key!r} is in feature 0 but missing from features {missing[:5]}")
        batch[key] = _collate_key(key, [f[key] for f in rows], length, info, label_pad_token_id)
    if "attention_mask" not in batch:
        batch["attention_mask"] = length_mask(lengths, length, info.padding_side)
    return batch, lengths


def _check_return_tensors(return_tensors: str) -> None:
    if return_tensors != "np":
        raise ValueError(f"jtrain collators return numpy arrays; return_tensors must be 'np', got {return_tensors!r}")


# --------------------------------------------------------------------------- collators


@dataclass
class DefaultDataCollator:
    """Stack features as they are (no padding); ``label``/``label_ids`` become ``labels``.

    Integers become int32 and floats float32 (HF uses int64: JAX runs in 32 bits by default).

    >>> DefaultDataCollator()([{"x": [1, 2], "label": 0}, {"x": [3, 4], "label": 1}])["labels"]
    array([0, 1], dtype=int32)
    """

    return_tensors: str = "np"

    def __post_init__(self) -> None:
        _check_return_tensors(self.return_tensors)

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
        rows = normalize_features(features, required=None)
        return {key: to_numpy([f[key] for f in rows], key) for key in rows[0]}


@dataclass
class DataCollatorWithPadding:
    """Pad ``input_ids``, ``attention_mask``, ``token_type_ids`` and per-token ``labels`` (with -100).

    ``tokenizer`` may be a transformers tokenizer, a ``tokenizers.Tokenizer``, or None with
    ``pad_token_id``. ``padding_side=None`` takes the tokenizer's side (HF behaviour), else 'right'.
    ``length_buckets`` (jtrain): pad to the smallest bucket >= the longest row; this bounds the number
    of compiled step shapes by ``len(length_buckets)``. See :func:`default_length_buckets`.

    >>> c = DataCollatorWithPadding(pad_token_id=0, length_buckets=(4, 8))
    >>> c([{"input_ids": [5, 6, 7]}, {"input_ids": [5]}])["input_ids"]
    array([[5, 6, 7, 0],
           [5, 0, 0, 0]], dtype=int32)
    """

    tokenizer: Any = None
    padding: bool | str = True
    max_length: int | None = None
    pad_to_multiple_of: int | None = None
    pad_token_id: int | None = None
    padding_side: str | None = None
    length_buckets: tuple[int, ...] | None = None
    label_pad_token_id: int = IGNORE_INDEX
    return_tensors: str = "np"
    _info: TokenizerInfo = field(init=False, repr=False)
    _spec: PaddingSpec = field(init=False, repr=False)

    def __post_init__(self) -> None:
        _check_return_tensors(self.return_tensors)
        self._info = tokenizer_info(self.tokenizer, pad_token_id=self.pad_token_id, padding_side=self.padding_side)
        self._spec = PaddingSpec(self.padding, self.max_length, self.pad_to_multiple_of, self.length_buckets)

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
        return pad_features(features, self._info, self._spec, self.label_pad_token_id)[0]


@dataclass
class DataCollatorForTokenClassification(DataCollatorWithPadding):
    """Pad like :class:`DataCollatorWithPadding`; per-token ``labels`` are padded with ``label_pad_token_id``.

    Unlike HF, a ``label`` key is renamed to ``labels`` here too, so every collator yields ``labels``.
    """


@dataclass
class DataCollatorForSeq2Seq:
    """HF's collator for rows that carry their own per-token ``labels`` (prompt tokens already -100, as
    decoder-only fine-tuning data often is): ``input_ids`` padded with the pad id, ``labels`` with
    ``label_pad_token_id``, HF's argument order. ``model`` is accepted for that order; jtrain has no
    encoder-decoder model, so no ``decoder_input_ids`` are made and labels share the inputs' length.
    """

    tokenizer: Any = None
    model: Any = None
    padding: bool | str = True
    max_length: int | None = None
    pad_to_multiple_of: int | None = None
    label_pad_token_id: int = IGNORE_INDEX
    return_tensors: str = "np"
    pad_token_id: int | None = None
    padding_side: str | None = None
    length_buckets: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        self._pad = DataCollatorWithPadding(self.tokenizer, self.padding, self.max_length, self.pad_to_multiple_of,
                                            self.pad_token_id, self.padding_side, self.length_buckets,
                                            self.label_pad_token_id, self.return_tensors)

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
        rows = normalize_features(features)
        longer = [i for i, f in enumerate(rows) if "labels" in f and _is_sequence(f["labels"])
                  and len(f["labels"]) != len(f["input_ids"])]
        if longer:
            raise ValueError(f"features {longer[:5]} have labels of another length than their input_ids: jtrain's "
                             "models are decoder-only or encoders (no encoder-decoder), so labels align with inputs")
        return self._pad(rows)


# --------------------------------------------------------------------------- masked / causal LM


def mask_tokens(
    input_ids: np.ndarray,
    no_mask: np.ndarray,
    rng: np.random.Generator,
    *,
    mask_token_id: int,
    vocab_size: int,
    mlm_probability: float = 0.15,
    mask_replace_prob: float = 0.8,
    random_replace_prob: float = 0.1,
    word_ids: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """BERT's 80/10/10 masking: returns ``(inputs, labels)``, labels -100 where not selected.

    Positions with ``no_mask`` (special tokens, padding) are never selected. With ``word_ids`` (whole-word
    masking: -1 outside words) a selected token selects every token of its word. The draws are made in
    the same order and with the same generator calls as HF's numpy path, so the same Generator
    state gives bit-identical output to ``transformers.DataCollatorForLanguageModeling``.
    """
    inputs, labels = input_ids.copy(), input_ids.copy()
    probability = np.full(labels.shape, mlm_probability)
    probability[no_mask] = 0.0
    selected = rng.binomial(1, probability, size=probability.shape).astype(bool)
    if word_ids is not None:
        selected = whole_words(word_ids, selected)
    labels[~selected] = IGNORE_INDEX
    replaced = rng.binomial(1, mask_replace_prob, size=labels.shape).astype(bool) & selected
    inputs[replaced] = mask_token_id
    if mask_replace_prob == 1 or random_replace_prob == 0:
        return inputs, labels
    scaled = random_replace_prob / (1 - mask_replace_prob)  # P(random | selected and not [MASK])
    randomised = rng.binomial(1, scaled, size=labels.shape).astype(bool) & selected & ~replaced
    inputs[randomised] = rng.integers(0, vocab_size, size=np.count_nonzero(randomised), dtype=np.int64)
    return inputs, labels


@dataclass
class DataCollatorForLanguageModeling:
    """HF's MLM (``mlm=True``) or causal-LM (``mlm=False``) collator, deterministic per (seed, step).

    Masking uses a NumPy Generator derived from ``(seed, step)``: call ``set_step(step)`` before a
    batch (the step then advances by one per call), or pass ``rng=`` to ``__call__``. Either way a
    batch is a pure function of its inputs, so a resumed or re-sharded run sees the same masks.
    Special tokens (``tokenizer.all_special_ids``, ``special_tokens_mask``) and padding are never masked.
    With ``mlm=False`` labels are ``input_ids`` with -100 on padding positions (HF uses ``== pad_id``,
    which also drops real tokens equal to the pad id, e.g. EOS when pad=EOS).

    >>> c = DataCollatorForLanguageModeling(None, mlm=False, pad_token_id=0)
    >>> c([[5, 6], [7]])["labels"].tolist()
    [[5, 6], [7, -100]]
    """

    tokenizer: Any = None
    mlm: bool = True
    whole_word_mask: bool = False
    mlm_probability: float = 0.15
    mask_replace_prob: float = 0.8
    random_replace_prob: float = 0.1
    pad_to_multiple_of: int | None = None
    seed: int = 0
    max_length: int | None = None
    length_buckets: tuple[int, ...] | None = None
    pad_token_id: int | None = None
    mask_token_id: int | None = None
    padding_side: str | None = None
    return_tensors: str = "np"
    _info: TokenizerInfo = field(init=False, repr=False)
    _spec: PaddingSpec = field(init=False, repr=False)
    _step: int = field(init=False, repr=False, default=0)

    def __post_init__(self) -> None:
        _check_return_tensors(self.return_tensors)
        self._info = tokenizer_info(self.tokenizer, pad_token_id=self.pad_token_id,
                                    mask_token_id=self.mask_token_id, padding_side=self.padding_side)
        self._spec = PaddingSpec(True, self.max_length, self.pad_to_multiple_of, self.length_buckets)
        if self.mlm:
            self._check_mlm()
        elif self.whole_word_mask:
            raise ValueError("whole_word_mask needs mlm=True (it picks the words to mask)")
        if self.whole_word_mask and self.mask_replace_prob < 1:  # HF's rule and warning
            warnings.warn("Random token replacement is not supported with whole word masking. Setting "
                          "mask_replace_prob to 1.", UserWarning, stacklevel=3)
            self.mask_replace_prob, self.random_replace_prob = 1.0, 0.0

    def _check_mlm(self) -> None:
        if self._info.mask_token_id is None or self._info.vocab_size is None:
            raise ValueError("mlm=True needs a mask token and a vocabulary size (pass a tokenizer with a mask "
                             "token, or use mlm=False for causal LM)")
        probs = (self.mlm_probability, self.mask_replace_prob, self.random_replace_prob)
        if not all(0.0 <= p <= 1.0 for p in probs) or self.mask_replace_prob + self.random_replace_prob > 1:
            raise ValueError(f"probabilities must lie in [0, 1] with mask_replace+random_replace <= 1; got {probs}")

    def set_step(self, step: int) -> None:
        """Make the next call use the generator for ``(seed, step)``."""
        self._step = int(step)

    def rng_for_step(self, step: int) -> np.random.Generator:
        """The generator a batch at ``step`` uses: independent streams per step via SeedSequence."""
        return np.random.default_rng([self.seed, step])

    def __call__(self, examples: Sequence[Any], rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        if rng is None:
            rng = self.rng_for_step(self._step)
            self._step += 1
        features = [e if isinstance(e, Mapping) else {"input_ids": e} for e in examples]
        batch, lengths = pad_features(features, self._info, self._spec)
        real = length_mask(lengths, batch["input_ids"].shape[1], self._info.padding_side).astype(bool)
        special = batch.pop("special_tokens_mask", None)
        offsets = batch.pop("offset_mapping", None)
        if not self.mlm:
            batch["labels"] = np.where(real, batch["input_ids"], IGNORE_INDEX).astype(np.int32)
            return batch
        no_mask = ~real | np.isin(batch["input_ids"], list(self._info.special_token_ids))
        if special is not None:
            no_mask |= special.astype(bool)
        word_ids = None
        if self.whole_word_mask:
            if offsets is None:
                raise ValueError("whole_word_mask needs each feature's offset_mapping (tokenize with "
                                 "return_offsets_mapping=True; a Trainer keeps that column with "
                                 "remove_unused_columns=False), as HF's collator does")
            word_ids, first = word_starts(offsets, no_mask)
            no_mask = no_mask | ~first  # a word is drawn once, at its first token
        inputs, labels = mask_tokens(
            batch["input_ids"], no_mask, rng, mask_token_id=int(self._info.mask_token_id),  # type: ignore[arg-type]
            vocab_size=int(self._info.vocab_size), mlm_probability=self.mlm_probability,  # type: ignore[arg-type]
            mask_replace_prob=self.mask_replace_prob, random_replace_prob=self.random_replace_prob,
            word_ids=word_ids)
        batch["input_ids"], batch["labels"] = inputs.astype(np.int32), labels.astype(np.int32)
        return batch
