"""Tokenizers: load a fast `tokenizer.json`, or train a byte-level BPE on a local corpus.

jtrain uses the `tokenizers` library directly (Rust, fast, no transformers needed at run time).
It is imported when a tokenizer is made or loaded, not with `jtrain`: a training job on
pre-tokenized arrays (a GPU benchmark, a research loop) needs only the JAX stack.
"""

from __future__ import annotations

import os
import weakref
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

from jtrain.errors import ConfigError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

DEFAULT_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int, special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS
) -> Tokenizer:
    """A byte-level BPE (GPT-2 style) trained on `texts`; special tokens get the first ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(special_tokens), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(path: str) -> Tokenizer:
    """Load `tokenizer.json` (or a directory holding one), naming the file on failure."""
    from tokenizers import Tokenizer

    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise ConfigError(f"tokenizer file {file!r} not found: point `tokenizer_name` at a tokenizer.json "
                          "or a directory that holds one (jtrain never downloads)")
    try:
        tok = Tokenizer.from_file(file)
    except Exception as err:  # the Rust error says little; name the file
        raise ConfigError(f"cannot read tokenizer {file!r}: {err}") from err
    named = _config_roles(tokenizer_config(os.path.dirname(file)))
    if named:
        NAMED_ROLES[tok] = named
    return tok


def tokenizer_config(folder: str) -> dict:
    """The tokenizer_config.json of a tokenizer directory (HF's: special tokens, model_max_length), or {}."""
    path = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(path):
        return {}
    from jtrain.jsonfile import read_json_object

    return read_json_object(path, what="a tokenizer config")


ROLE_SPELLINGS = {
    "pad": ("<pad>", "[PAD]", "<|pad|>"),
    "bos": ("<s>", "<|begin_of_text|>", "<|startoftext|>", "<bos>"),
    "eos": ("</s>", "<|endoftext|>", "<|end_of_text|>", "<|im_end|>", "<eos>"),
    "cls": ("[CLS]", "<s>"),
    "sep": ("[SEP]", "</s>"),
    "mask": ("[MASK]", "<mask>"),
    "unk": ("[UNK]", "<unk>", "<|unk|>"),
}
"""Conventional spellings of each special role, most specific first (a `tokenizers.Tokenizer` has no roles)."""

NAMED_ROLES: "weakref.WeakKeyDictionary[Tokenizer, dict[str, str]]" = weakref.WeakKeyDictionary()
"""Special tokens a loaded tokenizer's tokenizer_config.json names (role -> token), as transformers reads them:
Gemma's `<eos>`, a Llama-3 chat model's `<|eot_id|>`; `role_id` asks here first."""


def role_id(tok: Tokenizer, role: str) -> int | None:
    """Id of the token its tokenizer_config.json names for `role` (pad, bos, eos, cls, sep, mask, unk), else of
    the first conventional spelling the vocabulary has."""
    named = NAMED_ROLES.get(tok, {}).get(role)
    for token in ((named,) if named else ()) + ROLE_SPELLINGS[role]:
        ident = tok.token_to_id(token)
        if ident is not None:
            return int(ident)
    return None


def _config_roles(config: dict) -> dict[str, str]:
    """{"eos": "<eos>", ...} from a tokenizer_config's `*_token` entries (a string, or {"content": ...})."""
    out = {}
    for role in ROLE_SPELLINGS:
        value = config.get(f"{role}_token")
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str) and value:
            out[role] = value
    return out


def token_id(tok: Tokenizer, token: str) -> int:
    ident = tok.token_to_id(token)
    if ident is None:
        raise ConfigError(f"the tokenizer has no {token!r} token")
    return ident


def encode_batch(tok: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens (callers add BOS/EOS explicitly)."""
    return [e.ids for e in tok.encode_batch(list(texts), add_special_tokens=False)]


@contextmanager
def truncated(tok: Tokenizer, length: int) -> Iterator[Tokenizer]:
    """`tok` truncating every encoding to `length` tokens (template included) inside the block; its own
    truncation setting is restored after, since a tokenizer object is shared by every split and task."""
    previous = tok.truncation
    tok.enable_truncation(length)
    try:
        yield tok
    finally:
        tok.enable_truncation(**previous) if previous else tok.no_truncation()
