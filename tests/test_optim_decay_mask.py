"""decay_mask: HF's no-decay rule (biases, norm weights) on Flax-named trees.

The reference is HF itself: tiny Llama, GPT-2 and BERT models are built locally (random
init, nothing downloaded), `Trainer.get_decay_parameter_names` lists what HF decays, and
the same model's params are renamed the Flax way (`kernel`, `embedding`, `scale`).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from jtrain.optim import decay_mask
from jtrain.optim.decay_mask import decays

A = np.zeros((2, 2), np.float32)
V = np.zeros((2,), np.float32)


def test_llama_like_tree() -> None:
    params = {
        "model": {
            "embed_tokens": {"embedding": A},
            "layers_0": {
                "self_attn": {"q_proj": {"kernel": A, "bias": V}, "o_proj": {"kernel": A}},
                "mlp": {"gate_proj": {"kernel": A}},
                "input_layernorm": {"scale": V},
                "post_attention_layernorm": {"scale": V},
            },
            "norm": {"scale": V},
        },
        "lm_head": {"kernel": A},
    }
    expected = {
        "model": {
            "embed_tokens": {"embedding": True},
            "layers_0": {
                "self_attn": {"q_proj": {"kernel": True, "bias": False}, "o_proj": {"kernel": True}},
                "mlp": {"gate_proj": {"kernel": True}},
                "input_layernorm": {"scale": False},
                "post_attention_layernorm": {"scale": False},
            },
            "norm": {"scale": False},
        },
        "lm_head": {"kernel": True},
    }
    assert decay_mask(params) == expected


def test_gpt2_like_tree() -> None:
    block = {
        "ln_1": {"scale": V, "bias": V},
        "attn": {"c_attn": {"kernel": A, "bias": V}, "c_proj": {"kernel": A, "bias": V}},
        "ln_2": {"scale": V, "bias": V},
        "mlp": {"c_fc": {"kernel": A, "bias": V}},
    }
    params = {"transformer": {"wte": {"embedding": A}, "wpe": {"embedding": A}, "h": [block], "ln_f": {"scale": V}}}
    mask = decay_mask(params)
    t = mask["transformer"]
    assert t["wte"]["embedding"] and t["wpe"]["embedding"]
    assert t["h"][0]["attn"]["c_attn"] == {"kernel": True, "bias": False}
    assert t["h"][0]["ln_1"] == {"scale": False, "bias": False}
    assert t["ln_f"] == {"scale": False}


@pytest.mark.parametrize(
    "name, expected",
    [
        ("transformer/h/0/ln_1/weight", False),  # torch leaf names, '/'-joined
        ("bert.encoder.layer.0.attention.output.LayerNorm.weight", False),
        ("encoder.block.0.layer.0.layer_norm.weight", False),  # T5
        ("model.layers.0.mlp.down_proj.lora_A.kernel", True),  # LoRA factors decay, as in HF
        ("model.normalizer.kernel", True),  # 'norm' only as a whole name component
    ],
)
def test_name_rule(name: str, expected: bool) -> None:
    assert decays(name) is expected


def _flax_leaf(module: torch.nn.Module, pname: str) -> str:
    from transformers.pytorch_utils import Conv1D

    if pname == "bias":
        return "bias"
    if isinstance(module, torch.nn.Embedding):
        return "embedding"
    if isinstance(module, (torch.nn.Linear, Conv1D)):
        return "kernel"
    if "norm" in type(module).__name__.lower():
        return "scale"
    return pname


def _flax_named(model: torch.nn.Module, merge_indices: bool) -> tuple[dict, dict]:
    """Nested Flax-style tree of placeholders and {flax path tuple: torch name}."""
    tree: dict = {}
    names = {}
    for mod_name, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            keys = mod_name.split(".") if mod_name else []
            if merge_indices:  # layers.0 -> layers_0, the flax linen list naming
                merged: list[str] = []
                for k in keys:
                    if k.isdigit() and merged:
                        merged[-1] = f"{merged[-1]}_{k}"
                    else:
                        merged.append(k)
                keys = merged
            path = tuple(keys) + (_flax_leaf(module, pname),)
            node = tree
            for k in path[:-1]:
                node = node.setdefault(k, {})
            node[path[-1]] = V
            names[path] = f"{mod_name}.{pname}" if mod_name else pname
    return tree, names


def _tiny_models() -> list[torch.nn.Module]:
    import transformers as tf

    torch.manual_seed(0)
    small = dict(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, vocab_size=32)
    return [
        tf.LlamaForCausalLM(tf.LlamaConfig(**small, num_key_value_heads=1, attention_bias=True)),
        tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=8, n_layer=1, n_head=2, vocab_size=32, n_positions=16)),
        tf.BertModel(tf.BertConfig(**small)),
    ]


@pytest.mark.parametrize("merge_indices", [False, True])
def test_matches_hf_get_decay_parameter_names(merge_indices: bool) -> None:
    from transformers import Trainer

    for model in _tiny_models():
        hf_decay = set(Trainer.get_decay_parameter_names(None, model))
        tree, names = _flax_named(model, merge_indices)
        mask = decay_mask(tree)
        assert hf_decay and len(hf_decay) < len(names), "the reference must have both kinds"
        for path, torch_name in names.items():
            node = mask
            for k in path:
                node = node[k]
            assert node is (torch_name in hf_decay), f"{type(model).__name__}: {'.'.join(path)} ({torch_name})"
