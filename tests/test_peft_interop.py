"""jtrain LoRA adapters <-> HF PEFT, both directions, against `transformers` + `peft` on CPU, offline.

Each case builds a tiny random HF model, saves it and loads it into jtrain (so jtrain and HF hold
the same base weights), then (a) saves a jtrain adapter that `peft.PeftModel.from_pretrained`
loads, and (b) loads an adapter that `peft.get_peft_model` made. B is non-zero in both
directions (PEFT's `init_lora_weights=False`), so a mis-mapped factor changes the logits.
Tolerance: LOGITS_ATOL (1e-4 abs, float32 vs float32 across frameworks; see test_models_common),
the same bar as the base-model parity tests: the adapters add two small float32 matmuls per layer.
"""

from __future__ import annotations

import json
import os
import re

import jax
import numpy as np
import peft  # the `test` extra installs it
import pytest
import torch

from jtrain.errors import CheckpointError
from jtrain.models import from_pretrained
from jtrain.peft import LoraConfig, apply_lora
from jtrain.peft.peft_io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapter, save_adapter, save_merged
from test_models_common import LOGITS_ATOL, hf_forward, hf_model, padded_batch, real_positions

CASES = [
    # (id, model_type, task, HF overrides, targets): targets cover Dense, DenseGeneral with multi-axis
    # outputs (q/k/v: [embed, heads, head_dim], GPT-2's fused c_attn: [embed, 3, heads, head_dim]) and
    # multi-axis inputs (o_proj / c_proj: [heads, head_dim, embed]).
    ("llama", "llama", "causal_lm", {"attention_bias": True}, ["q_proj", "k_proj", "o_proj", "down_proj"]),
    ("gpt2", "gpt2", "causal_lm", {}, ["c_attn", "attn.c_proj", "c_fc"]),
    # SEQ_CLS: PEFT (and jtrain) also train the classifier head in full (modules_to_save)
    ("bert-seqcls", "bert", "sequence_classification", {"num_labels": 3}, ["query", "value"]),
]


def _base(model_type: str, task: str, overrides: dict, tmp_path, seed: int = 0):
    hf = hf_model(model_type, task, seed=seed, **overrides)
    base_dir = tmp_path / f"base-{model_type}-{seed}"
    hf.save_pretrained(base_dir)
    model, params = from_pretrained(base_dir)
    return hf, base_dir, model, params


def _fresh_hf(model_type: str, task: str, overrides: dict, base_dir):
    from test_models_common import HF_AUTO

    return HF_AUTO[task].from_pretrained(base_dir, attn_implementation="eager").eval()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_jtrain_adapter_loads_in_peft(case, tmp_path):
    _, model_type, task, overrides, targets = case
    _, base_dir, model, base_params = _base(model_type, task, overrides, tmp_path)
    lora = apply_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                                        bias="lora_only" if model_type == "llama" else "none"))
    params = lora.init_from_base(base_params, jax.random.key(1))
    if task == "sequence_classification":  # the trained head travels in the adapter file
        params["base"] = jax.tree.map(lambda x: x, params["base"])
        head = params["base"]["classifier"]
        params["base"]["classifier"] = jax.tree.map(lambda x: x + 0.5, head)
    if model_type == "llama":  # trained biases of adapted layers travel in the adapter file too
        bias = params["base"]["model"]["layers_0"]["self_attn"]["q_proj"]["bias"]
        params["base"]["model"]["layers_0"]["self_attn"]["q_proj"]["bias"] = bias + 0.3
    adapter_dir = tmp_path / "adapter"
    save_adapter(lora, params, adapter_dir, base_model_name_or_path=str(base_dir))
    with open(adapter_dir / ADAPTER_CONFIG) as fh:
        assert json.load(fh)["peft_type"] == "LORA"

    hf = _fresh_hf(model_type, task, overrides, base_dir)
    peft_model = peft.PeftModel.from_pretrained(hf, adapter_dir).eval()
    batch = padded_batch(model_type)
    ref, _ = hf_forward(peft_model, batch)
    ours = np.asarray(jax.jit(lora.apply)(params, batch)["logits"])
    where = real_positions(batch, task)
    base_logits = np.asarray(jax.jit(model.apply)(base_params, batch)["logits"])
    assert np.abs(ours - base_logits)[where].max() > 1e-2  # the adapter really changes the output
    np.testing.assert_allclose(ours[where], ref[where], atol=LOGITS_ATOL)
    if model_type == "llama":  # the explicit merged export is a plain HF model with the same logits
        save_merged(lora, params, tmp_path / "merged")
        merged, _ = hf_forward(_fresh_hf(model_type, task, overrides, tmp_path / "merged"), batch)
        np.testing.assert_allclose(merged[where], ours[where], atol=LOGITS_ATOL)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_peft_adapter_loads_in_jtrain(case, tmp_path):
    _, model_type, task, overrides, targets = case
    _, base_dir, model, base_params = _base(model_type, task, overrides, tmp_path)
    hf = _fresh_hf(model_type, task, overrides, base_dir)
    torch.manual_seed(3)
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets, init_lora_weights=False, use_rslora=True,
                             task_type="SEQ_CLS" if task == "sequence_classification" else None)
    peft_model = peft.get_peft_model(hf, config).eval()
    with torch.no_grad():  # a trained head differs from the base's: perturb PEFT's trainable copy
        for name, p in peft_model.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.5 * torch.randn_like(p))
    adapter_dir = tmp_path / "peft-adapter"
    peft_model.save_pretrained(adapter_dir)
    assert os.path.isfile(adapter_dir / ADAPTER_WEIGHTS)

    lora, params = load_adapter(model, base_params, adapter_dir)
    assert lora.lora_config.use_rslora and lora.lora_config.r == 4
    batch = padded_batch(model_type, seed=2)
    ref, _ = hf_forward(peft_model, batch)
    ours = np.asarray(jax.jit(lora.apply)(params, batch)["logits"])
    where = real_positions(batch, task)
    np.testing.assert_allclose(ours[where], ref[where], atol=LOGITS_ATOL)


def test_adapter_for_another_base_is_refused(tmp_path):
    """An adapter saved on a wider model names the module whose shape does not fit."""
    _, _, model, base_params = _base("llama", "causal_lm", {}, tmp_path)
    _, _, wide, wide_params = _base("llama", "causal_lm", {"hidden_size": 48, "num_attention_heads": 4}, tmp_path,
                                    seed=1)
    lora = apply_lora(wide, LoraConfig(r=2, target_modules=["q_proj"]))
    save_adapter(lora, lora.init_from_base(wide_params, jax.random.key(0)), tmp_path / "wide")
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.q_proj.*another base model"):
        load_adapter(model, base_params, tmp_path / "wide")
    with pytest.raises(CheckpointError, match="adapter_config.json"):
        load_adapter(model, base_params, tmp_path)
    # a damaged adapter_config.json: named, never an AttributeError or a JSON traceback
    for text, message in (("[1, 2]", "a PEFT adapter config must hold a JSON object, got list"),
                          ("{r: 8", "cannot read a PEFT adapter config")):
        (tmp_path / "wide" / ADAPTER_CONFIG).write_text(text)
        with pytest.raises(CheckpointError, match=f"wide/adapter_config.json: {re.escape(message)}"):
            load_adapter(model, base_params, tmp_path / "wide")
