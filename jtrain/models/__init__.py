"""Model architectures, the registry that builds them from HF-style configs, and HF checkpoint I/O.

Architectures: llama, mistral, qwen2, qwen3, gemma, gemma2, mixtral (the Llama decoder with a mixture
of experts, see `jtrain.models.moe`) and gpt2 (causal_lm, sequence_classification,
token_classification); bert, roberta (masked_lm, sequence_classification, token_classification).
Models return logits only; losses live in `jtrain.losses`.
"""

from __future__ import annotations

from jtrain.models.base import Model, param_count
from jtrain.models.bert import BertConfig
from jtrain.models.gpt2 import GPT2Config
from jtrain.models.hub import (config_to_hf_dict, find_tokenizer_file, from_pretrained, read_config,
                               save_pretrained, to_hf_state_dict)
from jtrain.models.llama import LlamaConfig
from jtrain.models.mixtral import MixtralConfig
from jtrain.models.registry import SUPPORTED_MODEL_TYPES, TASKS, architecture, create_model, task_from_architectures

__all__ = [
    "Model", "LlamaConfig", "MixtralConfig", "GPT2Config", "BertConfig", "create_model", "from_pretrained",
    "save_pretrained",
    "find_tokenizer_file", "config_to_hf_dict", "to_hf_state_dict", "read_config", "param_count", "architecture",
    "task_from_architectures", "SUPPORTED_MODEL_TYPES", "TASKS",
]
