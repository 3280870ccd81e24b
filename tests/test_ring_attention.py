"""Ring attention (`sequence_parallel_attention: ring`) on 8 fake devices against one device.

The ring function is compared with the single-device reference einsum (`attend(implementation=
"reference")`) for the output and the gradients wrt q, k and v, on `sequence 4 x data 2` and
`tensor 2 x sequence 2 x data 2`, for every kind of mask jtrain builds; then a tiny Llama (and GPT-2,
BERT) trained through it must give the single-device loss and gradients; then memory and refusals.
"""

from __future__ import annotations

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jtrain import ConfigError
from jtrain.compiled import with_activation_sharding
from jtrain.config import build_config
from jtrain.models import create_model
from jtrain.models.attention import attend, make_attention_mask
from jtrain.models import ring_attention as ra
from jtrain.models.ring_attention import ring_attention
from jtrain.pipeline_parallel import with_pipeline_stages
from jtrain.sharding import BATCH_AXES, ActivationSharding, ShardingRules, make_mesh, param_shardings
from test_sequence_parallel_models import GRAD_ATOL_SCALE, GRAD_RTOL, LENGTH, LOSS_RTOL, MODELS as SP_MODELS
from test_sequence_parallel_models import _batch as sp_batch, _loss_and_grads
from tiny import TINY_LLAMA

MESHES = {"sequence4_data2": {"sequence": 4, "data": 2},
          "tensor2_sequence2_data2": {"tensor": 2, "sequence": 2, "data": 2}}
B, L, N, K, H = 4, 64, 4, 2, 8  # grouped-query heads: 2 query heads per key/value head
# Float32 throughout. The online softmax rescales partial sums block by block, so its sums run in
# another order than the reference's one softmax: measured differences are at most 4.2e-7 of the
# largest output or gradient (a few float32 ulp, eps 1.2e-7). Tolerance: atol 1e-5 x the largest
# reference value (rtol 1e-5 for the rest), ~20x the measured worst case. A dropped mask column block,
# a missing rescale or a gradient block that never gets home moves entries by 1e-2 or more of that scale.
RTOL, ATOL_SCALE = 1e-5, 1e-5


def _lengths_mask(lengths: list[int], left: bool = False) -> np.ndarray:
    idx = np.arange(L)[None, :]
    n = np.asarray(lengths)[:, None]
    return ((idx >= L - n) if left else (idx < n)).astype(np.int32)


def _mask(case: str) -> jax.Array:
    """jtrain's mask (its parts, `AttentionMask`) for each case (boundaries off the block edges: 16 and 32)."""
    if case in ("causal", "softcap"):
        return make_attention_mask(None, None, causal=True)  # no per-row term: one mask for every row
    if case == "causal_padding":  # right padding, and left padding: its first queries see no key at all
        right, left = _lengths_mask([50, 64, 23, 7]), _lengths_mask([40, 64, 64, 64], left=True)
        return make_attention_mask(jnp.asarray(right * left), None, causal=True)
    if case == "packed":  # two or three documents per row, then padding (segment 0)
        seg = np.ones((B, L), np.int32)
        for row, (a, b, end) in enumerate([(20, 37, 60), (9, 45, 64), (30, 31, 50), (5, 55, 62)]):
            seg[row, a:] = 2
            seg[row, b:] = 3
            seg[row, end:] = 0
        return make_attention_mask(jnp.asarray((seg > 0).astype(np.int32)), jnp.asarray(seg), causal=True)
    if case == "sliding_window":  # window 10 < block 16: whole blocks masked off behind the window
        return make_attention_mask(jnp.asarray(_lengths_mask([64, 50, 64, 33])), None, causal=True,
                                   sliding_window=10)
    if case == "bidirectional_padding":  # BERT's mask: every query sees every real key
        return make_attention_mask(jnp.asarray(_lengths_mask([64, 50, 17, 40])), None, causal=False)
    raise AssertionError(case)


CASES = ("causal", "causal_padding", "packed", "sliding_window", "softcap", "bidirectional_padding")


def _qkv(seed: int = 0):
    kq, kk, kv, kw = jax.random.split(jax.random.key(seed), 4)
    return (jax.random.normal(kq, (B, L, N, H)), jax.random.normal(kk, (B, L, K, H)),
            jax.random.normal(kv, (B, L, K, H)), jax.random.normal(kw, (B, L, N, H)))


def _value_and_grads(attention, weights):
    """(output, d/dq, d/dk, d/dv of sum(output * weights)): one compile for the forward and backward."""
    def loss(q, k, v):
        out = attention(q, k, v)
        return jnp.sum(out * weights), out

    def run(q, k, v):
        (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return (out, *grads)

    return jax.jit(run)


def _assert_close(got, want, what: str) -> float:
    scale = float(jnp.abs(want).max())
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=RTOL, atol=ATOL_SCALE * scale, err_msg=what)
    return float(jnp.abs(got - want).max()) / scale


@pytest.mark.parametrize("mesh_name", list(MESHES))
@pytest.mark.parametrize("case", CASES)
def test_ring_matches_reference_output_and_gradients(case, mesh_name):
    q, k, v, w = _qkv()
    mask = _mask(case)
    softcap = 5.0 if case == "softcap" else None  # small, so most scores are bent by it
    decoder = case != "bidirectional_padding"
    sharding = ActivationSharding(make_mesh(MESHES[mesh_name]))
    ring = _value_and_grads(lambda q, k, v: ring_attention(q, k, v, mask, sharding, softcap=softcap,
                                                           causal_blocks=decoder), w)
    ref = _value_and_grads(lambda q, k, v: attend(q, k, v, mask, implementation="reference", softcap=softcap), w)
    worst = [_assert_close(g, r, f"{case} {name}") for g, r, name in zip(ring(q, k, v), ref(q, k, v),
                                                                          ("out", "dq", "dk", "dv"))]
    print(f"{case} on {mesh_name}: max |delta| / max |ref| out {worst[0]:.1e}, dq {worst[1]:.1e}, "
          f"dk {worst[2]:.1e}, dv {worst[3]:.1e}")
    if case == "causal_padding":  # the left-padded row's first queries have no key: zeros, as in `attend`
        out = ring(q, k, v)[0]
        assert float(jnp.abs(out[0, :L - 40]).max()) == 0.0 and float(jnp.abs(out[0, L - 40:]).min()) > 0.0
    # Decoder masks skip the key blocks after a device's rows (lax.cond); bidirectional ones may not.
    jaxpr = str(jax.make_jaxpr(lambda q, k, v: ring_attention(q, k, v, mask, sharding, causal_blocks=decoder))(
        q, k, v))
    assert ("cond[" in jaxpr) == decoder


def test_causal_block_skipping_leaves_no_later_block_seen():
    """`causal_blocks` is a promise about the mask: skipping blocks after the rows must change nothing for a
    decoder mask, and must change the result of a mask that breaks the promise (so the skip is real)."""
    q, k, v, _ = _qkv(1)
    sharding = ActivationSharding(make_mesh(MESHES["sequence4_data2"]))
    every = jnp.ones((1, 1, L, L), bool)
    f = jax.jit(lambda q, k, v, m, c: ring_attention(q, k, v, m, sharding, causal_blocks=c), static_argnums=4)
    assert not np.allclose(f(q, k, v, every, True), f(q, k, v, every, False), atol=1e-3)
    causal = _mask("causal")
    np.testing.assert_allclose(f(q, k, v, causal, True), f(q, k, v, causal, False), rtol=RTOL, atol=1e-6)


def test_zigzag_order_holds_an_early_and_a_late_half_block_per_device():
    """Device d holds global half-blocks d and 2P-1-d after `_to_zigzag`; `_from_zigzag` undoes it."""
    mesh = make_mesh({"sequence": 4, "data": 2})
    r = ra._Ring(mesh=mesh, q_spec=P(None, "sequence"), kv_spec=P(None, "sequence"), mask_spec=None,
                 lse_spec=P(), axes=("sequence",), size=4, scale=1.0, softcap=None, causal_blocks=True, zigzag=True)
    x = jnp.arange(2 * L).reshape(2, L)
    spec = P(None, "sequence")
    to = jax.jit(jax.shard_map(lambda x: ra._to_zigzag(r, x, axis=1), mesh=mesh, in_specs=spec, out_specs=spec))
    back = jax.jit(jax.shard_map(lambda x: ra._from_zigzag(r, x, axis=1), mesh=mesh, in_specs=spec, out_specs=spec))
    half = L // 8
    order = np.concatenate([np.arange(h * half, (h + 1) * half) for d in range(4) for h in (d, 7 - d)])
    np.testing.assert_array_equal(to(x), np.asarray(x)[:, order])
    np.testing.assert_array_equal(back(to(x)), x)


@pytest.mark.parametrize("balance", [True, False])
def test_zigzag_gives_every_device_the_same_causal_work(balance, monkeypatch):
    """Score entries computed per ring position, counted in the kernel itself: a debug callback in
    `_scores` runs only for the blocks (or zigzag quadrants) that `lax.cond` computes. Contiguous
    blocks: device p computes p + 1 blocks of l x l, so the last one waits on P blocks. Zigzag: each
    computes 2(P-1) + 3 quadrants of (l/2) x (l/2), forward and backward alike."""
    counts = collections.Counter()
    scores = ra._scores

    def counted(r, q, k):
        entries = q.shape[1] * k.shape[1]
        jax.debug.callback(lambda i: counts.update({int(i): entries}), ra._index(r))
        return scores(r, q, k)

    monkeypatch.setattr(ra, "_scores", counted)
    q, k, v, w = _qkv(2)
    sharding = ActivationSharding(make_mesh(MESHES["sequence4_data2"]))  # each ring position twice (data 2)
    ring = _value_and_grads(lambda q, k, v: ring_attention(q, k, v, _mask("packed"), sharding, causal_blocks=True,
                                                           balance=balance), w)
    ring(q, k, v)[0].block_until_ready()
    jax.effects_barrier()
    per_position = [counts[p] // 2 for p in range(4)]  # forward + backward: two score passes per block
    l = L // 4
    if balance:
        assert per_position == [2 * (2 * 3 + 3) * (l // 2) ** 2] * 4
    else:
        assert per_position == [2 * (p + 1) * l * l for p in range(4)]


@pytest.mark.parametrize("case", ["causal_padding", "packed", "sliding_window"])
def test_contiguous_blocks_still_match_the_reference(case):
    """`balance=False` (contiguous blocks, the layout a `DenseMask` always takes) for jtrain's masks."""
    q, k, v, w = _qkv(3)
    mask = _mask(case)
    sharding = ActivationSharding(make_mesh(MESHES["sequence4_data2"]))
    ring = _value_and_grads(lambda q, k, v: ring_attention(q, k, v, mask, sharding, causal_blocks=True,
                                                           balance=False), w)
    ref = _value_and_grads(lambda q, k, v: attend(q, k, v, mask, implementation="reference"), w)
    for got, want, name in zip(ring(q, k, v), ref(q, k, v), ("out", "dq", "dk", "dv")):
        _assert_close(got, want, f"{case} {name}")


# ---- the models, trained through the ring ----
# Shapes, tolerances (loss rtol 1e-6, gradients rtol 1e-5 plus 1e-6 x the largest gradient: the same
# float32 math summed in another order across shards and by the online softmax; a mask or rescale bug
# moves the loss by 1e-3 or more), batches and the loss-and-gradient function are test_sequence_parallel
# _models' own, so ring and all-gather are held to one standard.
MODELS = {**SP_MODELS, "llama": ("causal_lm", TINY_LLAMA)}


def _model(model_type: str, **options):
    task, config = MODELS[model_type]
    return create_model(model_type, config, task=task, **options)


def _batch(model_type: str) -> dict:
    """The sequence-parallel test's rows; Llama's also hold two packed documents (segment ids)."""
    batch = sp_batch("bert" if model_type == "bert" else "gpt2")
    if model_type == "llama":
        boundary = np.array([20, 37, 45, 61])[:, None]
        seg = np.where(np.arange(LENGTH)[None, :] < boundary, 1, 2) * batch["attention_mask"]
        batch["segment_ids"] = seg.astype(np.int32)
    return batch


def _on_mesh(model, params, mesh_shape):
    mesh = make_mesh(mesh_shape)
    run_model = with_activation_sharding(with_pipeline_stages(model, mesh), mesh, ShardingRules())
    placed = jax.device_put(params, param_shardings(model.logical_axes(), model.abstract_params(), mesh))
    return run_model, placed, mesh


RUNS = {"llama": ("llama", {}, MESHES["sequence4_data2"]), "gpt2": ("gpt2", {}, MESHES["sequence4_data2"]),
        "bert": ("bert", {}, MESHES["sequence4_data2"]),
        # Pipeline stages run the layers under a vmap over `stage`: the ring's shard_map sits inside it.
        "llama_pipelined": ("llama", {"scan_layers": True}, {"stage": 2, "sequence": 2, "data": 2}),
        # The ring with contiguous blocks (no zigzag): the model option that keeps the old layout.
        "llama_contiguous": ("llama", {"sequence_parallel_attention": "ring_contiguous"}, MESHES["sequence4_data2"])}


@pytest.mark.parametrize("run", list(RUNS))
def test_model_with_ring_matches_one_device(run, monkeypatch):
    model_type, options, mesh_shape = RUNS[run]
    model = _model(model_type, **{"sequence_parallel_attention": "ring", **options})
    plans, make_plan = [], ra._plan
    monkeypatch.setattr(ra, "_plan", lambda *a, **k: plans.append(make_plan(*a, **k)) or plans[-1])
    params = jax.device_get(model.init(jax.random.key(0)))
    batch = _batch(model_type)
    ref_loss, ref_grads = _loss_and_grads(model)(params, batch)  # one device: the option changes nothing
    run_model, placed, mesh = _on_mesh(model, params, mesh_shape)
    placed_batch = jax.device_put(batch, NamedSharding(mesh, P(BATCH_AXES, "sequence")))
    step = _loss_and_grads(run_model)
    loss, grads = step(placed, placed_batch)
    assert float(loss) == pytest.approx(float(ref_loss), rel=LOSS_RTOL)
    # Decoders take the zigzag layout unless the option asks for contiguous blocks; BERT cannot use it.
    assert plans and {p.zigzag for p in plans} == {model_type != "bert" and run != "llama_contiguous"}
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(ref_grads))
    for (path, g), r in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=GRAD_RTOL, atol=GRAD_ATOL_SCALE * scale,
                                   err_msg=jax.tree_util.keystr(path))
    if "stage" not in mesh_shape:  # (the pipeline hands micro-batches on by collective-permute itself)
        hlo = step.lower(placed, placed_batch).compile().as_text()
        # Key/value blocks travel; the forward gathers no activation over `sequence` (the all_gather path
        # gathers k and v there). The backward's gathers belong to the dense layers' weight gradients.
        assert "collective-permute" in hlo and not _forward_float_gathers(hlo)


def _forward_float_gathers(hlo: str) -> list[str]:
    """Floating-point all-gathers of the forward pass (op names outside autodiff's `transpose(...)`)."""
    found = []
    for line in hlo.splitlines():
        if " all-gather(" in line and re.search(r"= (f32|bf16|f16)\[", line):
            name = re.search(r'op_name="([^"]*)"', line)
            if name is None or "transpose(" not in name.group(1):
                found.append(line)
    return found


def test_without_sequence_parallelism_the_option_changes_nothing():
    batch = _batch("llama")
    plain, ring = _model("llama"), _model("llama", sequence_parallel_attention="ring")
    params = jax.device_get(plain.init(jax.random.key(0)))
    for mesh_shape in ({"data": 2}, {"tensor": 2, "data": 2}):
        outs = []
        for model in (plain, ring):
            run_model, placed, mesh = _on_mesh(model, params, mesh_shape)
            placed_batch = jax.device_put(batch, NamedSharding(mesh, P(BATCH_AXES)))
            outs.append(jax.jit(run_model.apply)(placed, placed_batch)["logits"])
        np.testing.assert_array_equal(np.asarray(outs[0]), np.asarray(outs[1]))  # the same program


# ---- memory ----
def test_ring_needs_less_scratch_than_all_gather_at_long_length():
    """Per-device scratch (XLA's temp allocation) of attention forward + backward at length 1024 on
    `sequence 4 x data 2`. The all-gather path holds the [rows, heads, L/4, L] scores and probabilities
    of the whole row (and the gathered keys and values, saved for the backward); the ring holds one
    [rows, heads, L/4, L/4] block of them and two key/value blocks at a time. Measured on XLA:CPU (the
    suite's flags): all_gather 17.0 MB, ring 5.3 MB (ratio 0.31), and the same ring differentiated by plain
    autodiff instead of its custom VJP 14.9 MB (every visiting block saved). Asserted: ring at most half."""
    length, rows, heads, kv_heads, dim = 1024, 2, 4, 2, 32
    mesh = make_mesh(MESHES["sequence4_data2"])
    sharding = ActivationSharding(mesh)
    mask = make_attention_mask(None, None, causal=True)
    q_spec = NamedSharding(mesh, P(BATCH_AXES, "sequence"))
    args = [jax.ShapeDtypeStruct((rows, length, h, dim), jnp.float32, sharding=q_spec)
            for h in (heads, kv_heads, kv_heads)]

    def all_gather(q, k, v):
        k = sharding(k, ("batch", None, "kv_heads", "head_dim"))
        v = sharding(v, ("batch", None, "kv_heads", "head_dim"))
        return attend(q, k, v, mask, causal_blocks=True, sequence_parallel=True)

    def ring(q, k, v):
        return ring_attention(q, k, v, mask, sharding, causal_blocks=True)

    temp = {}
    for name, attention in (("all_gather", all_gather), ("ring", ring)):
        grad = jax.jit(jax.grad(lambda q, k, v, f=attention: jnp.sum(jnp.sin(f(q, k, v))), argnums=(0, 1, 2)))
        temp[name] = grad.lower(*args).compile().memory_analysis().temp_size_in_bytes
    print(f"attention fwd+bwd scratch per device at L={length}: {temp}")
    assert temp["ring"] <= 0.5 * temp["all_gather"], temp


# ---- refusals ----
def _trace_on_sequence_mesh(model, *, train: bool = False, rng=None):
    """Trace (never compile) the model's forward on `sequence 4 x data 2`: the refusals come at trace time."""
    run_model = with_activation_sharding(model, make_mesh(MESHES["sequence4_data2"]), ShardingRules())
    batch = {k: v for k, v in _batch("llama").items() if k != "labels"}
    params = _model("llama").abstract_params()  # a cudnn model cannot even trace its init on CPU
    jax.eval_shape(lambda p, b: run_model.apply(p, b, rng=rng, train=train), params, batch)


@pytest.mark.parametrize("impl", ["reference", "cudnn"])
def test_ring_refuses_other_attention_kernels(impl):
    with pytest.raises(ConfigError, match=rf"sequence_parallel_attention 'ring' .* attention_impl '{impl}': set "
                                          r"attention_impl 'auto'"):
        _trace_on_sequence_mesh(_model("llama", sequence_parallel_attention="ring", attention_impl=impl))


def test_ring_refuses_attention_dropout_in_training_only():
    model = create_model("llama", {**TINY_LLAMA, "attention_dropout": 0.1}, sequence_parallel_attention="ring")
    _trace_on_sequence_mesh(model)  # evaluation: no dropout, so the ring runs
    with pytest.raises(ConfigError, match=r"'ring' has no attention-probability dropout, but attention_dropout=0.1 "
                                          r"is active in training: set attention_dropout to 0"):
        _trace_on_sequence_mesh(model, train=True, rng=jax.random.key(1))


def test_ring_refuses_unknown_mode_and_indivisible_length():
    with pytest.raises(ConfigError, match=r"sequence_parallel_attention 'rings' is not one of all_gather, ring"):
        _model("llama", sequence_parallel_attention="rings")
    q = jnp.zeros((2, 18, 4, 8))
    sharding = ActivationSharding(make_mesh(MESHES["sequence4_data2"]))
    with pytest.raises(ConfigError, match=r"ring attention: query length 18 does not divide over mesh axis "
                                          r"'sequence' of size 4"):
        ring_attention(q, q, q, jnp.ones((1, 1, 18, 18), bool), sharding)


def test_run_config_sets_the_option():
    cfg = build_config({"model": {"sequence_parallel_attention": "ring"}, "training": {"output_dir": "/tmp/x"}})
    assert cfg.model.sequence_parallel_attention == "ring"
    assert build_config({"training": {"output_dir": "/tmp/x"}}).model.sequence_parallel_attention == "all_gather"
