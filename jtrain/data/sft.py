"""Supervised fine-tuning data: (prompt, completion) pairs, causal LM with the loss on the completion only.

Each example is `prompt + completion + EOS`; labels are -100 on the prompt (HF/TRL's
completion-only loss via `DataCollatorForCompletionOnlyLM`), so the model learns to answer, not
to repeat questions. An example longer than `max_seq_length` keeps the end of its prompt (nearest
the answer) and as much completion as fits. The baseline is an add-one unigram model of the
training completions, scored on exactly the completion tokens the evaluation loss scores.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from jtrain.config import DataSection
from jtrain.data.local_tokenizers import role_id
from jtrain.data.packing import DataCollatorForCompletionOnlyLM
from jtrain.data.stdlib_text import sft_pair, split_by_file, stdlib_docstrings
from jtrain.data.task_data import (Baseline, TaskData, TokenizerFactory, collate_all, first, predicted_label_mask,
                                   read_table, resolve_buckets, unigram_loss)
from jtrain.data.tokenizer import encode_batch
from jtrain.errors import ConfigError, DataError

Pair = tuple[str, str]


def stdlib_pairs(d: DataSection) -> dict[str, list[Pair]]:
    """A function's docstring summary -> its `def` line, held out by file."""
    docs = [x for x in stdlib_docstrings(d.stdlib_packages, d.max_files) if x.signature]
    splits = split_by_file(docs, d.validation_percent, per_package=False)
    train = list(dict.fromkeys(sft_pair(x) for x in splits.train))
    seen = {prompt for prompt, _ in train}  # a summary seen in training is not held out
    return {"train": train, "eval": [p for p in dict.fromkeys(map(sft_pair, splits.validation)) if p[0] not in seen]}


def file_pairs(d: DataSection, wanted: Sequence[str]) -> dict[str, list[Pair]]:
    paths = {"train": d.train_file, "eval": d.validation_file, "test": d.test_file}
    out = {}
    for split in wanted:
        table = read_table(paths[split], [d.prompt_column, d.completion_column])
        pairs = list(zip(table[d.prompt_column], table[d.completion_column]))
        bad = next((i for i, (p, c) in enumerate(pairs) if not isinstance(p, str) or not isinstance(c, str) or not c),
                   None)
        if bad is not None:
            raise DataError(f"{paths[split]!r} row {bad}: prompt and completion must be text, and the completion "
                            "non-empty")
        out[split] = pairs
    return out


def fit(prompt: list[int], completion: list[int], max_len: int) -> tuple[list[int], list[int]]:
    """Cut an example to `max_len` tokens: the prompt's end and the completion's start survive."""
    if len(prompt) + len(completion) <= max_len:
        return prompt, completion
    if len(prompt) > max_len // 2:
        prompt = prompt[len(prompt) - max(max_len // 2, max_len - len(completion)):]
    return prompt, completion[:max_len - len(prompt)]


def encode_pairs(tok, pairs: list[Pair], eos: int, max_len: int) -> list[dict]:
    prompts = encode_batch(tok, [p for p, _ in pairs])
    completions = encode_batch(tok, [c for _, c in pairs])
    rows = [fit(p, c + [eos], max_len) for p, c in zip(prompts, completions)]
    return [{"prompt_ids": p, "completion_ids": c} for p, c in rows]


def build_sft_data(pairs: dict[str, list[Pair]], get_tokenizer: TokenizerFactory, d: DataSection, *,
                   length_buckets: Sequence[int] | None = None) -> TaskData:
    train_pairs = first(pairs.get("train", []), d.max_train_samples)
    tok = get_tokenizer([t for pair in train_pairs for t in pair])
    eos = role_id(tok, "eos")
    if eos is None:
        raise ConfigError("the tokenizer has no end-of-sequence token (</s> or <|endoftext|>) to end completions")
    pad = role_id(tok, "pad")
    collator = DataCollatorForCompletionOnlyLM(pad_token_id=eos if pad is None else pad,
                                               length_buckets=resolve_buckets(length_buckets, d.max_seq_length))
    data = TaskData(tok, None, collator)
    completion_ids = np.zeros(0, np.int64)
    if train_pairs:
        data.train = encode_pairs(tok, train_pairs, eos, d.max_seq_length)
        completion_ids = np.concatenate([np.asarray(f["completion_ids"], np.int64) for f in data.train])
    for split in ("eval", "test"):
        if pairs.get(split):
            batch = collate_all(encode_pairs(tok, first(pairs[split], d.eval_limit), eos, d.max_seq_length), collator)
            data.splits[split] = batch
            labels = batch.columns["labels"]
            scored = labels[predicted_label_mask(labels, shifted=True)]
            if completion_ids.size:
                data.baselines[split] = Baseline("unigram", "loss", unigram_loss(completion_ids, scored,
                                                                                 tok.get_vocab_size()))
    data.summary = (f"sft: {len(train_pairs)} train / {len(pairs.get('eval', []))} eval prompt-completion pairs, "
                    f"loss on {completion_ids.size} completion tokens; vocab {tok.get_vocab_size()}")
    return data
