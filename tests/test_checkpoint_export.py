"""`Trainer.save_model()` writes what `transformers` loads: config.json + safetensors (sharded above
`max_shard_size`), checked on a quickstart-like tiny Llama (tied embeddings, grouped KV heads)
whose every weight, norm scales included, is random.

Tolerance: 1e-4 abs on logits. Both sides compute in float32; reordered sums differ by ~1e-6
relative per op and the tiny 2-layer model amplifies that to ~1e-5 at most, while a mis-mapped
weight, transposition or tied head moves logits by >1e-2 (as in tests/test_models_common.py).
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers

from jtrain import Trainer, TrainingArguments, create_model
from jtrain.data.loader import ArrayDataset
from tiny import lm_rows

LOGITS_ATOL = 1e-4  # float32 vs float32 across frameworks, see the module docstring
QUICKSTART_LIKE = dict(vocab_size=64, hidden_size=32, intermediate_size=86, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=True)


def _random_params(model, seed: int = 0):
    """Random values for every weight (norm scales around 1, the rest around 0, std 0.1), drawn on
    the host: an init or a few updates leave norm scales at ~1 and would hide a mis-mapped one."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        base = 1.0 if path[-1].key == "scale" else 0.0
        return (base + 0.1 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, model.abstract_params())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A Trainer holding random params, not trained (save_model sets up the state itself)."""
    out = tmp_path_factory.mktemp("export")
    args = TrainingArguments(output_dir=str(out / "run"), max_steps=1, disable_tqdm=True, mesh_shape={"data": 1})
    model = create_model("llama", QUICKSTART_LIKE)
    trainer = Trainer(model, args, train_dataset=ArrayDataset(lm_rows(16, 16)), params=_random_params(model))
    return trainer, out


def _batch() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 64, size=(2, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 7:] = 0  # one padded row
    return {"input_ids": ids, "attention_mask": mask}


def _assert_transformers_matches(trainer, directory) -> None:
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    batch = _batch()
    with torch.no_grad():
        want = hf(input_ids=torch.as_tensor(batch["input_ids"]).long(),
                  attention_mask=torch.as_tensor(batch["attention_mask"]).long()).logits.numpy()
    got = np.asarray(jax.jit(trainer.model.apply)(trainer.params, batch)["logits"])
    real = batch["attention_mask"].astype(bool)  # logits at padding positions are unspecified
    np.testing.assert_allclose(got[real], want[real], atol=LOGITS_ATOL, rtol=0)


def test_save_model_loads_in_transformers_with_same_logits(trained):
    trainer, out = trained
    directory = trainer.save_model(str(out / "single"))
    assert {"config.json", "model.safetensors"} <= set(os.listdir(directory))
    assert json.loads(open(os.path.join(directory, "config.json")).read())["tie_word_embeddings"] is True
    _assert_transformers_matches(trainer, directory)


def test_save_model_shards_above_the_threshold(trained):
    trainer, out = trained
    directory = trainer.save_model(str(out / "sharded"), max_shard_size=4096)  # ~20 KB of weights
    shards = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    assert len(shards) > 1 and shards[0].startswith("model-00001-of-")
    index = json.loads(open(os.path.join(directory, "model.safetensors.index.json")).read())
    assert set(index["weight_map"].values()) == set(shards)
    _assert_transformers_matches(trainer, directory)


def test_every_checkpoint_holds_the_model_that_transformers_loads_as_hfs(tmp_path):
    """HF's `_save_checkpoint` calls `save_model(checkpoint-N)`, so `from_pretrained("out/checkpoint-N")`
    loads the weights of update N (evaluation of intermediate checkpoints relies on it); jtrain's
    checkpoints held only the orbax state. Each checkpoint must hold its own update's weights."""
    from jtrain import TrainerCallback

    kept: dict[int, object] = {}

    class KeepParams(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            kept[state.global_step] = jax.device_get(trainer.params)

    out = tmp_path / "run"
    args = TrainingArguments(output_dir=str(out), max_steps=4, save_steps=2, learning_rate=1e-2, report_to=[],
                             disable_tqdm=True, mesh_shape={"data": 1}, per_device_train_batch_size=4)
    model = create_model("llama", QUICKSTART_LIKE)
    trainer = Trainer(model, args, train_dataset=ArrayDataset(lm_rows(16, 16)), params=_random_params(model),
                      callbacks=[KeepParams()])
    trainer.train()
    assert sorted(kept) == [2, 4]
    logits = {}
    for step in (2, 4):
        directory = out / f"checkpoint-{step}"
        assert {"config.json", "model.safetensors", "trainer_state.json", "state"} <= set(os.listdir(directory))
        trainer.train_state = trainer.train_state.replace(params=kept[step])  # what the check below compares with
        _assert_transformers_matches(trainer, str(directory))
        logits[step] = np.asarray(trainer.model.apply(kept[step], _batch())["logits"])
    assert np.abs(logits[2] - logits[4]).max() > 100 * LOGITS_ATOL  # two updates apart: not the same weights
