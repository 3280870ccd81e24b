"""Llama-family decoders (Llama, Mistral, Qwen2) in Flax Linen, with HF's parameter names.

The three differ only in config: Qwen2 has biases on q/k/v (not o), Mistral a sliding window
on every layer, Qwen2 optionally on the layers from `max_window_layers` on. Every weight carries
logical axis names (see `jtrain.sharding`). Shape letters as in `jtrain.models.attention`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from jtrain.models.attention import (AttentionMask, apply_rope, attend, make_attention_mask, rope_inv_freq,
                                     rope_tables, rope_type)
from jtrain.models.hfconfig import HFConfig
from jtrain.models.layers import (ScaledEmbed, attend_layout, check_sequence_length, constrain,
                                  default_positions, dropout_rng, embed_tokens, gated_activation, last_token_index,
                                  normal_init, ones_init, run_layers, take_rows, token_classifier, zeros_init)
from jtrain.models.matmul import Dense, DenseGeneral
from jtrain.models.ring_attention import ring_attention, ring_balance, uses_ring

_WINDOW_FIELDS = ("sliding_window", "use_sliding_window", "max_window_layers", "layer_types")
_GEMMA2_FIELDS = ("hidden_activation", "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping")


@dataclass(frozen=True)
class LlamaConfig(HFConfig):
    """HF `LlamaConfig`/`MistralConfig`/`Qwen2Config`/`Qwen3Config`/`GemmaConfig`/`Gemma2Config` fields
    (config.json names) plus jtrain options. Qwen3 adds an RMSNorm over each query and key head
    (`qk_norm`). Gemma is Llama with RMSNorm weights stored as offsets from 1 (`norm_offset`), token
    embeddings scaled by sqrt(hidden_size) (`embed_scale`), GeGLU, tied embeddings and HF's defaults;
    Gemma 2 adds norms on the attention and MLP outputs (`sandwich_norms`), soft caps on the attention
    scores and the logits, its own attention scale and alternating sliding-window layers."""

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    attention_dropout: float = 0.0
    mlp_bias: bool = False
    sliding_window: int | None = None
    use_sliding_window: bool = False
    max_window_layers: int = 28
    layer_types: tuple | None = None
    hidden_act: str = "silu"
    # Gemma 2's fields (HF's names): its activation field, the attention scale's denominator, and the
    # soft caps of the attention scores and of the output logits.
    hidden_activation: str | None = None
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    initializer_range: float = 0.02
    bos_token_id: int | None = 1
    eos_token_id: Any = 2

    HF_OMIT: ClassVar[Mapping[str, tuple[str, ...]]] = {
        "llama": ("rope_scaling",) + _WINDOW_FIELDS + _GEMMA2_FIELDS,
        "mistral": ("rope_scaling", "attention_bias", "mlp_bias", "use_sliding_window", "max_window_layers",
                    "layer_types") + _GEMMA2_FIELDS,
        "qwen2": ("rope_scaling", "attention_bias", "mlp_bias") + _GEMMA2_FIELDS,
        "gemma": ("rope_scaling", "mlp_bias") + _WINDOW_FIELDS + _GEMMA2_FIELDS,
        "qwen3": ("rope_scaling", "mlp_bias") + _GEMMA2_FIELDS,
        "gemma2": ("rope_scaling", "mlp_bias", "use_sliding_window", "max_window_layers", "hidden_act"),
    }
    # HF GemmaConfig's defaults where they differ from Llama's (applied before config.json values).
    TYPE_DEFAULTS: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        "gemma": {"hidden_act": "gelu_pytorch_tanh", "head_dim": 256, "tie_word_embeddings": True,
                  "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "max_position_embeddings": 8192,
                  "vocab_size": 256000},
        "gemma2": {"hidden_activation": "gelu_pytorch_tanh", "head_dim": 256, "tie_word_embeddings": True,
                   "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "max_position_embeddings": 8192,
                   "vocab_size": 256000, "query_pre_attn_scalar": 256, "sliding_window": 4096,
                   "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
        "qwen3": {"head_dim": 128, "vocab_size": 151936, "max_position_embeddings": 32768, "bos_token_id": None,
                  "eos_token_id": None},
    }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "LlamaConfig":
        """Accepts both rope formats: v5 `rope_parameters` and v4 `rope_theta` + `rope_scaling`."""
        values = dict(values)
        rope = dict(values.pop("rope_parameters", None) or values.get("rope_scaling") or {})
        values["rope_theta"] = float(rope.pop("rope_theta", values.get("rope_theta", 10000.0)))
        kind = rope_type(rope)
        values["rope_scaling"] = {**rope, "rope_type": kind} if kind != "default" else None
        if values.get("layer_types") is not None:
            values["layer_types"] = tuple(values["layer_types"])
        if values.get("model_type") in ("qwen2", "qwen3") and not values.get("use_sliding_window", False):
            values["sliding_window"] = None
        return super().from_dict(values)

    def to_hf_dict(self) -> dict[str, Any]:
        out = super().to_hf_dict()
        out["head_dim"], out["num_key_value_heads"] = self.dim_per_head, self.kv_heads  # HF Qwen2 needs them set
        out["rope_parameters"] = {"rope_theta": self.rope_theta, "rope_type": "default", **(self.rope_scaling or {})}
        return out

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def norm_offset(self) -> float:
        """Gemma stores each RMSNorm weight as w with the scale 1 + w (initialised to 0)."""
        return 1.0 if self.model_type in ("gemma", "gemma2") else 0.0

    @property
    def embed_scale(self) -> float | None:
        """Gemma multiplies the token embeddings by sqrt(hidden_size); None elsewhere."""
        return self.hidden_size ** 0.5 if self.model_type in ("gemma", "gemma2") else None

    @property
    def activation_name(self) -> str:
        """The MLP's activation: Gemma 2 names its field `hidden_activation`, the others `hidden_act`."""
        return self.hidden_activation or self.hidden_act

    @property
    def attention_scale(self) -> float | None:
        """Gemma 2 scales the scores by query_pre_attn_scalar^-1/2; None: 1/sqrt(head_dim)."""
        return None if self.query_pre_attn_scalar is None else float(self.query_pre_attn_scalar) ** -0.5

    @property
    def sandwich_norms(self) -> bool:
        """Gemma 2 also normalises the attention and MLP outputs before each residual add."""
        return self.model_type == "gemma2"

    @property
    def qk_norm(self) -> bool:
        """Qwen3 RMS-normalises each head of the queries and keys (`q_norm`, `k_norm`) before RoPE."""
        return self.model_type == "qwen3"

    @property
    def qkv_bias(self) -> bool:
        return self.model_type == "qwen2" or self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.model_type != "qwen2" and self.attention_bias

    def sliding_layers(self) -> tuple[bool, ...]:
        """Per layer, whether it uses the sliding window (HF's `layer_types`)."""
        n = self.num_hidden_layers
        if self.sliding_window is None:
            return (False,) * n
        if self.layer_types is not None:
            return tuple(t == "sliding_attention" for t in self.layer_types)
        if self.model_type in ("qwen2", "qwen3"):
            return tuple(i >= self.max_window_layers for i in range(n))
        if self.model_type == "gemma2":  # HF's default layer_types: sliding on even layers
            return tuple(i % 2 == 0 for i in range(n))
        return (True,) * n

    def feed_forward(self, train: bool) -> nn.Module:
        """The decoder layer's feed-forward block, built inside the layer (Mixtral returns its MoE block)."""
        return LlamaMLP(self, name="mlp")


def llama_config_from_dict(values: Mapping[str, Any]) -> LlamaConfig:
    return LlamaConfig.from_dict(values)


class RMSNorm(nn.Module):
    """HF's LlamaRMSNorm: normalise in float32, scale, cast back. With `offset` 1 (Gemma) the stored
    weight w scales by 1 + w and starts at 0, as HF's GemmaRMSNorm."""

    eps: float = 1e-6
    dtype: Any = jnp.float32
    offset: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = zeros_init(("norm",)) if self.offset else ones_init(("norm",))
        scale = self.param("scale", init, (x.shape[-1],))
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        weight = scale.astype(jnp.float32) if not self.offset else self.offset + scale.astype(jnp.float32)
        return (weight * y).astype(self.dtype)  # no `+ 0.0` in the graph of the models without an offset


def _layer_mask(cfg: LlamaConfig, idx: Any, mask: AttentionMask) -> AttentionMask:
    """The model's mask with this layer's sliding window (HF's `layer_types`): a static window when the
    layer index is a Python int (unrolled layers), a traced one under `scan_layers`, where the index is."""
    flags = cfg.sliding_layers()
    if not any(flags):
        return mask
    if all(flags) or (isinstance(idx, int) and flags[idx]):
        return mask.with_window(cfg.sliding_window)
    if isinstance(idx, int):
        return mask
    no_window = jnp.iinfo(jnp.int32).max  # farther than any two positions
    return mask.with_window(jnp.where(jnp.asarray(flags)[idx], cfg.sliding_window, no_window))


class LlamaAttention(nn.Module):
    cfg: LlamaConfig
    train: bool = False

    @nn.compact
    def __call__(self, h_BLD: jax.Array, rope: tuple[jax.Array, jax.Array], mask: AttentionMask) -> jax.Array:
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        N, K, H = cfg.num_attention_heads, cfg.kv_heads, cfg.dim_per_head

        def proj(name: str, heads: int, axis: str) -> jax.Array:
            return DenseGeneral(
                (heads, H), use_bias=cfg.qkv_bias, dtype=dtype, name=name,
                kernel_init=normal_init(cfg.initializer_range, ("embed", axis, "head_dim")),
                bias_init=zeros_init((axis, "head_dim")),
            )(h_BLD)

        q, k, v = proj("q_proj", N, "heads"), proj("k_proj", K, "kv_heads"), proj("v_proj", K, "kv_heads")
        if cfg.qk_norm:  # over head_dim, one scale shared by the heads (HF's Qwen3 q_norm / k_norm)
            q = RMSNorm(cfg.rms_norm_eps, dtype, name="q_norm")(q)
            k = RMSNorm(cfg.rms_norm_eps, dtype, name="k_norm")(k)
        q = constrain(cfg, q, "batch", "length", "heads", "head_dim")
        k = constrain(cfg, k, "batch", "length", "kv_heads", "head_dim")
        v = constrain(cfg, v, "batch", "length", "kv_heads", "head_dim")
        q, k = apply_rope(q, tables=rope), apply_rope(k, tables=rope)
        rng = dropout_rng(self, cfg.attention_dropout, self.train)
        if uses_ring(cfg, dropout_active=rng is not None, dropout_field="attention_dropout"):
            # Sequence parallelism, ring: key/value blocks travel round the `sequence` devices.
            out_BLNH = ring_attention(q, k, v, mask, cfg.activation_sharding, scale=cfg.attention_scale,
                                      softcap=cfg.attn_logit_softcapping, causal_blocks=True,
                                      balance=ring_balance(cfg))
        else:
            # Sequence parallelism, all-gather: queries stay split over `sequence` (length), keys and
            # values are gathered to the whole length, so each device scores its own query rows against
            # every key; the mask (built from global positions) is sliced the same way. No-op without it.
            k = constrain(cfg, k, "batch", None, "kv_heads", "head_dim")
            v = constrain(cfg, v, "batch", None, "kv_heads", "head_dim")
            out_BLNH = attend(q, k, v, mask, implementation=cfg.attention_impl, scale=cfg.attention_scale,
                              dropout_rate=cfg.attention_dropout, dropout_rng=rng, causal_blocks=True,
                              softcap=cfg.attn_logit_softcapping, **attend_layout(cfg))
        out_BLNH = constrain(cfg, out_BLNH, "batch", "length", "heads", "head_dim")
        return DenseGeneral(
            cfg.hidden_size, axis=(-2, -1), use_bias=cfg.o_bias, dtype=dtype, name="o_proj",
            kernel_init=normal_init(cfg.initializer_range, ("heads", "head_dim", "embed")),
            bias_init=zeros_init(("embed",)),
        )(out_BLNH)


class LlamaMLP(nn.Module):
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, h_BLD: jax.Array) -> jax.Array:
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)

        def dense(name: str, features: int, axes: tuple[str, str], x: jax.Array) -> jax.Array:
            return Dense(
                features, use_bias=cfg.mlp_bias, dtype=dtype, name=name,
                kernel_init=normal_init(cfg.initializer_range, axes), bias_init=zeros_init(axes[1:]),
            )(x)

        gate = dense("gate_proj", cfg.intermediate_size, ("embed", "mlp"), h_BLD)
        up = dense("up_proj", cfg.intermediate_size, ("embed", "mlp"), h_BLD)
        hidden_BLF = constrain(cfg, gated_activation(cfg.activation_name)(gate, up), "batch", "length", "mlp")
        return dense("down_proj", cfg.hidden_size, ("mlp", "embed"), hidden_BLF)


class LlamaDecoderLayer(nn.Module):
    cfg: LlamaConfig
    train: bool = False

    @nn.compact
    def __call__(self, h_BLD: jax.Array, idx: Any, rope: tuple[jax.Array, jax.Array], mask: AttentionMask
                 ) -> jax.Array:
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        layer_mask = _layer_mask(cfg, idx, mask)
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, dtype, cfg.norm_offset, name=name)
        x = norm("input_layernorm")(h_BLD)
        attn = LlamaAttention(cfg, self.train, name="self_attn")(x, rope, layer_mask)
        if cfg.sandwich_norms:  # Gemma 2: post_attention_layernorm on the attention output, then its own pre-MLP norm
            h_BLD = h_BLD + norm("post_attention_layernorm")(attn)
            mlp = cfg.feed_forward(self.train)(norm("pre_feedforward_layernorm")(h_BLD))
            return constrain(cfg, h_BLD + norm("post_feedforward_layernorm")(mlp), "batch", "length", "embed")
        h_BLD = h_BLD + attn
        x = norm("post_attention_layernorm")(h_BLD)
        return constrain(cfg, h_BLD + cfg.feed_forward(self.train)(x), "batch", "length", "embed")


def _rope(cfg: LlamaConfig, input_ids_BL: jax.Array, position_ids_BL: jax.Array | None,
          segment_ids_BL: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """The rotary tables of this forward pass, for all layers. With the default positions (no
    `position_ids`, no packed documents) they are known while tracing and become constants of the
    compiled step (see `rope_tables`); otherwise they are computed from the traced positions."""
    inv_freq_at = functools.partial(rope_inv_freq, cfg.dim_per_head, cfg.rope_theta, cfg.rope_scaling,
                                    max_position_embeddings=cfg.max_position_embeddings)
    if position_ids_BL is None and segment_ids_BL is None:
        with jax.ensure_compile_time_eval():
            positions_1L = jnp.arange(input_ids_BL.shape[1])[None, :]
            return rope_tables(positions_1L, inv_freq_at(positions_BL=positions_1L))
    if position_ids_BL is None:
        position_ids_BL = default_positions(input_ids_BL, segment_ids_BL)
    return rope_tables(position_ids_BL, inv_freq_at(positions_BL=position_ids_BL))


class LlamaModel(nn.Module):
    """Embeddings, decoder layers and the final norm; returns (hidden states, embedding module)."""

    cfg: LlamaConfig
    train: bool = False

    @nn.compact
    def __call__(self, input_ids_BL: jax.Array, attention_mask_BL: jax.Array | None = None,
                 position_ids_BL: jax.Array | None = None, segment_ids_BL: jax.Array | None = None):
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        embed = ScaledEmbed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, name="embed_tokens",
                            embedding_init=normal_init(cfg.initializer_range, ("vocab", "embed")),
                            scale=cfg.embed_scale)
        L = input_ids_BL.shape[1]
        check_sequence_length(cfg, L)
        h_BLD = embed_tokens(cfg, embed, input_ids_BL)
        rope = _rope(cfg, input_ids_BL, position_ids_BL, segment_ids_BL)
        mask = make_attention_mask(attention_mask_BL, segment_ids_BL, causal=True)
        h_BLD = run_layers(LlamaDecoderLayer, cfg, self.train, h_BLD, (rope, mask),
                           num_layers=cfg.num_hidden_layers, name="layers", scan=cfg.scan_layers,
                           remat_policy=cfg.remat_policy)
        return RMSNorm(cfg.rms_norm_eps, dtype, cfg.norm_offset, name="norm")(h_BLD), embed


class LlamaForCausalLM(nn.Module):
    """Returns float32 logits [B, L, V]; the loss (shifted, -100 ignored) lives in `jtrain.losses`."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None, segment_ids=None, train=False):
        h_BLD, embed = LlamaModel(self.cfg, train, name="model")(input_ids, attention_mask, position_ids, segment_ids)
        if self.cfg.tie_word_embeddings:
            logits = embed.attend(h_BLD)
        else:
            logits = Dense(
                self.cfg.vocab_size, use_bias=False, dtype=jnp.dtype(self.cfg.dtype), name="lm_head",
                kernel_init=normal_init(self.cfg.initializer_range, ("embed", "vocab")),
            )(h_BLD)
        logits = constrain(self.cfg, logits, "batch", "length", "vocab").astype(jnp.float32)
        cap = self.cfg.final_logit_softcapping
        return {"logits": logits if cap is None else cap * jnp.tanh(logits / cap)}  # Gemma 2's output soft cap


class LlamaForSequenceClassification(nn.Module):
    """Scores the last non-padding token, as HF's `LlamaForSequenceClassification`: logits [B, labels]."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None, segment_ids=None, train=False):
        h_BLD, _ = LlamaModel(self.cfg, train, name="model")(input_ids, attention_mask, position_ids, segment_ids)
        pooled_BD = take_rows(h_BLD, last_token_index(input_ids, attention_mask, self.cfg.pad_token_id))
        logits = Dense(
            self.cfg.num_labels, use_bias=False, dtype=jnp.dtype(self.cfg.dtype), name="score",
            kernel_init=normal_init(self.cfg.initializer_range, ("embed", "labels")),
        )(pooled_BD)
        return {"logits": logits.astype(jnp.float32)}


class LlamaForTokenClassification(nn.Module):
    """A label per token, as HF's `GenericForTokenClassification` (Llama, Mistral, Qwen2/3, Gemma 1/2,
    Mixtral): dropout and a biased `score` on every position (`token_classifier`); logits [B, L, labels]."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None, segment_ids=None, train=False):
        h_BLD, _ = LlamaModel(self.cfg, train, name="model")(input_ids, attention_mask, position_ids, segment_ids)
        bias = bool(self.cfg.extra.get("token_classification_bias", True))
        return token_classifier(self, self.cfg, h_BLD, train, "score", use_bias=bias)
