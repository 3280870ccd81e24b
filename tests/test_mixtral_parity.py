"""Mixtral against `transformers`: checkpoints load both ways, logits, aux loss and total loss match.

The reference is a tiny random `MixtralForCausalLM` (PyTorch, CPU, float32, eager attention) saved
with `save_pretrained`; transformers 5 writes Mixtral's on-disk names
(`block_sparse_moe.experts.{e}.w1.weight`), so loading it exercises the real checkpoint format.
Tolerances: 1e-4 abs on logits and losses, as for every architecture (`test_models_common`: both
sides float32, reordered sums differ by ~1e-6 per op, a real bug moves logits by > 1e-2); 1e-5 on
the aux loss, a product of two means of softmax probabilities (values ~1, float32 sums of
~30 terms), where a wrong mask or layer count moves it by > 1e-2.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
import transformers

from jtrain.losses import causal_lm_loss
from jtrain.models import create_model, from_pretrained, save_pretrained

LOGITS_ATOL = 1e-4  # float32 vs float32 across frameworks, see module docstring
AUX_ATOL = 1e-5  # see module docstring
TINY_MIXTRAL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
                    pad_token_id=0)


def _hf_mixtral(**overrides) -> torch.nn.Module:
    """Every weight random (default init would leave norm scales at exactly 1)."""
    config = transformers.MixtralConfig(**{**TINY_MIXTRAL, **overrides})
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM._from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _batch(lengths: tuple[int, ...] = (10, 6, 4), length: int = 10, seed: int = 0) -> dict[str, np.ndarray]:
    """Random ids, right-padded to `length` from the given real lengths; labels -100 on padding."""
    rng = np.random.default_rng(seed)
    mask = (np.arange(length)[None, :] < np.array(lengths)[:, None]).astype(np.int32)
    ids = np.where(mask == 1, rng.integers(2, 64, size=(len(lengths), length)), 0).astype(np.int32)
    return {"input_ids": ids, "attention_mask": mask, "labels": np.where(mask == 1, ids, -100).astype(np.int32)}


def _hf_out(model: torch.nn.Module, batch: dict):
    with torch.no_grad():
        return model(**{k: torch.as_tensor(v).long() for k, v in batch.items()})


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    """A saved HF Mixtral that adds its aux loss (coef 0.1 so the aux term is visible in the loss)."""
    model = _hf_mixtral(output_router_logits=True, router_aux_loss_coef=0.1)
    path = tmp_path_factory.mktemp("hf_mixtral")
    model.save_pretrained(path)
    return model, path


@pytest.mark.parametrize("options", [{"moe_dispatch": "dropless"},
                                     {"moe_dispatch": "capacity", "moe_capacity_factor": 2.0},
                                     {"moe_dispatch": "dropless", "remat_policy": "full"}],
                         ids=["dropless", "capacity-no-drops", "dropless-remat"])
def test_logits_aux_and_total_loss_match_transformers(hf_checkpoint, options):
    """capacity_factor 2 with 4 experts, top-2: C = ceil(2 * 10 * 2 / 4) = 10 = S, so nothing drops."""
    hf, path = hf_checkpoint
    model, params = from_pretrained(path, **options)
    batch = _batch()
    ref = _hf_out(hf, batch)
    out = jax.jit(model.apply)(params, batch)
    real = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(np.asarray(out["logits"])[real], ref.logits.numpy()[real], atol=LOGITS_ATOL)
    np.testing.assert_allclose(float(out["aux_loss"]), float(ref.aux_loss), atol=AUX_ATOL)
    loss = causal_lm_loss(out, batch)
    np.testing.assert_allclose(float(loss.loss_sum / loss.weight), float(ref.loss), atol=LOGITS_ATOL)
    assert float(loss.stats["moe_dropped"]) == 0.0
    # 2 layers x 20 real tokens (10 + 6 + 4) x top-2 assignments, all counted per expert.
    assert float(loss.stats["moe_assignments"]) == 2 * 20 * 2
    assert sum(float(loss.stats[f"moe_expert_{e}"]) for e in range(4)) == 2 * 20 * 2


def test_aux_loss_left_out_of_loss_without_output_router_logits(hf_checkpoint):
    """HF adds the aux loss only when `output_router_logits` is set (its default is False)."""
    hf, path = hf_checkpoint
    model, params = from_pretrained(path, output_router_logits=False)
    batch = _batch()
    hf.config.output_router_logits = False
    try:
        ref = _hf_out(hf, batch)
    finally:
        hf.config.output_router_logits = True
    loss = causal_lm_loss(jax.jit(model.apply)(params, batch), batch)
    np.testing.assert_allclose(float(loss.loss_sum / loss.weight), float(ref.loss), atol=LOGITS_ATOL)
    assert float(loss.stats["moe_aux_loss"]) > 0  # still reported for the logs


def test_save_pretrained_loads_into_transformers(tmp_path):
    """jtrain-initialised params -> save_pretrained -> HF loads every key and computes the same logits."""
    model = create_model("mixtral", {**TINY_MIXTRAL, "sliding_window": 4})
    params = model.init(jax.random.key(0))
    save_pretrained(model, params, tmp_path)
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True,
                                                                 attn_implementation="eager")
    assert not any(info.values()), info
    assert type(hf).__name__ == "MixtralForCausalLM" and hf.config.num_local_experts == 4
    assert hf.config.sliding_window == 4 and "moe_dispatch" not in hf.config.to_dict()
    batch = _batch()
    ref = _hf_out(hf.eval(), {k: v for k, v in batch.items() if k != "labels"})
    logits = np.asarray(jax.jit(model.apply)(params, batch)["logits"])
    real = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(logits[real], ref.logits.numpy()[real], atol=LOGITS_ATOL)
    again, params2 = from_pretrained(tmp_path)  # and back: the same tree
    assert again.config.num_local_experts == 4 and again.config.rope_theta == 1e6
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), jax.device_get(params2))


def test_micro_batches_weight_the_aux_loss_by_tokens(hf_checkpoint):
    """k micro-batches: CE summed over all real tokens plus coef x the token-weighted mean of each
    micro-batch's HF aux loss (`jtrain.losses.with_router_loss`), i.e. sum_i hf_loss_i * w_i / W."""
    from jtrain.step import accumulate_gradients

    hf, path = hf_checkpoint
    model, params = from_pretrained(path)
    micro = [_batch((10, 6, 4)), _batch((3, 5, 2), seed=1)]  # 20 and 10 real tokens: unequal weights
    expected_sum, total = 0.0, 0.0
    for b in micro:
        w = float((b["labels"][:, 1:] != -100).sum())
        expected_sum += float(_hf_out(hf, b).loss) * w
        total += w
    stacked = {k: np.stack([b[k] for b in micro]) for k in micro[0]}
    out, _ = jax.jit(lambda p, b: accumulate_gradients(model.apply, causal_lm_loss, p, b, jax.random.key(0)))(
        params, stacked)
    assert float(out.weight) == total
    np.testing.assert_allclose(float(out.loss_sum / out.weight), expected_sum / total, atol=LOGITS_ATOL)
