"""Data pipeline: corpora, tokenizers, HF-style collators, packing and the sharded host loader."""

from jtrain.data.collators import (DataCollatorForLanguageModeling, DataCollatorForSeq2Seq,
                                   DataCollatorForTokenClassification, DataCollatorWithPadding, DefaultDataCollator,
                                   default_length_buckets)
from jtrain.data.files import load_local_dataset
from jtrain.data.loader import ArrayDataset, HostLoader, LoaderPosition
from jtrain.data.packing import (DataCollatorForCompletionOnlyLM, DataCollatorWithFlattening,
                                 completion_only_labels, group_texts, pack_documents)
from jtrain.data.sampling import length_grouped_order
from jtrain.data.stream import StreamLoader
from jtrain.data.tokenizer import load_tokenizer, train_bpe_tokenizer

__all__ = [
    "ArrayDataset", "HostLoader", "LoaderPosition", "DefaultDataCollator", "DataCollatorWithPadding",
    "DataCollatorForLanguageModeling", "DataCollatorForSeq2Seq", "DataCollatorForTokenClassification",
    "DataCollatorWithFlattening",
    "DataCollatorForCompletionOnlyLM", "completion_only_labels", "group_texts", "pack_documents",
    "default_length_buckets", "load_tokenizer", "train_bpe_tokenizer", "load_local_dataset", "StreamLoader",
    "length_grouped_order",
]
