"""GPT-2 in Flax Linen: learned positions, pre-LayerNorm blocks, `gelu_new`, HF parameter names.

HF stores GPT-2's projections as `Conv1D` (weight laid out (in, out), like a Flax kernel). The
fused `c_attn` keeps its HF name but its kernel is shaped (embed, 3, heads, head_dim) so that
tensor parallelism splits whole heads of q, k and v; conversion is a reshape, no transpose.
Shape letters as in `jtrain.models.attention`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from jtrain.models.attention import attend, make_attention_mask
from jtrain.models.hfconfig import HFConfig
from jtrain.models.layers import (LayerNorm, activation, attend_layout, check_sequence_length, constrain,
                                  default_positions, dropout, dropout_rng, embed_tokens, last_token_index, normal_init,
                                  run_layers, take_rows, token_classifier, zeros_init)
from jtrain.models.matmul import Dense, DenseGeneral
from jtrain.models.ring_attention import ring_attention, ring_balance, uses_ring


@dataclass(frozen=True)
class GPT2Config(HFConfig):
    """HF `GPT2Config` fields (config.json names: n_embd, n_layer, ...) plus jtrain options."""

    model_type: str = "gpt2"
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: Any = 50256

    # HF's attribute_map: generic names some callers use.
    ALIASES: ClassVar[Mapping[str, str]] = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer",
                                            "num_attention_heads": "n_head", "max_position_embeddings": "n_positions"}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "GPT2Config":
        values = {cls.ALIASES.get(k, k): v for k, v in values.items()}
        return super().from_dict(values)

    @property
    def hidden_size(self) -> int:
        return self.n_embd

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layer

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def inner_dim(self) -> int:
        return self.n_inner or 4 * self.n_embd


class GPT2Attention(nn.Module):
    cfg: GPT2Config
    train: bool = False

    @nn.compact
    def __call__(self, h_BLD: jax.Array, idx: Any, mask: jax.Array) -> jax.Array:
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        N, H = cfg.n_head, cfg.head_dim
        qkv = DenseGeneral(
            (3, N, H), dtype=dtype, name="c_attn",
            kernel_init=normal_init(cfg.initializer_range, ("embed", "qkv", "heads", "head_dim")),
            bias_init=zeros_init(("qkv", "heads", "head_dim")),
        )(h_BLD)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q = constrain(cfg, q, "batch", "length", "heads", "head_dim")
        scale = H ** -0.5 if cfg.scale_attn_weights else 1.0
        if cfg.scale_attn_by_inverse_layer_idx:  # idx may be traced (scan), so scale q instead
            q = q / (jnp.asarray(idx, jnp.float32) + 1.0).astype(q.dtype)
        rng = dropout_rng(self, cfg.attn_pdrop, self.train)
        if uses_ring(cfg, dropout_active=rng is not None, dropout_field="attn_pdrop"):  # as in Llama
            k = constrain(cfg, k, "batch", "length", "heads", "head_dim")
            v = constrain(cfg, v, "batch", "length", "heads", "head_dim")
            out = ring_attention(q, k, v, mask, cfg.activation_sharding, scale=scale, causal_blocks=True,
                                 balance=ring_balance(cfg))
        else:
            # Sequence parallelism (as in Llama): queries stay split over the length, keys and values are
            # gathered to the whole length. No-op without activation shardings.
            k = constrain(cfg, k, "batch", None, "heads", "head_dim")
            v = constrain(cfg, v, "batch", None, "heads", "head_dim")
            out = attend(q, k, v, mask, implementation=cfg.attention_impl, scale=scale, dropout_rate=cfg.attn_pdrop,
                         dropout_rng=rng, causal_blocks=True, **attend_layout(cfg))
        out = constrain(cfg, out, "batch", "length", "heads", "head_dim")
        out = DenseGeneral(
            cfg.n_embd, axis=(-2, -1), dtype=dtype, name="c_proj",
            kernel_init=normal_init(cfg.initializer_range, ("heads", "head_dim", "embed")),
            bias_init=zeros_init(("embed",)),
        )(out)
        return dropout(self, cfg.resid_pdrop, out, self.train)


class GPT2MLP(nn.Module):
    cfg: GPT2Config
    train: bool = False

    @nn.compact
    def __call__(self, h_BLD: jax.Array) -> jax.Array:
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        x = Dense(cfg.inner_dim, dtype=dtype, name="c_fc",
                     kernel_init=normal_init(cfg.initializer_range, ("embed", "mlp")),
                     bias_init=zeros_init(("mlp",)))(h_BLD)
        x = constrain(cfg, x, "batch", "length", "mlp")
        x = Dense(cfg.n_embd, dtype=dtype, name="c_proj",
                     kernel_init=normal_init(cfg.initializer_range, ("mlp", "embed")),
                     bias_init=zeros_init(("embed",)))(activation(cfg.activation_function)(x))
        return dropout(self, cfg.resid_pdrop, x, self.train)


class GPT2Block(nn.Module):
    cfg: GPT2Config
    train: bool = False

    @nn.compact
    def __call__(self, h_BLD: jax.Array, idx: Any, mask: jax.Array) -> jax.Array:
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        x = LayerNorm(cfg.layer_norm_epsilon, dtype, name="ln_1")(h_BLD)
        h_BLD = h_BLD + GPT2Attention(cfg, self.train, name="attn")(x, idx, mask)
        x = LayerNorm(cfg.layer_norm_epsilon, dtype, name="ln_2")(h_BLD)
        return constrain(cfg, h_BLD + GPT2MLP(cfg, self.train, name="mlp")(x), "batch", "length", "embed")


class GPT2Model(nn.Module):
    """Token + position (+ token type, as HF: through `wte`) embeddings, blocks, final LayerNorm."""

    cfg: GPT2Config
    train: bool = False

    @nn.compact
    def __call__(self, input_ids_BL, attention_mask_BL=None, position_ids_BL=None, segment_ids_BL=None,
                 token_type_ids_BL=None):
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        wte = nn.Embed(cfg.vocab_size, cfg.n_embd, dtype=dtype, name="wte",
                       embedding_init=normal_init(cfg.initializer_range, ("vocab", "embed")))
        wpe = nn.Embed(cfg.n_positions, cfg.n_embd, dtype=dtype, name="wpe",
                       embedding_init=normal_init(cfg.initializer_range, ("positions", "embed")))
        check_sequence_length(cfg, input_ids_BL.shape[1])
        if position_ids_BL is None:
            position_ids_BL = default_positions(input_ids_BL, segment_ids_BL)
        h_BLD = embed_tokens(cfg, wte, input_ids_BL) + wpe(position_ids_BL)
        if token_type_ids_BL is not None:
            h_BLD = h_BLD + wte(token_type_ids_BL)
        h_BLD = constrain(cfg, dropout(self, cfg.embd_pdrop, h_BLD, self.train), "batch", "length", "embed")
        mask = make_attention_mask(attention_mask_BL, segment_ids_BL, causal=True)
        h_BLD = run_layers(GPT2Block, cfg, self.train, h_BLD, (mask,), num_layers=cfg.n_layer, name="h",
                           scan=cfg.scan_layers, remat_policy=cfg.remat_policy)
        return LayerNorm(cfg.layer_norm_epsilon, dtype, name="ln_f")(h_BLD), wte


def _transformer(cfg: GPT2Config, train: bool, input_ids, attention_mask, position_ids, segment_ids, token_type_ids):
    return GPT2Model(cfg, train, name="transformer")(input_ids, attention_mask, position_ids, segment_ids,
                                                     token_type_ids)


class GPT2LMHeadModel(nn.Module):
    """Float32 logits [B, L, V]; `lm_head` is tied to `wte` unless `tie_word_embeddings` is False."""

    cfg: GPT2Config

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None, segment_ids=None, token_type_ids=None,
                 train=False):
        h_BLD, wte = _transformer(self.cfg, train, input_ids, attention_mask, position_ids, segment_ids,
                                  token_type_ids)
        if self.cfg.tie_word_embeddings:
            logits = wte.attend(h_BLD)
        else:
            logits = Dense(self.cfg.vocab_size, use_bias=False, dtype=jnp.dtype(self.cfg.dtype), name="lm_head",
                              kernel_init=normal_init(self.cfg.initializer_range, ("embed", "vocab")))(h_BLD)
        return {"logits": constrain(self.cfg, logits, "batch", "length", "vocab").astype(jnp.float32)}


class GPT2ForSequenceClassification(nn.Module):
    """Scores the last non-padding token (HF's rule, see `last_token_index`): logits [B, labels]."""

    cfg: GPT2Config

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None, segment_ids=None, token_type_ids=None,
                 train=False):
        h_BLD, _ = _transformer(self.cfg, train, input_ids, attention_mask, position_ids, segment_ids,
                                token_type_ids)
        pooled_BD = take_rows(h_BLD, last_token_index(input_ids, attention_mask, self.cfg.pad_token_id))
        logits = Dense(self.cfg.num_labels, use_bias=False, dtype=jnp.dtype(self.cfg.dtype), name="score",
                          kernel_init=normal_init(self.cfg.initializer_range, ("embed", "labels")))(pooled_BD)
        return {"logits": logits.astype(jnp.float32)}


class GPT2ForTokenClassification(nn.Module):
    """A label per token, as HF's `GPT2ForTokenClassification`: dropout and a biased `classifier` on every
    position (`token_classifier`); logits [B, L, labels]."""

    cfg: GPT2Config

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None, segment_ids=None, token_type_ids=None,
                 train=False):
        h_BLD, _ = _transformer(self.cfg, train, input_ids, attention_mask, position_ids, segment_ids,
                                token_type_ids)
        return token_classifier(self, self.cfg, h_BLD, train, "classifier")
