"""PEFT's per-module LoRA options: rank_pattern, alpha_pattern, layers_to_transform, layers_pattern,
exclude_modules (and modules_to_save never adapted), against `peft` itself.

Selection is compared with PEFT's own `check_target_module_exists` over every module name of a
real HF model; adapter files go both ways with logits compared at LOGITS_ATOL (1e-4 abs, float32
across frameworks; see test_models_common). B is random so every factor and scale shows in the output.
"""

from __future__ import annotations

import jax
import numpy as np
import peft
import pytest
from peft.tuners.tuners_utils import check_target_module_exists
from test_models_common import HF_AUTO, LOGITS_ATOL, hf_forward, hf_model, padded_batch, real_positions

from jtrain.errors import ConfigError
from jtrain.models import from_pretrained
from jtrain.peft import LoraConfig, apply_lora
from jtrain.peft.peft_io import load_adapter, save_adapter

OPTIONS = dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
               rank_pattern={"q_proj": 6, r"layers\.2\.mlp\.down_proj": 2}, alpha_pattern={"v_proj": 24},
               layers_to_transform=[1, 2], exclude_modules=["k_proj"], init_lora_weights=False)
SELECTIONS = [  # PEFT LoraConfig options whose module selection jtrain must reproduce
    dict(target_modules=["q_proj", "down_proj"], layers_to_transform=1),
    dict(target_modules=["q_proj", "self_attn.v_proj"], layers_to_transform=[0, 2], layers_pattern="layers"),
    dict(target_modules=["q_proj", "mlp"], layers_to_transform=[2], layers_pattern=["blocks", "layers"]),
    # an exact name is adapted whatever its layer; a suffix only in layers_to_transform
    dict(target_modules=["model.layers.0.self_attn.q_proj", "v_proj"], layers_to_transform=[2]),
    dict(target_modules=r".*\.(q|v)_proj", exclude_modules=r".*layers\.1\..*"),
    dict(target_modules=["q_proj", "v_proj", "o_proj"], exclude_modules=["o_proj", "layers.0.self_attn.v_proj"]),
]


def _base(tmp_path):
    hf_model("llama", "causal_lm", num_hidden_layers=3).save_pretrained(tmp_path / "base")
    model, params = from_pretrained(tmp_path / "base")
    return model, params, HF_AUTO["causal_lm"].from_pretrained(tmp_path / "base", attn_implementation="eager")


@pytest.mark.parametrize("options", SELECTIONS, ids=range(len(SELECTIONS)))
def test_module_selection_is_peft_s(options):
    hf = hf_model("llama", "causal_lm", num_hidden_layers=3)
    names = [name for name, _ in hf.named_modules() if name]
    theirs = {n for n in names if check_target_module_exists(peft.LoraConfig(**options), n)}
    ours_config = LoraConfig(**{k: v for k, v in options.items()})
    ours = {n for n in names if ours_config.selects(n, ours_config.target_modules)}
    assert ours == theirs and theirs


def _check_ranks(lora):
    by_name = {t.name: t for t in lora.targets}
    assert sorted(by_name) == ["model.layers.1.mlp.down_proj", "model.layers.1.self_attn.q_proj",
                               "model.layers.1.self_attn.v_proj", "model.layers.2.mlp.down_proj",
                               "model.layers.2.self_attn.q_proj", "model.layers.2.self_attn.v_proj"]
    assert {n: (t.r, t.scaling) for n, t in by_name.items() if "layers.2" in n} == {
        "model.layers.2.mlp.down_proj": (2, 4.0), "model.layers.2.self_attn.q_proj": (6, 8 / 6),
        "model.layers.2.self_attn.v_proj": (4, 6.0)}


def test_peft_adapter_with_patterns_loads_in_jtrain(tmp_path):
    model, base_params, hf = _base(tmp_path)
    peft_model = peft.get_peft_model(hf, peft.LoraConfig(**OPTIONS)).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    lora, params = load_adapter(model, base_params, tmp_path / "adapter")
    _check_ranks(lora)
    batch = padded_batch("llama", seed=2)
    ref, _ = hf_forward(peft_model, batch)
    ours = np.asarray(jax.jit(lora.apply)(params, batch)["logits"])
    where = real_positions(batch, "causal_lm")
    np.testing.assert_allclose(ours[where], ref[where], atol=LOGITS_ATOL)


def test_jtrain_adapter_with_patterns_loads_in_peft(tmp_path):
    model, base_params, hf = _base(tmp_path)
    lora = apply_lora(model, LoraConfig(**OPTIONS))
    _check_ranks(lora)
    params = lora.init_from_base(base_params, jax.random.key(1))
    save_adapter(lora, params, tmp_path / "adapter")
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    assert peft_model.base_model.model.model.layers[2].self_attn.q_proj.r["default"] == 6
    batch = padded_batch("llama", seed=3)
    ref, _ = hf_forward(peft_model, batch)
    ours = np.asarray(jax.jit(lora.apply)(params, batch)["logits"])
    where = real_positions(batch, "causal_lm")
    np.testing.assert_allclose(ours[where], ref[where], atol=LOGITS_ATOL)
    merged = np.asarray(model.apply(lora.merge(params), batch)["logits"])  # per-module scales in the merge too
    np.testing.assert_allclose(merged[where], ours[where], atol=1e-5)


def test_patterns_on_scanned_layers(tmp_path):
    """Per-module ranks and scales on a layer stack: each stacked module keeps its own (the logits equal
    the unscanned model's, 1e-5: the scan only reorders float32 sums); a pattern that would give the
    layers of one stack different ranks, or select only some layers, is refused."""
    model, base_params, _ = _base(tmp_path)
    scanned, scan_params = from_pretrained(tmp_path / "base", scan_layers=True)
    config = LoraConfig(target_modules=["q_proj", "v_proj"], rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 16},
                        init_lora_weights=False)
    flat, stack = apply_lora(model, config), apply_lora(scanned, config)
    assert sorted((t.name, t.r, t.scaling) for t in stack.targets) == [
        ("model.layers.layer.self_attn.q_proj", 2, 4.0), ("model.layers.layer.self_attn.v_proj", 8, 2.0)]
    batch = padded_batch("llama", seed=4)
    want = flat.apply(flat.init_from_base(base_params, jax.random.key(0)), batch)["logits"]
    got = stack.apply(stack.init_from_base(scan_params, jax.random.key(0)), batch)["logits"]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    with pytest.raises(ConfigError, match="different ranks or scales"):
        apply_lora(scanned, LoraConfig(target_modules=["q_proj"], rank_pattern={r"layers\.1\.self_attn\.q_proj": 2}))
    with pytest.raises(ConfigError, match="must select a module in every layer"):
        apply_lora(scanned, LoraConfig(target_modules=["q_proj"], layers_to_transform=[0]))
    for bad, message in (({"rank_pattern": {"q_proj": 2.5}}, "positive integers"),
                         ({"alpha_pattern": {"q_proj": -1}}, "positive numbers"),
                         ({"layers_to_transform": ["1"]}, "layer index")):
        with pytest.raises(ConfigError, match=message):
            LoraConfig(**bad)


def test_a_run_config_takes_the_per_module_options(tmp_path):
    from jtrain.config import load_config

    path = tmp_path / "lora.yaml"
    path.write_text("peft: {target_modules: [q_proj, v_proj], rank_pattern: {q_proj: 6}, alpha_pattern: {v_proj: 24},"
                    " layers_to_transform: [1], exclude_modules: [k_proj]}\n")
    config = load_config(str(path)).peft.lora_config()
    assert (config.rank_pattern, config.alpha_pattern, config.layers_to_transform, config.exclude_modules) == (
        {"q_proj": 6}, {"v_proj": 24.0}, (1,), ("k_proj",))
    path.write_text("peft: {rank_pattern: {q_proj: 0}}\n")
    with pytest.raises(ConfigError, match="rank_pattern values must be positive integers"):
        load_config(str(path))
