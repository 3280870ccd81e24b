"""BERT and RoBERTa encoders in Flax Linen with HF's parameter names and heads.

Post-LayerNorm blocks, word + position + token-type embeddings. RoBERTa differs only in its
position ids (counted from `pad_token_id + 1`, padding keeps `pad_token_id`) and its heads
(`lm_head`, and a dense + tanh + out_proj classifier on <s> instead of BERT's pooler).
Shape letters as in `jtrain.models.attention`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from jtrain.errors import ConfigError
from jtrain.models.attention import attend, make_attention_mask
from jtrain.models.hfconfig import HFConfig
from jtrain.models.layers import (LayerNorm, activation, attend_layout, check_sequence_length, constrain,
                                  default_positions, dropout, dropout_rng, embed_tokens, normal_init,
                                  positions_within_segments, run_layers, zeros_init)
from jtrain.models.matmul import Dense, DenseGeneral
from jtrain.models.ring_attention import ring_attention, uses_ring


@dataclass(frozen=True)
class BertConfig(HFConfig):
    """HF `BertConfig`/`RobertaConfig` fields (config.json names) plus jtrain options."""

    model_type: str = "bert"
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 0
    bos_token_id: int | None = None
    eos_token_id: Any = None
    classifier_dropout: float | None = None
    tie_word_embeddings: bool = True

    TYPE_DEFAULTS: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        "roberta": {"vocab_size": 50265, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2},
    }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "BertConfig":
        """Refuses what jtrain's encoder does not implement rather than computing something else."""
        if values.get("position_embedding_type", "absolute") != "absolute":
            raise ConfigError(f"position_embedding_type {values['position_embedding_type']!r} is not supported; "
                              "only 'absolute'")
        if values.get("is_decoder") or values.get("add_cross_attention"):
            raise ConfigError("BERT/RoBERTa as a decoder (is_decoder/add_cross_attention) is not supported")
        return super().from_dict(values)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def head_dropout(self) -> float:
        return self.hidden_dropout_prob if self.classifier_dropout is None else self.classifier_dropout


def _dense(cfg: BertConfig, features: int, axes: tuple[str, str], name: str) -> nn.Dense:
    return Dense(features, dtype=jnp.dtype(cfg.dtype), name=name,
                    kernel_init=normal_init(cfg.initializer_range, axes), bias_init=zeros_init(axes[1:]))


def roberta_positions(input_ids_BL: jax.Array, segment_ids_BL: jax.Array | None, pad: int) -> jax.Array:
    """HF's RoBERTa positions: pad + 1 + index among real tokens; padding tokens get `pad`."""
    real = (input_ids_BL != pad).astype(jnp.int32)
    if segment_ids_BL is not None:
        return (positions_within_segments(segment_ids_BL) + 1) * real + pad
    return jnp.cumsum(real, axis=1) * real + pad


class BertEmbeddings(nn.Module):
    cfg: BertConfig
    train: bool = False

    @nn.compact
    def __call__(self, input_ids_BL, position_ids_BL, segment_ids_BL, token_type_ids_BL):
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        std = cfg.initializer_range
        word = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, name="word_embeddings",
                        embedding_init=normal_init(std, ("vocab", "embed")))
        if position_ids_BL is None:
            if cfg.model_type == "roberta":
                position_ids_BL = roberta_positions(input_ids_BL, segment_ids_BL, cfg.pad_token_id)
            else:
                position_ids_BL = default_positions(input_ids_BL, segment_ids_BL)
        if token_type_ids_BL is None:
            token_type_ids_BL = jnp.zeros_like(input_ids_BL)
        h_BLD = embed_tokens(cfg, word, input_ids_BL)
        h_BLD = h_BLD + nn.Embed(cfg.type_vocab_size, cfg.hidden_size, dtype=dtype, name="token_type_embeddings",
                                 embedding_init=normal_init(std, ("token_types", "embed")))(token_type_ids_BL)
        h_BLD = h_BLD + nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=dtype,
                                 name="position_embeddings",
                                 embedding_init=normal_init(std, ("positions", "embed")))(position_ids_BL)
        h_BLD = LayerNorm(cfg.layer_norm_eps, dtype, name="LayerNorm")(h_BLD)
        h_BLD = dropout(self, cfg.hidden_dropout_prob, h_BLD, self.train)
        return constrain(cfg, h_BLD, "batch", "length", "embed"), word


class BertSelfAttention(nn.Module):
    cfg: BertConfig
    train: bool = False

    @nn.compact
    def __call__(self, h_BLD: jax.Array, mask: jax.Array) -> jax.Array:
        cfg = self.cfg

        def proj(name: str) -> jax.Array:
            return DenseGeneral(
                (cfg.num_attention_heads, cfg.head_dim), dtype=jnp.dtype(cfg.dtype), name=name,
                kernel_init=normal_init(cfg.initializer_range, ("embed", "heads", "head_dim")),
                bias_init=zeros_init(("heads", "head_dim")),
            )(h_BLD)

        q = constrain(cfg, proj("query"), "batch", "length", "heads", "head_dim")
        rng = dropout_rng(self, cfg.attention_probs_dropout_prob, self.train)
        if uses_ring(cfg, dropout_active=rng is not None, dropout_field="attention_probs_dropout_prob"):
            # Bidirectional: every key block is visible to every row, so no block is skipped.
            k = constrain(cfg, proj("key"), "batch", "length", "heads", "head_dim")
            v = constrain(cfg, proj("value"), "batch", "length", "heads", "head_dim")
            return constrain(cfg, ring_attention(q, k, v, mask, cfg.activation_sharding), "batch", "length", "heads",
                             "head_dim")
        # Sequence parallelism: each device's query rows attend to keys and values gathered to the whole length.
        k = constrain(cfg, proj("key"), "batch", None, "heads", "head_dim")
        v = constrain(cfg, proj("value"), "batch", None, "heads", "head_dim")
        out = attend(q, k, v, mask, implementation=cfg.attention_impl, dropout_rate=cfg.attention_probs_dropout_prob,
                     dropout_rng=rng, **attend_layout(cfg))
        return constrain(cfg, out, "batch", "length", "heads", "head_dim")


class BertAttentionOutput(nn.Module):
    cfg: BertConfig
    train: bool = False

    @nn.compact
    def __call__(self, out_BLNH: jax.Array, residual_BLD: jax.Array) -> jax.Array:
        cfg = self.cfg
        x = DenseGeneral(cfg.hidden_size, axis=(-2, -1), dtype=jnp.dtype(cfg.dtype), name="dense",
                            kernel_init=normal_init(cfg.initializer_range, ("heads", "head_dim", "embed")),
                            bias_init=zeros_init(("embed",)))(out_BLNH)
        x = dropout(self, cfg.hidden_dropout_prob, x, self.train)
        return LayerNorm(cfg.layer_norm_eps, jnp.dtype(cfg.dtype), name="LayerNorm")(x + residual_BLD)


class BertAttention(nn.Module):
    cfg: BertConfig
    train: bool = False

    @nn.compact
    def __call__(self, h_BLD: jax.Array, mask: jax.Array) -> jax.Array:
        out = BertSelfAttention(self.cfg, self.train, name="self")(h_BLD, mask)
        return BertAttentionOutput(self.cfg, self.train, name="output")(out, h_BLD)


class BertIntermediate(nn.Module):
    cfg: BertConfig

    @nn.compact
    def __call__(self, h_BLD: jax.Array) -> jax.Array:
        x = _dense(self.cfg, self.cfg.intermediate_size, ("embed", "mlp"), "dense")(h_BLD)
        return constrain(self.cfg, activation(self.cfg.hidden_act)(x), "batch", "length", "mlp")


class BertOutput(nn.Module):
    cfg: BertConfig
    train: bool = False

    @nn.compact
    def __call__(self, x_BLF: jax.Array, residual_BLD: jax.Array) -> jax.Array:
        cfg = self.cfg
        x = dropout(self, cfg.hidden_dropout_prob, _dense(cfg, cfg.hidden_size, ("mlp", "embed"), "dense")(x_BLF),
                    self.train)
        return LayerNorm(cfg.layer_norm_eps, jnp.dtype(cfg.dtype), name="LayerNorm")(x + residual_BLD)


class BertLayer(nn.Module):
    cfg: BertConfig
    train: bool = False

    @nn.compact
    def __call__(self, h_BLD: jax.Array, idx: Any, mask: jax.Array) -> jax.Array:
        h_BLD = BertAttention(self.cfg, self.train, name="attention")(h_BLD, mask)
        x = BertIntermediate(self.cfg, name="intermediate")(h_BLD)
        return constrain(self.cfg, BertOutput(self.cfg, self.train, name="output")(x, h_BLD), "batch", "length",
                         "embed")


class BertStack(nn.Module):
    """HF's `BertEncoder` (the `encoder.layer.N` stack)."""

    cfg: BertConfig
    train: bool = False

    @nn.compact
    def __call__(self, h_BLD: jax.Array, mask: jax.Array) -> jax.Array:
        return run_layers(BertLayer, self.cfg, self.train, h_BLD, (mask,), num_layers=self.cfg.num_hidden_layers,
                          name="layer", scan=self.cfg.scan_layers, remat_policy=self.cfg.remat_policy)


class BertPooler(nn.Module):
    """dense + tanh on the first ([CLS]) token."""

    cfg: BertConfig

    @nn.compact
    def __call__(self, h_BLD: jax.Array) -> jax.Array:
        return jnp.tanh(_dense(self.cfg, self.cfg.hidden_size, ("embed", "embed_out"), "dense")(h_BLD[:, 0]))


class BertEncoderModel(nn.Module):
    """HF's `BertModel`/`RobertaModel`: returns (sequence output, pooled output or None, word embeddings)."""

    cfg: BertConfig
    train: bool = False
    add_pooling_layer: bool = True

    @nn.compact
    def __call__(self, input_ids_BL, attention_mask_BL=None, position_ids_BL=None, segment_ids_BL=None,
                 token_type_ids_BL=None):
        cfg = self.cfg
        check_sequence_length(cfg, input_ids_BL.shape[1])
        h_BLD, word = BertEmbeddings(cfg, self.train, name="embeddings")(
            input_ids_BL, position_ids_BL, segment_ids_BL, token_type_ids_BL)
        mask = make_attention_mask(attention_mask_BL, segment_ids_BL, causal=False)
        h_BLD = BertStack(cfg, self.train, name="encoder")(h_BLD, mask)
        pooled_BD = BertPooler(cfg, name="pooler")(h_BLD) if self.add_pooling_layer else None
        return h_BLD, pooled_BD, word


def _encoder(module: nn.Module, batch: tuple, train: bool, pooler: bool):
    """The body, named `bert` or `roberta` after the model type, as in HF checkpoints."""
    cfg = module.cfg
    return BertEncoderModel(cfg, train, pooler, name=cfg.model_type)(*batch)


class MLMHead(nn.Module):
    """BERT's `cls.predictions` / RoBERTa's `lm_head`: dense, activation, LayerNorm, tied decoder + bias."""

    cfg: BertConfig

    @nn.compact
    def __call__(self, h_BLD: jax.Array, word: nn.Embed) -> jax.Array:
        cfg = self.cfg
        roberta = cfg.model_type == "roberta"
        if roberta:  # RoBERTa's head always uses exact gelu, BERT's follows hidden_act
            x = activation("gelu")(_dense(cfg, cfg.hidden_size, ("embed", "embed_out"), "dense")(h_BLD))
            x = LayerNorm(cfg.layer_norm_eps, jnp.dtype(cfg.dtype), name="layer_norm")(x)
        else:
            x = BertPredictionTransform(cfg, name="transform")(h_BLD)
        if cfg.tie_word_embeddings:
            logits = word.attend(x)
        else:
            logits = Dense(cfg.vocab_size, use_bias=False, dtype=jnp.dtype(cfg.dtype), name="decoder",
                              kernel_init=normal_init(cfg.initializer_range, ("embed", "vocab")))(x)
        bias = self.param("bias", zeros_init(("vocab",)), (cfg.vocab_size,))
        return constrain(cfg, logits + bias.astype(logits.dtype), "batch", "length", "vocab")


class BertPredictionTransform(nn.Module):
    cfg: BertConfig

    @nn.compact
    def __call__(self, h_BLD: jax.Array) -> jax.Array:
        cfg = self.cfg
        x = activation(cfg.hidden_act)(_dense(cfg, cfg.hidden_size, ("embed", "embed_out"), "dense")(h_BLD))
        return LayerNorm(cfg.layer_norm_eps, jnp.dtype(cfg.dtype), name="LayerNorm")(x)


class _BertCls(nn.Module):
    """Named `cls` so BERT's MLM head lands at `cls.predictions.*`."""

    cfg: BertConfig

    @nn.compact
    def __call__(self, h_BLD: jax.Array, word: nn.Embed) -> jax.Array:
        return MLMHead(self.cfg, name="predictions")(h_BLD, word)


class BertForMaskedLM(nn.Module):
    """Float32 logits [B, L, V] over the vocabulary at every position (no pooler, as HF)."""

    cfg: BertConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None, segment_ids=None, token_type_ids=None,
                 train=False):
        h_BLD, _, word = _encoder(self, (input_ids, attention_mask, position_ids, segment_ids, token_type_ids),
                                  train, pooler=False)
        if self.cfg.model_type == "roberta":
            logits = MLMHead(self.cfg, name="lm_head")(h_BLD, word)
        else:
            logits = _BertCls(self.cfg, name="cls")(h_BLD, word)
        return {"logits": logits.astype(jnp.float32)}


class RobertaClassificationHead(nn.Module):
    cfg: BertConfig
    train: bool = False

    @nn.compact
    def __call__(self, h_BLD: jax.Array) -> jax.Array:
        cfg = self.cfg
        x = dropout(self, cfg.head_dropout, h_BLD[:, 0], self.train)
        x = jnp.tanh(_dense(cfg, cfg.hidden_size, ("embed", "embed_out"), "dense")(x))
        x = dropout(self, cfg.head_dropout, x, self.train)
        return _dense(cfg, cfg.num_labels, ("embed", "labels"), "out_proj")(x)


class BertForSequenceClassification(nn.Module):
    """BERT: pooler ([CLS] dense + tanh) then `classifier`; RoBERTa: its dense/tanh/out_proj head."""

    cfg: BertConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None, segment_ids=None, token_type_ids=None,
                 train=False):
        cfg = self.cfg
        roberta = cfg.model_type == "roberta"
        h_BLD, pooled_BD, _ = _encoder(self, (input_ids, attention_mask, position_ids, segment_ids, token_type_ids),
                                       train, pooler=not roberta)
        if roberta:
            logits = RobertaClassificationHead(cfg, train, name="classifier")(h_BLD)
        else:
            x = dropout(self, cfg.head_dropout, pooled_BD, train)
            logits = _dense(cfg, cfg.num_labels, ("embed", "labels"), "classifier")(x)
        return {"logits": logits.astype(jnp.float32)}


class BertForTokenClassification(nn.Module):
    """Float32 logits [B, L, labels] from dropout + `classifier` on every position."""

    cfg: BertConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None, segment_ids=None, token_type_ids=None,
                 train=False):
        cfg = self.cfg
        h_BLD, _, _ = _encoder(self, (input_ids, attention_mask, position_ids, segment_ids, token_type_ids),
                               train, pooler=False)
        x = dropout(self, cfg.head_dropout, h_BLD, train)
        logits = _dense(cfg, cfg.num_labels, ("embed", "labels"), "classifier")(x)
        return {"logits": logits.astype(jnp.float32)}
