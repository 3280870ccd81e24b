"""Which architectures exist, which heads each has, and how they are named in HF checkpoints.

One `Architecture` row per family; `create_model` and the checkpoint code read only this table,
so adding a model type is a row here plus its modules.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any, Mapping

import flax.linen as nn

from jtrain.errors import ConfigError
from jtrain.models import bert, gpt2, llama, mixtral
from jtrain.models.base import Model
from jtrain.models.hfconfig import JTRAIN_OPTIONS, HFConfig
from jtrain.models.layers import REMAT_POLICIES
from jtrain.models.moe import MoEModel
from jtrain.models.attention import ATTENTION_IMPLS
from jtrain.models.ring_attention import SEQUENCE_PARALLEL_ATTENTION

TASKS = ("causal_lm", "sequence_classification", "masked_lm", "token_classification")
DECODER_INPUTS = ("input_ids", "attention_mask", "position_ids", "segment_ids")
ENCODER_INPUTS = DECODER_INPUTS + ("token_type_ids",)

# HF class-name suffix of each task (GPT-2's causal LM is the odd one out: `GPT2LMHeadModel`).
_TASK_SUFFIX = {"causal_lm": "ForCausalLM", "sequence_classification": "ForSequenceClassification",
                "masked_lm": "ForMaskedLM", "token_classification": "ForTokenClassification"}
_SUFFIX_TASK = {"ForCausalLM": "causal_lm", "LMHeadModel": "causal_lm", "ForMaskedLM": "masked_lm",
                "ForPreTraining": "masked_lm", "ForSequenceClassification": "sequence_classification",
                "ForTokenClassification": "token_classification"}


@dataclass(frozen=True)
class Architecture:
    """A model family: its config class, its heads, and its checkpoint naming."""

    config_cls: type[HFConfig]
    heads: Mapping[str, type[nn.Module]]
    default_task: str
    input_names: tuple[str, ...]
    hf_prefix: str  # HF class-name prefix ("Llama" -> LlamaForCausalLM)
    conv1d_pattern: str | None = None  # HF weights stored (in, out) like GPT-2's Conv1D
    model_cls: type[Model] = Model  # MoE families return router statistics too (`jtrain.models.moe.MoEModel`)

    def base_prefix(self, cfg: HFConfig) -> str:
        """Top-level name of the body in checkpoints (`model`, `transformer`, `bert`, `roberta`)."""
        if issubclass(self.config_cls, llama.LlamaConfig):
            return "model"
        return "transformer" if self.config_cls is gpt2.GPT2Config else cfg.model_type

    def architecture_name(self, task: str) -> str:
        if task == "causal_lm" and self.hf_prefix == "GPT2":
            return "GPT2LMHeadModel"
        return self.hf_prefix + _TASK_SUFFIX[task]


_LLAMA_HEADS = {"causal_lm": llama.LlamaForCausalLM, "sequence_classification": llama.LlamaForSequenceClassification,
                "token_classification": llama.LlamaForTokenClassification}
_BERT_HEADS = {"masked_lm": bert.BertForMaskedLM, "sequence_classification": bert.BertForSequenceClassification,
               "token_classification": bert.BertForTokenClassification}

ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture(llama.LlamaConfig, _LLAMA_HEADS, "causal_lm", DECODER_INPUTS, "Llama"),
    "mistral": Architecture(llama.LlamaConfig, _LLAMA_HEADS, "causal_lm", DECODER_INPUTS, "Mistral"),
    "qwen2": Architecture(llama.LlamaConfig, _LLAMA_HEADS, "causal_lm", DECODER_INPUTS, "Qwen2"),
    "qwen3": Architecture(llama.LlamaConfig, _LLAMA_HEADS, "causal_lm", DECODER_INPUTS, "Qwen3"),
    "gemma": Architecture(llama.LlamaConfig, _LLAMA_HEADS, "causal_lm", DECODER_INPUTS, "Gemma"),
    "gemma2": Architecture(llama.LlamaConfig, _LLAMA_HEADS, "causal_lm", DECODER_INPUTS, "Gemma2"),
    "mixtral": Architecture(mixtral.MixtralConfig, _LLAMA_HEADS, "causal_lm", DECODER_INPUTS, "Mixtral",
                            model_cls=MoEModel),
    "gpt2": Architecture(
        gpt2.GPT2Config,
        {"causal_lm": gpt2.GPT2LMHeadModel, "sequence_classification": gpt2.GPT2ForSequenceClassification,
         "token_classification": gpt2.GPT2ForTokenClassification},
        "causal_lm", ENCODER_INPUTS, "GPT2",
        conv1d_pattern=r"^transformer\.h\.\d+\.(attn|mlp)\.c_(attn|proj|fc)\.weight$",
    ),
    "bert": Architecture(bert.BertConfig, _BERT_HEADS, "masked_lm", ENCODER_INPUTS, "Bert"),
    "roberta": Architecture(bert.BertConfig, _BERT_HEADS, "masked_lm", ENCODER_INPUTS, "Roberta"),
}
SUPPORTED_MODEL_TYPES = tuple(sorted(ARCHITECTURES))


def architecture(model_type: str) -> Architecture:
    if model_type not in ARCHITECTURES:
        raise ConfigError(f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    return ARCHITECTURES[model_type]


def task_from_architectures(names: Any) -> str | None:
    """The task named by config.json's `architectures` (None for a bare body like `BertModel`)."""
    for name in names or ():
        for suffix, task in _SUFFIX_TASK.items():
            if str(name).endswith(suffix):
                return task
    return None


def create_model(model_type: str, config: Mapping[str, Any], task: str = "causal_lm", **options: Any) -> Model:
    """Build a freshly initialisable model from an HF-style config dict (config.json names).

    Example::

        model = create_model("bert", {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                                      "intermediate_size": 128, "num_labels": 3}, task="sequence_classification")
        params = model.init(jax.random.key(0))
    """
    arch = architecture(model_type)
    if task not in arch.heads:
        raise ConfigError(f"task {task!r} is not available for {model_type!r}; available: {', '.join(arch.heads)}")
    _check_options(arch.config_cls, options)
    config = dict(config)
    if "num_labels" in options and len(config.get("id2label") or {}) not in (0, options["num_labels"]):
        config.pop("id2label"), config.pop("label2id", None)  # an explicit num_labels wins, as in HF
    cfg = arch.config_cls.from_dict({**config, **options, "model_type": model_type})
    return arch.model_cls(module=arch.heads[task](cfg), config=cfg, task=task, input_names=arch.input_names)


def _check_options(config_cls: type[HFConfig], options: Mapping[str, Any]) -> None:
    """Options must name a config field; a typo gets the closest valid name."""
    valid = {f.name for f in dataclasses.fields(config_cls)} - {"extra"}
    for key, value in options.items():
        if key not in valid:
            close = difflib.get_close_matches(key, sorted(valid), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; jtrain options: {', '.join(JTRAIN_OPTIONS)}"
            raise ConfigError(f"unknown model option {key!r}{hint}")
    if "attention_impl" in options and options["attention_impl"] not in ATTENTION_IMPLS:
        raise ConfigError(f"attention_impl {options['attention_impl']!r} is not one of {', '.join(ATTENTION_IMPLS)}")
    spa = options.get("sequence_parallel_attention", "all_gather")
    if spa not in SEQUENCE_PARALLEL_ATTENTION:
        raise ConfigError(f"sequence_parallel_attention {spa!r} is not one of {', '.join(SEQUENCE_PARALLEL_ATTENTION)}")
    if "remat_policy" in options and options["remat_policy"] not in (None, *REMAT_POLICIES):
        raise ConfigError(f"remat_policy {options['remat_policy']!r} is not one of {', '.join(REMAT_POLICIES)}")
