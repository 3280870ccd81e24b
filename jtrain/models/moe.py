"""Mixture-of-experts feed-forward block, its router statistics, and the model wrapper that reports them.

Routing is HF's `MixtralSparseMoeBlock` (transformers 5): router logits -> softmax in float32 ->
top-k -> the k weights renormalised to sum to 1; each expert is a SwiGLU MLP. Two dispatch modes:

- `dropless` (exact): each device sorts its own tokens' copies by expert and runs grouped
  matmuls (`jax.lax.ragged_dot`), so every token reaches its k experts whatever the imbalance.
  Under a mesh this runs in `shard_map` over the batch axes with whole expert weights: tokens
  stay local (data parallelism), the weights are gathered.
- `capacity` (GShard): each batch row is a group of S tokens; an expert accepts at most
  C = ceil(k * S * capacity_factor / E) of them (first choices before second choices, then in
  token order) and the rest are dropped (the token keeps only its residual) and counted.
  Dispatch and combine are one-hot einsums into an [E, B, C, D] buffer whose expert dimension
  is pinned to the `expert` mesh axis, so GSPMD turns them into all-to-alls and every device
  runs only its own experts. With C >= S nothing can be dropped and it equals `dropless`.

Logical axes: expert weights are [expert, embed, mlp] / [expert, mlp, embed] (`expert` -> the
`expert` mesh axis); the router kernel is [embed, router] (`router` has no rule: replicated,
every device routes its own tokens).

The block sows its router logits and per-token drop counts into the `intermediates` collection;
`MoEModel.apply` collects them and computes HF's `load_balancing_loss_func` and the routing
statistics. Shape letters: B batch, L/S tokens, D model width, F expert width, E experts,
K experts per token, C capacity, T = B*L tokens.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jtrain.errors import ConfigError
from jtrain.models.base import Model
from jtrain.models.layers import activation, normal_init
from jtrain.models.matmul import Dense
from jtrain.sharding import logical_to_mesh_spec

DISPATCH_MODES = ("dropless", "capacity")


def capacity(tokens_per_group: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Slots per expert and group: ceil(k * S * factor / E), at least 1, at most S (never useful beyond)."""
    return max(1, min(tokens_per_group, math.ceil(top_k * tokens_per_group * capacity_factor / num_experts)))


def route(logits_TE: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array]:
    """HF's top-k router: softmax in float32, top-k, renormalise. Returns (weights_TK, experts_TK)."""
    probs = jax.nn.softmax(logits_TE.astype(jnp.float32), axis=-1)
    top_w, top_i = jax.lax.top_k(probs, top_k)
    return top_w / jnp.sum(top_w, axis=-1, keepdims=True), top_i


class Experts(nn.Module):
    """The stacked SwiGLU weights, named like Mixtral checkpoints: w1 (gate), w3 (up), w2 (down)."""

    num_experts: int
    hidden_size: int
    intermediate_size: int
    initializer_range: float
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        E, D, F, std = self.num_experts, self.hidden_size, self.intermediate_size, self.initializer_range
        w1 = self.param("w1", normal_init(std, ("expert", "embed", "mlp")), (E, D, F), self.param_dtype)
        w3 = self.param("w3", normal_init(std, ("expert", "embed", "mlp")), (E, D, F), self.param_dtype)
        w2 = self.param("w2", normal_init(std, ("expert", "mlp", "embed")), (E, F, D), self.param_dtype)
        return w1, w3, w2


class MoEFeedForward(nn.Module):
    """Top-k routed SwiGLU experts: [B, L, D] -> [B, L, D].

    `constrain(x, logical_names)` pins an activation to the mesh (a `jtrain.sharding.ActivationSharding`);
    None leaves layouts to GSPMD.
    """

    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    jitter_noise: float = 0.0
    dispatch: str = "dropless"
    capacity_factor: float = 1.25
    dtype: Any = jnp.float32
    constrain: Callable | None = None
    train: bool = False

    def _pin(self, x: jax.Array, *logical: str | None) -> jax.Array:
        return x if self.constrain is None else self.constrain(x, logical)

    @nn.compact
    def __call__(self, h_BLD: jax.Array) -> jax.Array:
        D = h_BLD.shape[-1]
        if self.train and self.jitter_noise > 0 and self.has_rng("dropout"):
            # HF multiplies the block's input (router and experts both see it) by U(1-j, 1+j).
            noise = jax.random.uniform(self.make_rng("dropout"), h_BLD.shape, jnp.float32,
                                       1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
            h_BLD = (h_BLD * noise).astype(h_BLD.dtype)
        logits_BLE = Dense(self.num_experts, use_bias=False, dtype=self.dtype, name="gate",
                              kernel_init=normal_init(self.initializer_range, ("embed", "router")))(h_BLD)
        weights_BLK, experts_BLK = route(logits_BLE, self.top_k)
        w1, w3, w2 = Experts(self.num_experts, D, self.intermediate_size, self.initializer_range, name="experts")()
        w1, w3, w2 = (w.astype(self.dtype) for w in (w1, w3, w2))
        if self.dispatch == "capacity":
            y_BLD, dropped_BL = self._capacity(h_BLD, weights_BLK, experts_BLK, w1, w3, w2)
        else:
            y_BLD, dropped_BL = self._dropless(h_BLD, weights_BLK, experts_BLK, w1, w3, w2)
        self.sow("intermediates", "router_logits", logits_BLE.astype(jnp.float32))
        self.sow("intermediates", "dropped", dropped_BL)
        return y_BLD.astype(self.dtype)

    def _dropless(self, h_BLD, weights_BLK, experts_BLK, w1, w3, w2):
        """Grouped matmuls over each device's own tokens; nothing is dropped.

        The sort is per shard of rows: under a mesh (`constrain` carries it) the block runs in
        `shard_map` over the batch (and sequence) axes with whole expert weights, because a
        sort over the global token list would make GSPMD gather every token onto every device.
        """
        local = functools.partial(_dropless_local, self.top_k, self.num_experts, activation(self.hidden_act))
        mesh = getattr(self.constrain, "mesh", None)
        if mesh is None or mesh.size == 1:
            return local(h_BLD, weights_BLK, experts_BLK, w1, w3, w2)
        rows = _fitted_spec(self.constrain, h_BLD.shape[:2], ("batch", "length"))
        tokens, whole = P(*rows, None), P()
        return jax.shard_map(local, mesh=mesh, in_specs=(tokens, tokens, tokens, whole, whole, whole),
                             out_specs=(tokens, P(*rows)))(h_BLD, weights_BLK, experts_BLK, w1, w3, w2)

    def _capacity(self, h_BLD, weights_BLK, experts_BLK, w1, w3, w2):
        """GShard dispatch per row: one-hot einsums into an [E, B, C, D] buffer split over `expert`."""
        B, S, _ = h_BLD.shape
        K, E = self.top_k, self.num_experts
        C = capacity(S, E, K, self.capacity_factor)
        onehot_BKSE = jax.nn.one_hot(jnp.swapaxes(experts_BLK, 1, 2), E, dtype=jnp.int32)
        # Queue position of each (choice, token) at its expert: all first choices, then second ones.
        pos_BKSE = jnp.cumsum(onehot_BKSE.reshape(B, K * S, E), axis=1).reshape(B, K, S, E) - 1
        keep_BKSE = (onehot_BKSE == 1) & (pos_BKSE < C)
        slot_BKSEC = jax.nn.one_hot(jnp.where(keep_BKSE, pos_BKSE, C), C, dtype=jnp.float32)  # C -> all zero
        dispatch_BSEC = jnp.sum(slot_BKSEC, axis=1)  # top-k experts are distinct: at most one 1 per (s, e)
        combine_BSEC = jnp.einsum("bksec,bsk->bsec", slot_BKSEC, weights_BLK)
        dropped_BS = jnp.sum(onehot_BKSE, axis=(1, 3)).astype(jnp.float32) - jnp.sum(dispatch_BSEC, axis=(2, 3))
        x_EBCD = jnp.einsum("bsec,bsd->ebcd", dispatch_BSEC.astype(h_BLD.dtype), h_BLD)
        x_EBCD = self._pin(x_EBCD, "expert", "batch", None, "embed")
        hidden = self._pin(self._swiglu_stacked(x_EBCD, w1, w3), "expert", "batch", None, "mlp")
        y_EBCD = self._pin(jnp.einsum("ebcf,efd->ebcd", hidden, w2), "expert", "batch", None, "embed")
        y_BSD = jnp.einsum("bsec,ebcd->bsd", combine_BSEC, y_EBCD.astype(jnp.float32))
        return y_BSD, dropped_BS

    def _swiglu_stacked(self, x_EBCD: jax.Array, w1: jax.Array, w3: jax.Array) -> jax.Array:
        act = activation(self.hidden_act)
        return act(jnp.einsum("ebcd,edf->ebcf", x_EBCD, w1)) * jnp.einsum("ebcd,edf->ebcf", x_EBCD, w3)


def _dropless_local(top_k: int, num_experts: int, act: Callable, h_BLD, weights_BLK, experts_BLK, w1, w3, w2):
    """Sort the T*K token copies by expert, run three grouped matmuls, unsort, weight and sum."""
    B, L, D = h_BLD.shape
    x_TD = h_BLD.reshape(B * L, D)
    flat_expert = experts_BLK.reshape(-1)
    order = jnp.argsort(flat_expert, stable=True)
    x_sorted = jnp.take(x_TD, order // top_k, axis=0)
    group_sizes = jnp.bincount(flat_expert, length=num_experts).astype(jnp.int32)
    hidden = act(jax.lax.ragged_dot(x_sorted, w1, group_sizes)) * jax.lax.ragged_dot(x_sorted, w3, group_sizes)
    y_sorted = jax.lax.ragged_dot(hidden, w2, group_sizes)
    y_TKD = jnp.zeros_like(y_sorted).at[order].set(y_sorted).reshape(B * L, top_k, D)
    y_TD = jnp.einsum("tkd,tk->td", y_TKD.astype(jnp.float32), weights_BLK.reshape(B * L, top_k))
    return y_TD.reshape(B, L, D), jnp.zeros((B, L), jnp.float32)


def _fitted_spec(sharding: Any, shape: tuple[int, ...], logical: tuple[str, ...]) -> tuple:
    """Mesh axes of `logical` under the activation rules, left whole where they do not divide."""
    spec = logical_to_mesh_spec(P(*logical), sharding.rules)
    sizes = dict(sharding.mesh.shape)
    out = []
    for dim, axes in zip(shape, spec):
        names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        out.append(axes if dim % math.prod(sizes[a] for a in names) == 0 else None)
    return tuple(out)


# ---------------------------------------------------------------- router statistics


def token_mask(batch: Mapping[str, jax.Array]) -> jax.Array | None:
    """Real tokens [B, L] (float): HF's `attention_mask`, else packed rows' non-zero segment ids."""
    if batch.get("attention_mask") is not None:
        return batch["attention_mask"].astype(jnp.float32)
    if batch.get("segment_ids") is not None:
        return (batch["segment_ids"] > 0).astype(jnp.float32)
    return None


def router_statistics(logits: list[jax.Array], dropped: list[jax.Array], mask_BL: jax.Array | None,
                      top_k: int) -> tuple[jax.Array, dict[str, jax.Array]]:
    """HF's `load_balancing_loss_func` over all layers, and routing counts of real tokens.

    `logits` holds one [..., B, L, E] array per MoE block (a leading axis stacks scanned layers).
    The aux loss is E * sum_e f_e * P_e where f_e is the fraction of (layer, token, choice)
    assignments that chose expert e and P_e the mean router probability of e, both over real
    tokens of every layer (HF accumulates over layers first, then multiplies). Stats are sums
    (so micro-batches add up): `moe_expert_{e}` assignments per expert, `moe_assignments` in
    all, `moe_dropped` assignments dropped by capacity.
    """
    E = logits[0].shape[-1]
    tokens_sum = jnp.zeros((E,), jnp.float32)
    prob_sum = jnp.zeros((E,), jnp.float32)
    rows = jnp.float32(0.0)
    dropped_sum = jnp.float32(0.0)
    for layer_logits, layer_dropped in zip(logits, dropped):
        B, L = layer_logits.shape[-3:-1]
        logits_NBLE = layer_logits.reshape(-1, B, L, E)
        m = jnp.ones((B, L), jnp.float32) if mask_BL is None else mask_BL
        probs = jax.nn.softmax(logits_NBLE.astype(jnp.float32), axis=-1)
        _, chosen = jax.lax.top_k(probs, top_k)
        counts_NBLE = jnp.sum(jax.nn.one_hot(chosen, E, dtype=jnp.float32), axis=-2)
        tokens_sum += jnp.einsum("nble,bl->e", counts_NBLE, m)
        prob_sum += jnp.einsum("nble,bl->e", probs, m)
        rows += logits_NBLE.shape[0] * jnp.sum(m)
        dropped_sum += jnp.einsum("nbl,bl->", layer_dropped.reshape(-1, B, L), m)
    denom = jnp.maximum(rows, 1.0)
    aux = E * jnp.sum((jax.lax.stop_gradient(tokens_sum) / denom) * (prob_sum / denom))
    stats = {f"moe_expert_{e}": tokens_sum[e] for e in range(E)}
    stats.update(moe_assignments=jnp.sum(tokens_sum), moe_dropped=dropped_sum)
    return aux, stats


def _collect(sown: Any, name: str) -> list[jax.Array]:
    """Every array sown under `name`, in a deterministic (path) order."""
    flat = jax.tree_util.tree_flatten_with_path(sown)[0]
    return [leaf for path, leaf in flat if any(getattr(k, "key", None) == name for k in path)]


@dataclass(frozen=True)
class MoEModel(Model):
    """A `Model` whose outputs also carry the router's aux loss and routing statistics.

    `apply` returns `{"logits", "aux_loss", "aux_loss_coef", "router_stats"}`: `aux_loss` is HF's
    unscaled `load_balancing_loss_func` value; `aux_loss_coef` is `router_aux_loss_coef` when
    `output_router_logits` is set (HF adds the aux loss to the training loss only then) and 0
    otherwise, so `jtrain.losses` stays config-free.
    """

    def apply(self, params: Any, batch: Mapping[str, jax.Array], *, rng: jax.Array | None = None,
              train: bool = False) -> dict[str, Any]:
        inputs = {k: batch[k] for k in self.input_names if k in batch}
        rngs = {"dropout": rng} if (rng is not None and train) else None
        outputs, state = self.module.apply({"params": params}, **inputs, train=train, rngs=rngs,
                                           mutable=["intermediates"])
        sown = state.get("intermediates", {})
        logits, dropped = _collect(sown, "router_logits"), _collect(sown, "dropped")
        layers = sum(math.prod(x.shape[:-3]) for x in logits)
        if layers != self.config.num_hidden_layers:
            raise ConfigError(
                f"{self.config.model_type}: found router logits of {layers} of {self.config.num_hidden_layers} layers; "
                "with scan_layers=True, jtrain.models.layers.run_layers must scan the 'intermediates' collection "
                "(variable_axes={'params': 0, 'intermediates': 0}); or set scan_layers=False")
        aux, stats = router_statistics(logits, dropped, token_mask(batch), self.config.num_experts_per_tok)
        coef = self.config.router_aux_loss_coef if self.config.output_router_logits else 0.0
        return {**outputs, "aux_loss": aux, "aux_loss_coef": jnp.float32(coef), "router_stats": stats}

    def check_mesh(self, mesh: Mesh) -> None:
        """Refuse, before compiling, an expert count that the `expert` mesh axis does not divide."""
        n = dict(mesh.shape).get("expert", 1)
        experts = self.config.num_local_experts
        if experts % n:
            raise ConfigError(
                f"num_local_experts={experts} does not divide over mesh axis 'expert' of size {n}: "
                f"set `mesh_shape.expert` to a divisor of {experts} (e.g. {math.gcd(experts, n)})")
