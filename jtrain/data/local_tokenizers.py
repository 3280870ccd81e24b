"""The tokenizer a model family expects, trained locally, and the special ids its config needs.

Why per family: a BERT checkpoint that `transformers` loads expects `[PAD]=0 [UNK] [CLS] [SEP]
[MASK]` and a `[CLS] text [SEP]` template; RoBERTa expects `<s>=0 <pad>=1 </s>=2 <unk> <mask>`;
decoder-only models take `<pad> <s> </s> <unk>` and no template. Training the right vocabulary
and template here lets the saved `tokenizer.json` + `config.json` round-trip through HF.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from jtrain.data.tokenizer import load_tokenizer, train_bpe_tokenizer
from jtrain.errors import ConfigError

BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
ROBERTA_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
DECODER_SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
ENCODER_TYPES = ("bert", "roberta")

# Candidate spellings of each role, most specific first.
_ROLES = {
    "pad": ("<pad>", "[PAD]", "<|pad|>"),
    "bos": ("<s>", "<|begin_of_text|>", "<|startoftext|>"),
    "eos": ("</s>", "<|endoftext|>", "<|end_of_text|>", "<|im_end|>"),
    "cls": ("[CLS]", "<s>"),
    "sep": ("[SEP]", "</s>"),
    "mask": ("[MASK]", "<mask>"),
}


def train_wordpiece_tokenizer(texts: Iterable[str], vocab_size: int, lowercase: bool = False,
                              special_tokens: Sequence[str] = BERT_SPECIALS) -> Tokenizer:
    """A BERT-style WordPiece (whitespace and punctuation split, `##` continuations)."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]" if "[UNK]" in special_tokens else "<unk>"))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                                lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                        show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _add_template(tok: Tokenizer, model_type: str) -> None:
    """The encoder's `[CLS] a [SEP] (b [SEP])` template, so `encode` adds what the model expects."""
    cls, sep = role_id(tok, "cls"), role_id(tok, "sep")
    if cls is None or sep is None:
        return
    if model_type == "roberta":
        tok.post_processor = processors.RobertaProcessing((tok.id_to_token(sep), sep), (tok.id_to_token(cls), cls))
        return
    c, s = tok.id_to_token(cls), tok.id_to_token(sep)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{c} $A {s}", pair=f"{c} $A {s} $B:1 {s}:1", special_tokens=[(c, cls), (s, sep)])


def train_tokenizer_for(model_type: str, texts: Sequence[str], *, vocab_size: int, tokenizer_type: str = "auto",
                        lowercase: bool = False) -> Tokenizer:
    """Train the tokenizer `model_type` expects on `texts` (wordpiece for BERT, byte-level BPE else)."""
    if not texts:
        raise ConfigError("no training text to train a tokenizer on: give `tokenizer.tokenizer_name`")
    kind = tokenizer_type if tokenizer_type != "auto" else ("wordpiece" if model_type == "bert" else "bpe")
    specials = {"bert": BERT_SPECIALS, "roberta": ROBERTA_SPECIALS}.get(model_type, DECODER_SPECIALS)
    if kind == "wordpiece":
        tok = train_wordpiece_tokenizer(texts, vocab_size, lowercase, specials)
    else:
        tok = train_bpe_tokenizer(texts, vocab_size, specials)
    if model_type in ENCODER_TYPES:
        _add_template(tok, model_type)
    return tok


def role_id(tok: Tokenizer, role: str) -> int | None:
    """Id of the first token spelling `role` (pad, bos, eos, cls, sep, mask) that the vocabulary has."""
    for token in _ROLES[role]:
        ident = tok.token_to_id(token)
        if ident is not None:
            return int(ident)
    return None


def model_token_ids(tok: Tokenizer, model_type: str) -> dict[str, int]:
    """config.json fields a fresh model takes from its tokenizer: vocab size and special ids."""
    out = {"vocab_size": tok.get_vocab_size()}
    roles = ("pad",) if model_type == "bert" else ("pad", "bos", "eos")
    for role in roles:
        ident = role_id(tok, role)
        if ident is not None:
            out[f"{role}_token_id"] = ident
    return out


def resolve_tokenizer(tokenizer_name: str | None, model_dir: str | None) -> Tokenizer | None:
    """`tokenizer_name`, else the model directory's tokenizer.json, else None (train one)."""
    if tokenizer_name:
        return load_tokenizer(tokenizer_name)
    if model_dir:
        file = os.path.join(model_dir, "tokenizer.json")
        if not os.path.isfile(file):
            raise ConfigError(f"{model_dir!r} has no tokenizer.json: pass `tokenizer.tokenizer_name` (a tokenizer.json "
                              "or a directory holding one)")
        return load_tokenizer(file)
    return None
