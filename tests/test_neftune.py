"""NEFTune: HF's noise on the token embeddings, in training only (issue #3)."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import hf_source_function, lm_rows, tiny_llama

from jtrain import Trainer, TrainingArguments
from jtrain.errors import ConfigError
from jtrain.models import create_model
from jtrain.neftune import NEFTuneModel, neftune_interceptor, neftune_magnitude

ALPHA = 5.0


class _Embeddings(nn.Module):
    """A token table and a position table, as in GPT-2: only the token one may get noise."""

    @nn.compact
    def __call__(self, ids):
        tok = nn.Embed(50, 64, name="wte")
        pos = nn.Embed(512, 64, name="wpe")
        return tok(ids), pos(jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)), tok.attend(jnp.ones((1, 64)))


def _noise(B=4, L=256, seed=0):
    module = _Embeddings()
    ids = jnp.zeros((B, L), jnp.int32)
    params = jax.jit(module.init)(jax.random.key(0), ids)

    @jax.jit
    def noisy(params, rng):
        with nn.intercept_methods(neftune_interceptor(ALPHA)):
            return module.apply(params, ids, rngs={"dropout": rng})

    return jax.jit(module.apply)(params, ids), noisy(params, jax.random.key(seed))


def test_noise_is_hf_uniform_on_token_embeddings_only():
    (tok, pos, head), (tok_n, pos_n, head_n) = _noise()
    noise = np.asarray(tok_n - tok, np.float64)
    bound = ALPHA / math.sqrt(256 * 64)
    # HF's formula, read from the installed transformers: mag_norm = alpha / sqrt(L * d) for output [B, L, d].
    torch = pytest.importorskip("torch")
    neftune_post_forward_hook = hf_source_function(torch, "integrations/neftune.py", "neftune_post_forward_hook")
    emb = torch.nn.Embedding(50, 64)
    emb.neftune_noise_alpha = ALPHA
    emb.train()
    out = emb(torch.zeros((4, 256), dtype=torch.long))
    hf_noise = (neftune_post_forward_hook(emb, None, out) - out).detach().double().numpy()
    assert neftune_magnitude(ALPHA, 256, 64) == pytest.approx(bound, rel=1e-12)
    # Float32 rounding of (x + noise) - x: an absolute slack of 1e-6 on a bound of 0.039.
    assert np.abs(noise).max() <= bound + 1e-6 and np.abs(hf_noise).max() <= bound + 1e-6
    # 65,536 uniform draws: the max reaches the bound within 0.1% (P(miss) ~ exp(-65)); mean 0 within
    # 5 sigma (sigma = bound / sqrt(3 * n)); variance bound^2 / 3 within 3% (its sd is ~0.35%).
    n = noise.size
    for sample in (noise, hf_noise):
        assert np.abs(sample).max() >= 0.999 * bound
        assert abs(sample.mean()) < 5 * bound / math.sqrt(3 * n)
        assert sample.var() == pytest.approx(bound**2 / 3, rel=0.03)
    # Position embeddings and the tied head's `attend` are untouched.
    np.testing.assert_array_equal(np.asarray(pos_n), np.asarray(pos))
    np.testing.assert_array_equal(np.asarray(head_n), np.asarray(head))


def test_noise_depends_on_the_dropout_rng_only():
    _, (a, _, _) = _noise(seed=1)
    _, (b, _, _) = _noise(seed=1)
    _, (c, _, _) = _noise(seed=2)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def _logits(model, params, batch, rng, train):
    """Jitted forward (op-by-op dispatch of a whole model is slow on 2 cores)."""
    return np.asarray(jax.jit(lambda p, r: model.apply(p, batch, rng=r, train=train)["logits"])(params, rng))


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "bert"])
def test_training_only(model_type):
    if model_type == "llama":
        model = tiny_llama()
    else:
        cfg = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
               "intermediate_size": 64, "max_position_embeddings": 32, "n_embd": 32, "n_layer": 1, "n_head": 2,
               "n_positions": 32}
        model = create_model(model_type, cfg, "masked_lm" if model_type == "bert" else "causal_lm")
    params = model.init(jax.random.key(0))
    batch = {"input_ids": jnp.asarray(np.random.default_rng(0).integers(1, 64, (2, 8)), jnp.int32)}
    noisy = NEFTuneModel.wrap(model, ALPHA)
    rng = jax.random.key(3)
    # Eval (train=False) is bit-identical to the plain model; training differs only through the noise.
    np.testing.assert_array_equal(_logits(noisy, params, batch, rng, False), _logits(model, params, batch, rng, False))
    plain_train = _logits(model, params, batch, rng, True)
    noisy_train = _logits(noisy, params, batch, rng, True)
    assert np.isfinite(np.asarray(noisy_train)).all()
    assert not np.allclose(np.asarray(noisy_train), np.asarray(plain_train))


def test_bad_alpha():
    with pytest.raises(ConfigError, match="neftune_noise_alpha"):
        NEFTuneModel.wrap(tiny_llama(), -1.0)


def test_trainer_run_with_neftune_differs_and_stays_finite(tmp_path):
    rows = lm_rows(16, 16)
    data = [{k: v[i] for k, v in rows.items()} for i in range(16)]

    def run(alpha):
        args = TrainingArguments(output_dir=str(tmp_path / str(alpha)), max_steps=3, per_device_train_batch_size=1,
                                 learning_rate=1e-2, save_strategy="no", report_to=["none"], disable_tqdm=True,
                                 neftune_noise_alpha=alpha)
        trainer = Trainer(tiny_llama(), args, train_dataset=data, eval_dataset=data)
        out = trainer.train()
        # The default 8-device mesh runs llama's sharded embedding path (TokenEmbeddingOutput).
        return out.training_loss, trainer.evaluate()["eval_loss"], jax.tree.leaves(trainer.params)

    loss_off, _, params_off = run(None)
    loss_on, eval_on, params_on = run(ALPHA)
    assert math.isfinite(loss_on) and math.isfinite(eval_on)
    assert loss_on != loss_off
    assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(params_on, params_off))


def test_composes_with_lora():
    from jtrain.peft import LoraConfig, apply_lora

    lora = apply_lora(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    noisy = NEFTuneModel.wrap(lora, ALPHA)
    # Everything but the training forward is the LoRA model's own (trainable split, params layout).
    assert noisy.is_trainable(("model", "layers_0", "self_attn", "q_proj", "lora_A")) == lora.is_trainable(
        ("model", "layers_0", "self_attn", "q_proj", "lora_A"))
    params = lora.init(jax.random.key(0))
    batch = {"input_ids": jnp.asarray([[3, 4, 5, 6]], jnp.int32)}
    rng = jax.random.key(1)
    np.testing.assert_array_equal(_logits(noisy, params, batch, rng, False), _logits(lora, params, batch, rng, False))
    assert not np.allclose(_logits(noisy, params, batch, rng, True), _logits(lora, params, batch, rng, True))


def test_noise_follows_gemmas_embedding_scale():
    """Gemma's embedding scales the rows inside the embedding call (HF's scaled embedding module), so
    NEFTune's noise is added after the scale, as HF's hook on that module adds it: noise within the
    unscaled bound, not the bound times the scale."""
    from jtrain.models.layers import ScaledEmbed

    embed = ScaledEmbed(50, 64, scale=8.0, name="embed_tokens")
    ids = jnp.zeros((4, 256), jnp.int32)
    params = embed.init(jax.random.key(0), ids)
    clean = embed.apply(params, ids)
    with nn.intercept_methods(neftune_interceptor(ALPHA)):
        noisy = embed.apply(params, ids, rngs={"dropout": jax.random.key(1)})
    np.testing.assert_allclose(np.asarray(clean[0, 0]), 8.0 * np.asarray(params["params"]["embedding"][0]), rtol=1e-6)
    noise = np.abs(np.asarray(noisy - clean, np.float64)).max()
    bound = neftune_magnitude(ALPHA, 256, 64)
    assert 0.99 * bound <= noise <= bound + 1e-5  # float32 rounding of (x + noise) - x at |x| up to ~30
