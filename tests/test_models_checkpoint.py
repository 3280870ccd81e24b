"""HF checkpoints: jtrain -> save_pretrained -> transformers, round trips, sharding, dtypes, bad input."""

from __future__ import annotations

import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding, PartitionSpec as P

from jtrain.errors import CheckpointError, ConfigError
from jtrain.models import (config_to_hf_dict, create_model, find_tokenizer_file, from_pretrained,
                           save_pretrained)
from jtrain.models import safetensors_io
from test_models_common import HF_AUTO, LOGITS_ATOL, TINY, hf_forward, hf_model, padded_batch, real_positions
from test_models_grads import hf_named

SAVE_CASES = [
    ("llama", "causal_lm", {"rope_theta": 500.0, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    ("llama", "sequence_classification", {"num_labels": 3}),
    ("qwen2", "causal_lm", {}),
    ("mistral", "causal_lm", {}),
    ("gemma", "causal_lm", {}),
    ("qwen3", "causal_lm", {}),
    ("gemma2", "causal_lm", {}),
    ("gpt2", "causal_lm", {}),
    ("gpt2", "sequence_classification", {"num_labels": 3}),
    ("bert", "masked_lm", {}),
    ("bert", "sequence_classification", {"num_labels": 3}),
    ("roberta", "sequence_classification", {"num_labels": 2}),
    ("roberta", "token_classification", {"num_labels": 4}),
]


def _random_params(model, seed: int = 0):
    """Random values for every leaf, drawn on the host from the abstract params (no init to compile).

    Norm scales are drawn around 1 and everything else around 0 with std 0.1, so a mis-mapped
    bias, scale or layout changes logits far beyond the tolerance.
    """
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        base = 1.0 if path[-1].key == "scale" else 0.0
        return jnp.asarray(base + 0.1 * rng.standard_normal(leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, model.abstract_params())


def _jtrain_model(model_type, task, overrides, **options):
    model = create_model(model_type, {**TINY[model_type], **overrides}, task, **options)
    return model, _random_params(model)


def _assert_same_logits(model, params, hf, model_type, task):
    batch = padded_batch(model_type)
    logits = np.asarray(jax.jit(model.apply)(params, batch)["logits"])
    hf_logits, _ = hf_forward(hf, batch)
    where = real_positions(batch, task)
    np.testing.assert_allclose(logits[where], hf_logits[where], atol=LOGITS_ATOL)


def _assert_hf_holds(hf, model, params):
    """Every tensor HF loaded equals the jtrain param it came from (converted to HF layout)."""
    state = hf.state_dict()
    for name, tensor in hf_named(model, params).items():
        np.testing.assert_array_equal(state[name].float().numpy(), tensor.astype(np.float32), err_msg=name)


# Logits are compared for a few cases (one compile each); the rest compare every tensor exactly,
# which with the logits parity of test_models_parity/grads implies the same logits.
LOGITS_CHECKED = {("llama", "causal_lm"), ("gpt2", "sequence_classification"), ("roberta", "token_classification")}


@pytest.mark.parametrize("model_type,task,overrides", SAVE_CASES, ids=[f"{c[0]}-{c[1]}" for c in SAVE_CASES])
def test_saved_checkpoint_loads_in_transformers(model_type, task, overrides, tmp_path):
    model, params = _jtrain_model(model_type, task, overrides)
    save_pretrained(model, params, tmp_path)
    hf, info = HF_AUTO[task].from_pretrained(tmp_path, output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    _assert_hf_holds(hf, model, params)
    if (model_type, task) in LOGITS_CHECKED:
        _assert_same_logits(model, params, hf.eval(), model_type, task)


@pytest.mark.parametrize("model_type,task", [("llama", "causal_lm"), ("gpt2", "causal_lm"), ("bert", "masked_lm"),
                                             ("roberta", "sequence_classification")])
def test_hf_round_trip_is_exact(model_type, task, tmp_path):
    """HF -> jtrain -> save_pretrained -> HF reproduces every tensor bit for bit."""
    hf = hf_model(model_type, task)
    hf.save_pretrained(tmp_path / "hf")
    model, params = from_pretrained(tmp_path / "hf")
    save_pretrained(model, params, tmp_path / "jt")
    again = HF_AUTO[task].from_pretrained(tmp_path / "jt")
    reference = hf.state_dict()
    for name, tensor in again.state_dict().items():
        assert torch.equal(tensor, reference[name]), name


def test_sharded_save_with_scanned_layers(tmp_path):
    model, params = _jtrain_model("llama", "causal_lm", {}, scan_layers=True)
    files = save_pretrained(model, params, tmp_path, max_shard_size="12KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all(os.path.join(tmp_path, s) in files for s in shards)
    assert not (tmp_path / "model.safetensors").exists()
    hf = HF_AUTO["causal_lm"].from_pretrained(tmp_path)
    _assert_hf_holds(hf, model, params)
    unscanned, loaded = from_pretrained(tmp_path)  # sharded index, into the unscanned layout
    _assert_hf_holds(hf, unscanned, loaded)


def test_load_onto_mesh_shardings(tmp_path):
    hf_model("llama", "causal_lm").save_pretrained(tmp_path)
    model, plain = from_pretrained(tmp_path)
    mesh = jax.make_mesh((4, 2), ("fsdp", "tensor"), devices=jax.devices()[:8])
    rules = {"embed": "fsdp", "vocab": "tensor", "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor"}
    shardings = jax.tree.map(lambda spec: NamedSharding(mesh, P(*[rules.get(a) for a in spec])),
                             model.logical_axes(), is_leaf=lambda x: isinstance(x, P))
    _, params = from_pretrained(tmp_path, mesh_shardings=shardings)
    for got, want, sharding in zip(jax.tree.leaves(params), jax.tree.leaves(plain), jax.tree.leaves(shardings)):
        assert got.sharding == sharding
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    q = params["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]  # (embed, heads, head_dim) over (4, 2)
    assert q.addressable_shards[0].data.shape == (32 // 4, 4 // 2, 8)
    del shardings["lm_head"]
    with pytest.raises(ConfigError, match="mesh_shardings does not match .* lm_head/kernel"):
        from_pretrained(tmp_path, mesh_shardings=shardings)


def test_dtypes_on_load_and_save(tmp_path):
    model, params = _jtrain_model("bert", "masked_lm", {})
    save_pretrained(model, params, tmp_path, dtype="bfloat16")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["torch_dtype"] == config["dtype"] == "bfloat16"
    assert {i.dtype for i in safetensors_io.read_header(str(tmp_path / "model.safetensors")).values()} \
        == {np.dtype(jnp.bfloat16)}
    _, auto = from_pretrained(tmp_path, dtype="auto")
    _, f32 = from_pretrained(tmp_path)
    assert {x.dtype for x in jax.tree.leaves(auto)} == {jnp.dtype(jnp.bfloat16)}
    for a, b, p in zip(jax.tree.leaves(auto), jax.tree.leaves(f32), jax.tree.leaves(params)):
        assert b.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b))
        np.testing.assert_array_equal(np.asarray(b), np.asarray(p.astype(jnp.bfloat16), np.float32))
    hf = HF_AUTO["masked_lm"].from_pretrained(tmp_path)
    assert hf.dtype == torch.bfloat16


def test_config_to_hf_dict_names_the_architecture():
    model = create_model("gpt2", TINY["gpt2"], "sequence_classification", num_labels=3, scan_layers=True)
    config = config_to_hf_dict(model)
    assert config["architectures"] == ["GPT2ForSequenceClassification"] and config["model_type"] == "gpt2"
    assert config["n_embd"] == 32 and len(config["id2label"]) == 3
    assert "scan_layers" not in config and config["torch_dtype"] == "float32"


# ---------------------------------------------------------------- heads from other checkpoints


def test_classifier_on_masked_lm_checkpoint_is_freshly_initialised(tmp_path):
    hf_model("bert", "masked_lm").save_pretrained(tmp_path)
    with pytest.warns(UserWarning) as record:
        model, params = from_pretrained(tmp_path, task="sequence_classification", num_labels=3)
    text = " ".join(str(w.message) for w in record)
    assert "newly initialised" in text and "bert/pooler/dense/kernel" in text and "classifier/kernel" in text
    assert "cls.predictions.transform.dense.weight" in text  # the unused MLM head is reported
    kernel = np.asarray(params["classifier"]["kernel"])
    assert kernel.shape == (32, 3) and 0.005 < kernel.std() < 0.05  # normal(initializer_range=0.02)
    np.testing.assert_array_equal(params["classifier"]["bias"], 0.0)
    assert jax.tree.structure(params) == jax.tree.structure(model.abstract_params())


def test_bare_body_checkpoint_without_prefix(tmp_path):
    """`BertModel` checkpoints have no `bert.` prefix; the body still loads and the head is new."""
    hf = hf_model("bert", "masked_lm")
    hf.bert.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="classifier"):
        _, params = from_pretrained(tmp_path, task="token_classification", num_labels=4)
    np.testing.assert_array_equal(params["bert"]["embeddings"]["word_embeddings"]["embedding"],
                                  hf.bert.embeddings.word_embeddings.weight.detach().numpy())


# ---------------------------------------------------------------- bad input


def _rewrite_weights(directory, edit):
    path = os.path.join(directory, "model.safetensors")
    infos = safetensors_io.read_header(path)
    tensors = {k: np.array(safetensors_io.read_tensor(v)) for k, v in infos.items()}
    safetensors_io.write_file(path, edit(tensors))


def test_missing_weight_names_key_and_shape(tmp_path):
    hf_model("llama", "causal_lm").save_pretrained(tmp_path)
    _rewrite_weights(tmp_path, lambda t: {k: v for k, v in t.items() if k != "model.layers.1.mlp.up_proj.weight"})
    with pytest.raises(CheckpointError, match=r"missing model\.layers\.1\.mlp\.up_proj\.weight.*\(64, 32\)"):
        from_pretrained(tmp_path)


def test_shape_mismatch_names_key_and_both_shapes(tmp_path):
    hf_model("bert", "sequence_classification", num_labels=3).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"(?s)classifier\.weight: checkpoint \(3, 32\) vs model \(5, 32\)"
                                              r".*ignore_mismatched_sizes=True"):
        from_pretrained(tmp_path, num_labels=5)


def test_ignore_mismatched_sizes_initialises_the_misshaped_head_as_hf(tmp_path):
    """HF's `from_pretrained(..., ignore_mismatched_sizes=True)`: a classifier's head for another num_labels is
    initialised afresh (with a warning naming both shapes) and the body loads. jtrain had no such flag, so
    fine-tuning a classifier on another label count could not start (the scripts ignored the argument)."""
    hf = hf_model("bert", "sequence_classification", num_labels=3)
    hf.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match=r"classifier\.weight: checkpoint \(3, 32\) vs model \(5, 32\)") as rec:
        model, params = from_pretrained(tmp_path, num_labels=5, ignore_mismatched_sizes=True)
    assert "classifier/kernel" in str(rec[0].message) and "pooler" not in str(rec[0].message)
    kernel = np.asarray(params["classifier"]["kernel"])
    assert kernel.shape == (32, 5) and 0.005 < kernel.std() < 0.05  # normal(initializer_range=0.02)
    np.testing.assert_array_equal(params["classifier"]["bias"], 0.0)
    np.testing.assert_array_equal(params["bert"]["pooler"]["dense"]["kernel"],
                                  hf.bert.pooler.dense.weight.detach().numpy().T)
    assert jax.tree.structure(params) == jax.tree.structure(model.abstract_params())


def test_unexpected_keys_are_listed_in_a_warning(tmp_path):
    hf_model("gpt2", "causal_lm").save_pretrained(tmp_path)
    _rewrite_weights(tmp_path, lambda t: {**t, "transformer.extra.weight": np.zeros(3, np.float32),
                                          "transformer.h.0.attn.bias": np.zeros(3, np.float32)})
    with pytest.warns(UserWarning, match="transformer.extra.weight") as record:
        from_pretrained(tmp_path)
    assert "attn.bias" not in str(record[0].message)  # an old causal-mask buffer, not a weight


def test_bad_configs_and_paths(tmp_path):
    supported = "supported: bert, gemma, gemma2, gpt2, llama, mistral, mixtral, qwen2, qwen3, roberta"
    with pytest.raises(ConfigError, match=supported):
        create_model("t5", {})
    with pytest.raises(ConfigError, match="did you mean 'scan_layers'"):
        create_model("llama", TINY["llama"], scan_layer=True)
    with pytest.raises(ConfigError, match="task 'masked_lm' is not available for 'gpt2'"):
        create_model("gpt2", TINY["gpt2"], "masked_lm")
    with pytest.raises(CheckpointError, match="never downloads.*--local-dir"):
        from_pretrained("meta-llama/Llama-3.2-1B")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=f"{tmp_path}/config.json"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(ConfigError, match="config.json: unsupported model_type 't5'"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", **TINY["bert"]}))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        from_pretrained(tmp_path)


def test_find_tokenizer_file(tmp_path):
    assert find_tokenizer_file(tmp_path) is None
    (tmp_path / "tokenizer.json").write_text("{}")
    assert find_tokenizer_file(tmp_path) == os.path.join(tmp_path, "tokenizer.json")


def test_no_warnings_on_a_clean_load(tmp_path):
    hf_model("roberta", "masked_lm").save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from_pretrained(tmp_path)
