"""The tokenizer a model family expects, trained locally, and the special ids its config needs.

Why per family: a BERT checkpoint that `transformers` loads expects `[PAD]=0 [UNK] [CLS] [SEP]
[MASK]` and a `[CLS] text [SEP]` template; RoBERTa expects `<s>=0 <pad>=1 </s>=2 <unk> <mask>`;
decoder-only models take `<pad> <s> </s> <unk>` and no template. Training the right vocabulary
and template here lets the saved `tokenizer.json` + `config.json` round-trip through HF.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from jtrain.data.tokenizer import load_tokenizer, role_id, train_bpe_tokenizer
from jtrain.errors import ConfigError

BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
ROBERTA_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
DECODER_SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
ENCODER_TYPES = ("bert", "roberta")

# Supplementary private-use planes: characters no text here is expected to hold, one per distinct
# non-initial character of the training words (see train_wordpiece_tokenizer).
_PRIVATE_PLANES = ((0xF0000, 0xFFFFD), (0x100000, 0x10FFFD))


def train_wordpiece_tokenizer(texts: Iterable[str], vocab_size: int, lowercase: bool = False,
                              special_tokens: Sequence[str] = BERT_SPECIALS) -> Tokenizer:
    """A BERT-style WordPiece (whitespace and punctuation split, `##` continuations), the same vocabulary on
    every run.

    tokenizers' WordPieceTrainer (a BPE trainer with a `##` prefix) numbers the `##` pieces in hash-map order
    and breaks ties between equally frequent merges by those numbers, so the same texts gave another vocabulary
    on each run, and a model trained on it other results (huggingface/tokenizers#1794). The same BPE training
    runs here on the normalised, pre-tokenized words with every non-initial character mapped to a private-use
    character: the `##` pieces are then part of the alphabet, which the trainer numbers in sorted order, and
    the learned tokens are mapped back to WordPiece's spelling."""
    normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                            lowercase=lowercase)
    splitter = pre_tokenizers.BertPreTokenizer()
    words = [[w for w, _ in splitter.pre_tokenize_str(normalizer.normalize_str(t))] for t in texts]
    initials, later = {w[0] for ws in words for w in ws}, sorted({c for ws in words for w in ws for c in w[1:]})
    present = initials.union(later)
    free = (chr(code) for low, high in _PRIVATE_PLANES for code in range(low, high + 1) if chr(code) not in present)
    to_private = dict(zip(later, free))
    if len(to_private) < len(later):
        raise ConfigError(f"the tokenizer's training text has {len(later)} distinct characters inside words; "
                          f"at most {len(to_private)} are supported")
    back = {v: k for k, v in to_private.items()}
    mapped = [" ".join(w[0] + "".join(to_private[c] for c in w[1:]) for w in ws) for ws in words]
    # HF's alphabet holds every character of the words on its own as well: those seen only inside words join
    # it as one-character words, which hold no pair and so change no merge
    mapped.append(" ".join(sorted(set(later) - initials)))
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bpe.train_from_iterator(mapped, trainer=trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(special_tokens), show_progress=False))

    def spelled(token: str) -> str:  # a piece of private characters continues a word; others begin one
        plain = "".join(back.get(c, c) for c in token)
        return "##" + plain if token[:1] in back else plain

    vocab = {spelled(token): ident for token, ident in bpe.get_vocab().items()}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]" if "[UNK]" in special_tokens else "<unk>"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = splitter
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(list(special_tokens))
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


def model_token_ids(tok: Tokenizer, model_type: str) -> dict[str, int]:
    """config.json fields a fresh model takes from its tokenizer: vocab size and special ids."""
    out = {"vocab_size": tok.get_vocab_size()}
    roles = ("pad",) if model_type == "bert" else ("pad", "bos", "eos")
    for role in roles:
        ident = role_id(tok, role)
        if ident is not None:
            out[f"{role}_token_id"] = ident
    return out


def position_limit(config: Any) -> int | None:
    """The longest row a model's position table (or rotary context) takes: max_position_embeddings, GPT-2's
    n_positions; RoBERTa's positions start after its pad id."""
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit is not None and getattr(config, "model_type", None) == "roberta":
        limit -= (getattr(config, "pad_token_id", None) or 0) + 1
    return limit


def save_tokenizer(tok: Tokenizer, directory: str, model_config: Any = None) -> None:
    """tokenizer.json, and a tokenizer_config.json naming its special tokens and the model's length.

    Why: `transformers.AutoTokenizer.from_pretrained` on a tokenizer.json alone gives a tokenizer with no
    pad, eos or bos token and an unbounded model_max_length (a Llama's generation never stops, HF's
    collators refuse it); a directory HF's Trainer saved has them. PreTrainedTokenizerFast runs the
    tokenizer.json as it is, template included, so ids match jtrain's."""
    tok.save(os.path.join(directory, "tokenizer.json"))
    encoder = getattr(model_config, "model_type", None) in ENCODER_TYPES
    roles = ("pad", "unk", "cls", "sep", "mask") if encoder else ("bos", "eos", "pad", "unk")
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    for role in roles:
        ident = role_id(tok, role)
        if ident is not None:
            config[f"{role}_token"] = tok.id_to_token(ident)
    limit = position_limit(model_config)
    if limit is not None:
        config["model_max_length"] = int(limit)
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2)


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
