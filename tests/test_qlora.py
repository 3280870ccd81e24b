"""QLoRA: LoRA adapters (jtrain.peft) on an NF4-quantised, frozen base (jtrain.quant) train.

As in QLoRA, the base is pretrained: a tiny Llama first learns one pattern (token + 5), then its
kernels are stored as NF4 with double quantisation, frozen, and adapters fine-tune it to the
quickstart-style rows of tests/tiny.py (token + 3). (From a random base, adapters alone cannot
move the logits far: the frozen random lm_head caps them.) The base is dequantised inside the
compiled step; only the adapters get gradients and optimizer state. The fine-tune runs on a
data x fsdp mesh so the quantised base is sharded like the float one would be.
"""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
import transformers
from test_models_common import LOGITS_ATOL, hf_forward, padded_batch, real_positions
from tiny import TINY_LLAMA, lm_rows

from jtrain.compiled import build_compiled_steps
from jtrain.errors import ConfigError
from jtrain.losses import causal_lm_loss
from jtrain.memory import tree_nbytes
from jtrain.models import create_model
from jtrain.param_split import leaf_paths
from jtrain.peft import LoraConfig, apply_lora
from jtrain.peft.peft_io import save_merged
from jtrain.quant import (
    QuantFormat,
    QuantizedModel,
    QuantizedTensor,
    quantization_report,
)
from jtrain.sharding import make_mesh
from jtrain.state import TrainState
from jtrain.step import make_train_step

# head_dim 64 and hidden 64 so that QLoRA's block size 64 divides every kernel's last axis
QLORA_LLAMA = {**TINY_LLAMA, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 1,
               "num_key_value_heads": 1}
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _eval_loss(steps, params, batch) -> float:
    out = steps.eval_step(params, steps.place_eval_batch(batch))
    return float(out["loss_sum"]) / float(out["weight"])


def _stride_rows(num_rows: int, length: int, stride: int, seed: int, vocab: int = 64) -> dict:
    """lm_rows' pattern with another stride: the pretraining task."""
    start = np.random.default_rng(seed).integers(1, vocab, size=(num_rows, 1))
    ids = ((start + np.arange(length)[None, :] * stride) % (vocab - 1) + 1).astype(np.int32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids.copy()}


def _pretrained_base(model, steps: int = 24, lr: float = 1e-2):
    tx = optax.adam(lr)
    state = TrainState.create(model.init(jax.random.key(0)), tx, jax.random.key(0))
    step = jax.jit(make_train_step(model.apply, causal_lm_loss, tx, lr_schedule=lr), donate_argnums=0)
    rows = _stride_rows(64, 16, stride=5, seed=1)
    for i in range(steps):
        part = slice((i % 4) * 16, (i % 4 + 1) * 16)
        state, metrics = step(state, {k: v[None, part] for k, v in rows.items()})
    return state.params, float(metrics["loss"])


@pytest.mark.devices(4)
def test_lora_on_nf4_base_trains_and_reports_quantisation_error(tmp_path):
    model = create_model("llama", QLORA_LLAMA)
    float_base, pretrain_loss = _pretrained_base(model)
    assert pretrain_loss < 0.5  # the base knows its pattern
    qmodel = QuantizedModel(model, QuantFormat("nf4", 64, double_quant=True), targets=ALL_LINEAR)
    qbase = jax.jit(qmodel.quantize_params)(float_base)
    report = quantization_report(float_base, qbase)
    print(f"QLoRA base: {report.summary()}; base bytes {tree_nbytes(qbase)} vs {tree_nbytes(float_base)} float")
    # NF4 of near-normal weights: ~9-10% relative Frobenius error (QLoRA's 4-bit grid, absmax per 64);
    # 4.127 bits + the per-tensor double-quantisation mean, which weighs more on these tiny tensors
    assert report.overall < 0.15 and 4.12 < report.bits_per_param < 4.2

    lora = apply_lora(qmodel, LoraConfig(r=8, lora_alpha=16, target_modules=ALL_LINEAR))
    params = lora.init_from_base(qbase, jax.random.key(1))
    mesh = make_mesh({"data": 2, "fsdp": 2})
    lr = 1e-2
    steps = build_compiled_steps(lora, mesh, optax.adam(lr), lr, causal_lm_loss, seed=0)
    state = steps.init_state(params)
    # gradients and optimizer state exist only for the adapters; the NF4 base is frozen and sharded
    assert set(state.params) == {"lora"} and all(p[0] == "base" for p in leaf_paths(state.frozen))
    node = state.frozen["base"]["model"]["layers_0"]["mlp"]["up_proj"]["kernel"]
    assert isinstance(node, QuantizedTensor) and node.codes.sharding.spec[0] == "fsdp"
    # adapters follow the (unquantised) kernel's spec: up_proj's input axis `embed` is split over fsdp
    lora_a = state.params["lora"]["model"]["layers_0"]["mlp"]["up_proj"]["lora_A"]
    assert lora_a.sharding.spec[0] == "fsdp"
    n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state))
    assert n_opt == 2 * sum(x.size for x in jax.tree.leaves(state.params)) + 1  # adam mu, nu, count

    train = lm_rows(64, 16, seed=0)
    evals = lm_rows(16, 16, seed=9)  # other start tokens: held-out rows of the same pattern
    start = _eval_loss(steps, state.full_params(), evals)
    for i in range(30):
        rows = slice((i % 4) * 16, (i % 4 + 1) * 16)
        state, _ = steps.train_step(state, steps.place_train_batch({k: v[None, rows] for k, v in train.items()}))
    end = _eval_loss(steps, state.full_params(), evals)
    print(f"QLoRA eval loss {start:.3f} -> {end:.3f} after 30 steps (base pretrained to {pretrain_loss:.3f})")
    assert np.isfinite(end) and end < 0.1 * start  # "well below its starting value" (seen: ~10.6 -> ~0.05)
    assert steps.compile_log.counts["train"] == 1
    # adapters cannot be folded into 4-bit codes: merging says so instead of failing inside JAX
    params = state.full_params()
    with pytest.raises(ConfigError, match="quantised base cannot be merged"):
        lora.merge(params)
    # the merged HF export dequantises the base and folds the adapters into the float weights:
    # transformers' Llama gives the QLoRA model's logits (LOGITS_ATOL, float32 across frameworks)
    save_merged(lora, params, tmp_path / "merged")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    batch = padded_batch("llama")
    ref, _ = hf_forward(hf, batch)
    ours = np.asarray(jax.jit(lora.apply)(params, batch)["logits"])
    where = real_positions(batch, "causal_lm")
    np.testing.assert_allclose(ours[where], ref[where], atol=LOGITS_ATOL)
