"""Mixtral: the Llama decoder with its MLP replaced by a top-k mixture of SwiGLU experts.

Everything but the feed-forward block is `jtrain.models.llama` (attention, sliding window, RoPE,
heads); `MixtralConfig.feed_forward` is the one hook the Llama decoder layer calls. Parameter
names follow Mixtral checkpoints on disk (`block_sparse_moe.gate`, `block_sparse_moe.experts.{e}.w1`,
what transformers 5 still writes), so `jtrain.models.convert` maps them without a table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import flax.linen as nn
import jax.numpy as jnp

from jtrain.errors import ConfigError
from jtrain.models.llama import _GEMMA2_FIELDS, LlamaConfig
from jtrain.models.moe import DISPATCH_MODES, MoEFeedForward

# jtrain execution options of the MoE block (never written to config.json).
MOE_OPTIONS = ("moe_dispatch", "moe_capacity_factor")


@dataclass(frozen=True)
class MixtralConfig(LlamaConfig):
    """HF `MixtralConfig` fields (config.json names, HF defaults) plus the MoE dispatch options."""

    model_type: str = "mixtral"
    intermediate_size: int = 14336
    num_key_value_heads: int | None = 8
    max_position_embeddings: int = 4096 * 32
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    router_aux_loss_coef: float = 0.001
    output_router_logits: bool = False
    router_jitter_noise: float = 0.0
    # jtrain options: "dropless" (exact, grouped matmuls) or "capacity" (GShard, drops overflow).
    moe_dispatch: str = "dropless"
    moe_capacity_factor: float = 1.25

    HF_OMIT: ClassVar[Mapping[str, tuple[str, ...]]] = {
        "mixtral": ("rope_scaling", "attention_bias", "mlp_bias", "use_sliding_window", "max_window_layers",
                    "layer_types") + _GEMMA2_FIELDS,
    }

    def __post_init__(self) -> None:
        if self.moe_dispatch not in DISPATCH_MODES:
            raise ConfigError(f"moe_dispatch {self.moe_dispatch!r} is not one of {', '.join(DISPATCH_MODES)}")
        if not self.moe_capacity_factor > 0:
            raise ConfigError(f"moe_capacity_factor must be > 0, got {self.moe_capacity_factor}")
        if not 1 <= self.num_experts_per_tok <= self.num_local_experts:
            raise ConfigError(f"num_experts_per_tok={self.num_experts_per_tok} must be between 1 and "
                              f"num_local_experts={self.num_local_experts}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "MixtralConfig":
        """HF's Mixtral default rope base is 1e6 (Llama's is 1e4) when config.json gives none."""
        values = dict(values)
        rope = values.get("rope_parameters") or values.get("rope_scaling") or {}
        if "rope_theta" not in rope and "rope_theta" not in values:
            values["rope_theta"] = 1e6
        return super().from_dict(values)

    def to_hf_dict(self) -> dict[str, Any]:
        out = super().to_hf_dict()
        for key in MOE_OPTIONS:
            out.pop(key, None)
        return out

    def feed_forward(self, train: bool) -> nn.Module:
        return MoEFeedForward(
            num_experts=self.num_local_experts, top_k=self.num_experts_per_tok, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, hidden_act=self.hidden_act,
            initializer_range=self.initializer_range, jitter_noise=self.router_jitter_noise,
            dispatch=self.moe_dispatch, capacity_factor=self.moe_capacity_factor, dtype=jnp.dtype(self.dtype),
            constrain=self.activation_sharding, train=train, name="block_sparse_moe",
        )
