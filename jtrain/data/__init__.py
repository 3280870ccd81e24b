"""Data pipeline: corpora, tokenizers, HF-style collators, packing and the sharded host loader."""

from jtrain.data.collators import (DataCollatorForLanguageModeling, DataCollatorForTokenClassification,
                                   DataCollatorWithPadding, DefaultDataCollator, default_length_buckets)
from jtrain.data.loader import ArrayDataset, HostLoader, LoaderPosition
from jtrain.data.packing import (DataCollatorForCompletionOnlyLM, DataCollatorWithFlattening,
                                 completion_only_labels, group_texts, pack_documents)
from jtrain.data.tokenizer import load_tokenizer, train_bpe_tokenizer

__all__ = [
    "ArrayDataset", "HostLoader", "LoaderPosition", "DefaultDataCollator", "DataCollatorWithPadding",
    "DataCollatorForLanguageModeling", "DataCollatorForTokenClassification", "DataCollatorWithFlattening",
    "DataCollatorForCompletionOnlyLM", "completion_only_labels", "group_texts", "pack_documents",
    "default_length_buckets", "load_tokenizer", "train_bpe_tokenizer",
]
