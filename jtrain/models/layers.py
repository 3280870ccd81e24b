"""Building blocks shared by every architecture.

Initialisers that carry logical axis names, LayerNorm computed like PyTorch's, HF's activation
names, dropout that is off unless a dropout rng is given, remat policies, the layer stack
(a Python loop or `nn.scan`) and position/pooling helpers that follow HF's conventions.
Shape letters as in `jtrain.models.attention`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jtrain.errors import ConfigError
from jtrain.models.cpu_attention import ATTENTION_NAME
from jtrain.models.matmul import PRODUCT_NAME, Dense
from jtrain.pipeline_parallel import check_stages, gpipe, microbatch_count, split_stages

Initializer = Callable[..., jax.Array]


def normal_init(std: float, axes: tuple[str, ...]) -> Initializer:
    """HF's default init (normal with `initializer_range`), tagged with logical axis names."""
    return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


def zeros_init(axes: tuple[str, ...]) -> Initializer:
    return nn.with_logical_partitioning(nn.initializers.zeros, axes)


def ones_init(axes: tuple[str, ...]) -> Initializer:
    return nn.with_logical_partitioning(nn.initializers.ones, axes)


class LayerNorm(nn.Module):
    """`torch.nn.LayerNorm` semantics: two-pass variance in float32, params `scale` and `bias`.

    Flax's default one-pass variance (E[x^2] - E[x]^2) loses precision; HF checkpoints were
    trained with the two-pass form, so it is used here.
    """

    eps: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        scale = self.param("scale", ones_init(("norm",)), (d,))
        bias = self.param("bias", zeros_init(("norm",)), (d,))
        xf = x.astype(jnp.float32)
        centred = xf - jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(centred * centred, axis=-1, keepdims=True)
        y = centred * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


def _gelu_exact(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=False)


def _gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


# HF's ACT2FN names -> functions. "gelu" is the exact erf form; "gelu_new" is the tanh form.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": _gelu_exact,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "silu": nn.silu,
    "swish": nn.silu,
    "relu": nn.relu,
    "tanh": jnp.tanh,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name not in ACTIVATIONS:
        raise ConfigError(f"unsupported activation {name!r}; supported: {', '.join(sorted(ACTIVATIONS))}")
    return ACTIVATIONS[name]


def gated_activation(name: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """`act(gate) * up`, the gated MLP's product. On the CPU backend in float32 (chosen when traced,
    like the dense layers' VJP) its backward keeps only `gate` and `up` (`_gated_vjp`); elsewhere
    autodiff's (bf16 on CPU measured no faster in wall time and 4% more CPU time with it).

    Why on CPU: autodiff of `act(gate) * up` stores act's intermediates (the sigmoid and the
    activation for silu) as separate arrays in the forward pass and XLA:CPU reads them back in
    separate passes; there the forward becomes one pass and the backward two (176 -> 110 MB of
    traffic per layer of the benchmark's large preset, its float32 step 1.016x), and two
    [tokens, intermediate] arrays fewer are kept per layer. Accelerators fuse these passes
    themselves and were not measured with it."""
    act = activation(name)

    def gated(gate: jax.Array, up: jax.Array) -> jax.Array:
        if jax.default_backend() == "cpu" and gate.dtype == up.dtype == jnp.float32:
            return _gated_vjp(name)(gate, up)
        return act(gate) * up

    return gated


@functools.cache
def _gated_vjp(name: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """`act(gate) * up` whose backward recomputes act and its slope (`jax.jvp`) from gate and up:
    the same arithmetic as autodiff's; any elementwise `ACTIVATIONS` entry works."""
    act = activation(name)

    @jax.custom_vjp
    def gated(gate: jax.Array, up: jax.Array) -> jax.Array:
        return act(gate) * up

    def forward(gate: jax.Array, up: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        return gated(gate, up), (gate, up)

    def backward(saved: tuple[jax.Array, jax.Array], d_out: jax.Array) -> tuple[jax.Array, jax.Array]:
        # The barriers keep XLA from merging these recomputations with the forward's act(gate) or
        # with each other: merged, act's intermediates would be stored and read back again.
        gate, up = saved
        gate_for_up, up_for_gate = jax.lax.optimization_barrier((gate, up))
        gate_for_gate, d_out = jax.lax.optimization_barrier((gate, d_out))
        slope = jax.jvp(act, (gate_for_gate,), (jnp.ones_like(gate),))[1]
        return (d_out * up_for_gate * slope).astype(gate.dtype), (d_out * act(gate_for_up)).astype(up.dtype)

    gated.defvjp(forward, backward)
    return gated


def dropout(module: nn.Module, rate: float, x: jax.Array, train: bool) -> jax.Array:
    """Dropout that runs only when training *and* a dropout rng was given (else identity)."""
    if not train or rate <= 0.0 or not module.has_rng("dropout"):
        return x
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def dropout_rng(module: nn.Module, rate: float, train: bool) -> jax.Array | None:
    """An rng for attention-probability dropout, or None when dropout is off."""
    if not train or rate <= 0.0 or not module.has_rng("dropout"):
        return None
    return module.make_rng("dropout")


_policies = jax.checkpoint_policies
# The primitive JAX's cuDNN attention binds in its forward rule (jax._src.cudnn.fused_attention_stablehlo,
# called from jtrain.models.attention); JAX gives it no checkpoint name, so it is matched by name.
_CUDNN_ATTENTION_FORWARD = "dot_product_attention_fwd_wrapper"


def _saves_cudnn_attention(prim: Any, *_: Any, **__: Any) -> bool:
    """A remat policy keeping cuDNN attention's forward outputs (its output and softmax statistics)."""
    return getattr(prim, "name", None) == _CUDNN_ATTENTION_FORWARD


# JAX's dot policies look for `dot_general`; on CPU the dense products and attention are custom
# calls, so their outputs carry names that jtrain's dot policies save too: the dense products (no
# batch dimensions) under both, the CPU attention kernel's output under `dots_saveable` only, as
# XLA's batched attention products are. On GPUs `dots_saveable` keeps cuDNN's attention the same way.
def _saving_any(*policies: Callable[..., bool]) -> Callable[..., bool]:
    """A remat policy that saves what any of `policies` saves."""
    return functools.reduce(_policies.save_from_both_policies, policies)


REMAT_POLICIES: dict[str, Any] = {
    "full": None,
    "nothing_saveable": _policies.nothing_saveable,
    "dots_saveable": _saving_any(_policies.dots_saveable, _policies.save_only_these_names(PRODUCT_NAME, ATTENTION_NAME),
                                 _saves_cudnn_attention),
    "dots_with_no_batch_dims_saveable": _saving_any(_policies.dots_with_no_batch_dims_saveable,
                                                    _policies.save_only_these_names(PRODUCT_NAME)),
    "everything_saveable": _policies.everything_saveable,
}


def layer_class(cls: type[nn.Module], remat_policy: str | None) -> type[nn.Module]:
    """The layer class, wrapped in `nn.remat` when a gradient-checkpointing policy is set."""
    if remat_policy is None:
        return cls
    if remat_policy not in REMAT_POLICIES:
        raise ConfigError(f"unknown remat_policy {remat_policy!r}; valid: {sorted(REMAT_POLICIES)}")
    return nn.remat(cls, policy=REMAT_POLICIES[remat_policy])


class _ScanStep(nn.Module):
    """Adapter so that `nn.scan` carries the hidden state through one layer."""

    layer_cls: Any
    cfg: Any
    train: bool

    @nn.compact
    def __call__(self, h: jax.Array, idx: jax.Array, args: tuple) -> tuple[jax.Array, None]:
        return self.layer_cls(self.cfg, self.train, name="layer")(h, idx, *args), None


def run_layers(layer_cls: type[nn.Module], cfg: Any, train: bool, h: jax.Array, args: tuple, *,
               num_layers: int, name: str, scan: bool, remat_policy: str | None) -> jax.Array:
    """Apply `num_layers` layers `layer_cls(cfg, train)(h, idx, *args)`.

    Unscanned layers are named `{name}_{i}` (HF's `{name}.{i}`); scanned ones are stacked under
    `{name}/layer` with a leading `layers` logical axis. With `cfg.pipeline_stages` > 1 (set from
    the mesh's `stage` axis) the same stacked params run as a GPipe pipeline; init always takes
    the plain scan, so the params layout never depends on the mesh. Must be called inside a
    compact method.
    """
    cls = layer_class(layer_cls, remat_policy)
    stages = getattr(cfg, "pipeline_stages", 1)
    if stages > 1 and not scan:
        raise ConfigError(f"pipeline_stages={stages} needs stacked layers: set `scan_layers=True`")
    if scan:
        scanned = nn.scan(
            _ScanStep, variable_axes={"params": 0, "intermediates": 0}, split_rngs={"params": True, "dropout": True},
            in_axes=(0, nn.broadcast), length=num_layers, metadata_params={nn.PARTITION_NAME: "layers"},
        )(cls, cfg, train, name=name)
        if stages > 1 and not scanned.is_initializing():
            return _run_pipelined(scanned, cls, cfg, train, h, args, num_layers=num_layers, stages=stages)
        h, _ = scanned(h, jnp.arange(num_layers), args)
        return h
    for i in range(num_layers):
        h = cls(cfg, train, name=f"{name}_{i}")(h, i, *args)
    return h


def _run_pipelined(scanned: nn.Module, cls: type[nn.Module], cfg: Any, train: bool, h: jax.Array, args: tuple,
                   *, num_layers: int, stages: int) -> jax.Array:
    """The scanned stack run as a GPipe pipeline over `stages` (see `jtrain.pipeline_parallel`).

    Reads the same stacked params [layers, ...] the plain scan creates (so checkpoints do not
    care whether a run was pipelined) and applies one layer at a time as a pure function. Per-row
    argument leaves (arrays of rank >= 2 whose leading dimension is the batch: positions, the
    mask's padding and segment ids) are split into micro-batches with the hidden states; the rest
    (rotary frequencies, a traced window) is shared.
    """
    B = h.shape[0]
    micro = microbatch_count(stages, getattr(cfg, "pipeline_microbatches", None))
    sharding = getattr(cfg, "activation_sharding", None)
    check_stages(num_layers, stages, B, micro, row_split=1 if sharding is None else sharding.devices_along("batch"))
    per_stage = num_layers // stages
    leaves, treedef = jax.tree.flatten(args)
    per_row = tuple(a.ndim >= 2 and a.shape[0] == B for a in leaves)
    row_args = tuple(a for a, r in zip(leaves, per_row) if r)
    base_rng = scanned.make_rng("dropout") if train and scanned.has_rng("dropout") else None
    layer = cls(cfg, train, parent=None)  # unbound: applied as a pure function of one layer's params

    def stage_fn(params: Any, h_stage: jax.Array, rows: tuple, stage: jax.Array, micro_idx: jax.Array):
        it = iter(rows)
        layer_args = jax.tree.unflatten(treedef, [next(it) if r else a for a, r in zip(leaves, per_row)])

        def one(h_in: jax.Array, xs: tuple) -> tuple[jax.Array, Any]:
            layer_params, j = xs
            idx = stage * per_stage + j
            rngs = None if base_rng is None else {"dropout": jax.random.fold_in(jax.random.fold_in(base_rng, idx),
                                                                                micro_idx)}
            out, state = layer.apply({"params": layer_params}, h_in, idx, *layer_args, rngs=rngs,
                                     mutable=["intermediates"])
            return out, state.get("intermediates", {})

        return jax.lax.scan(one, h_stage, (params, jnp.arange(per_stage)))

    stacked = scanned.variables["params"]["layer"]
    h, sown = gpipe(stage_fn, split_stages(stacked, stages), h, row_args, stages=stages, microbatches=micro,
                    constrain=sharding, with_aux=True)
    # What the layers sowed (a mixture-of-experts block's router logits, [layers, B, ...] now, as the
    # plain scan stacks them) is sown again by the module that called run_layers, under the same
    # names, so the model reads it as it does without a pipeline (a no-op unless it asked for it).
    for path, leaf in jax.tree_util.tree_flatten_with_path(sown)[0]:
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        scanned.parent.sow("intermediates", names[-1], leaf)
    return h


# ---- activation layouts on a mesh (every architecture; see HFConfig.activation_sharding) ----
def constrain(cfg: Any, x: jax.Array, *logical: str | None) -> jax.Array:
    """Pin `x` to the mesh layout of its logical axes when the config carries activation shardings
    (a no-op on one device): keeps GSPMD from picking a layout that reshards at the next layer."""
    sharding = getattr(cfg, "activation_sharding", None)
    return x if sharding is None else sharding(x, logical)


def pipelined(cfg: Any) -> bool:
    """The layers run inside the pipeline's `vmap` over stages (where a `lax.cond` on per-row data
    turns into a select that runs both branches)."""
    return getattr(cfg, "pipeline_stages", 1) > 1


def attend_layout(cfg: Any) -> dict[str, Any]:
    """`attend`'s layout arguments for this config: query rows split over devices (sequence
    parallelism, which also keeps cuDNN out), and no per-batch cond on padding inside the
    pipeline's vmap (see `pipelined`)."""
    return {"sequence_parallel": splits_length(cfg), "branch_on_padding": False if pipelined(cfg) else None}


def splits_length(cfg: Any) -> bool:
    """Sequence parallelism is on: query rows (the `length` axis) live on different devices."""
    sharding = getattr(cfg, "activation_sharding", None)
    return sharding is not None and sharding.splits_length()


def check_sequence_length(cfg: Any, length: int) -> None:
    """Refuse, at trace time, a length the `sequence` axis does not divide (see ActivationSharding)."""
    sharding = getattr(cfg, "activation_sharding", None)
    if sharding is not None:
        sharding.check_sequence_length(length)


class ScaledEmbed(nn.Embed):
    """`nn.Embed` whose lookup is multiplied by `scale` (Gemma's sqrt(hidden_size); None: 1) inside the
    call, so what intercepts the embedding (NEFTune) sees the scaled rows, as HF's scaled embedding
    module gives them. `attend` (a tied head) uses the unscaled table, as HF's tied lm_head does."""

    scale: float | None = None

    def __call__(self, inputs: jax.Array) -> jax.Array:
        # The lookup is written out rather than `super().__call__`: interceptors see every method call,
        # so the parent's call would be intercepted too and NEFTune would add its noise twice.
        if not jnp.issubdtype(inputs.dtype, jnp.integer):
            raise ValueError("Input type must be an integer or unsigned integer.")
        table = self.embedding if self.dtype is None else self.embedding.astype(self.dtype)
        out = jnp.take(table, inputs, axis=0)
        return out if self.scale is None else scale_rows(out, self.scale)


def scale_rows(h: jax.Array, scale: float) -> jax.Array:
    """Rows times `scale`, computed in float32 and cast back (HF multiplies in the weights' dtype)."""
    return (h.astype(jnp.float32) * jnp.float32(scale)).astype(h.dtype)


class TokenEmbeddingOutput(nn.Module):
    """Identity on the token embeddings of the sharded path: a method call that
    `flax.linen.intercept_methods` sees (NEFTune adds its noise there), since that path reads the
    table directly instead of calling the `nn.Embed`. No parameters, so the param tree is unchanged."""

    @nn.compact
    def __call__(self, h_BLD: jax.Array) -> jax.Array:
        return h_BLD


def embed_tokens(cfg: Any, embed: nn.Embed, input_ids_BL: jax.Array, *, output_name: str = "embed_tokens_output"
                 ) -> jax.Array:
    """Token embeddings. With activation shardings the table is first gathered over fsdp (see
    `ActivationSharding.gathered`), so the rows come out split over the batch axes (and the
    length under sequence parallelism) only; `output_name` names the TokenEmbeddingOutput."""
    if getattr(cfg, "activation_sharding", None) is None:
        return embed(input_ids_BL)
    table_VD = cfg.activation_sharding.gathered(embed.embedding, ("vocab", "embed"))
    h_BLD = jnp.take(table_VD, input_ids_BL, axis=0).astype(jnp.dtype(cfg.dtype))
    if getattr(embed, "scale", None) is not None:  # ScaledEmbed: the same rows its own call returns
        h_BLD = scale_rows(h_BLD, embed.scale)
    h_BLD = TokenEmbeddingOutput(name=output_name)(h_BLD)
    return constrain(cfg, h_BLD, "batch", "length", "embed")


def positions_within_segments(segment_ids_BL: jax.Array) -> jax.Array:
    """0, 1, 2, ... restarting at every new document of a packed row."""
    L = segment_ids_BL.shape[1]
    idx = jnp.broadcast_to(jnp.arange(L), segment_ids_BL.shape)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids_BL[:, :1], bool), segment_ids_BL[:, 1:] != segment_ids_BL[:, :-1]], axis=1
    )
    first_BL = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return idx - first_BL


def default_positions(input_ids_BL: jax.Array, segment_ids_BL: jax.Array | None) -> jax.Array:
    """HF's default positions (0..L-1), restarted per document when rows are packed."""
    if segment_ids_BL is not None:
        return positions_within_segments(segment_ids_BL)
    return jnp.broadcast_to(jnp.arange(input_ids_BL.shape[1]), input_ids_BL.shape)


def last_token_index(input_ids_BL: jax.Array, attention_mask_BL: jax.Array | None,
                     pad_token_id: int | None) -> jax.Array:
    """Index [B] of the token that HF's decoder classifiers pool.

    HF takes the rightmost token that is not `pad_token_id` (0 if a row is all padding). With no
    pad token HF refuses batches > 1; jtrain then uses the rightmost position where
    `attention_mask` is 1, or the last position when there is no mask either.
    """
    L = input_ids_BL.shape[1]
    idx = jnp.arange(L, dtype=jnp.int32)
    if pad_token_id is not None:
        keep = input_ids_BL != pad_token_id
    elif attention_mask_BL is not None:
        keep = attention_mask_BL.astype(bool)
    else:
        return jnp.full(input_ids_BL.shape[:1], L - 1, jnp.int32)
    return jnp.argmax(idx * keep.astype(jnp.int32), axis=-1)


def take_rows(h_BLD: jax.Array, index_B: jax.Array) -> jax.Array:
    """h_BLD[b, index_B[b]] for every row b."""
    return jnp.take_along_axis(h_BLD, index_B[:, None, None], axis=1)[:, 0]


def token_classifier(module: nn.Module, cfg: Any, h_BLD: jax.Array, train: bool, name: str,
                     use_bias: bool = True) -> dict[str, jax.Array]:
    """HF's token-classification head of its decoders (`GenericForTokenClassification`,
    `GPT2ForTokenClassification`): dropout at the config's `classifier_dropout`, else its `hidden_dropout`,
    else 0.1 (neither is a field of these configs, so both come from config.json's extra keys), then a
    Dense over every position; float32 logits [B, L, labels]."""
    extra = getattr(cfg, "extra", {})
    rate = next((r for r in (extra.get("classifier_dropout"), extra.get("hidden_dropout")) if r is not None), 0.1)
    x = dropout(module, float(rate), h_BLD, train)
    logits = Dense(cfg.num_labels, use_bias=use_bias, dtype=jnp.dtype(cfg.dtype), name=name,
                   kernel_init=normal_init(cfg.initializer_range, ("embed", "labels")),
                   bias_init=zeros_init(("labels",)))(x)
    return {"logits": logits.astype(jnp.float32)}
