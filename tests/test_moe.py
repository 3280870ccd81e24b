"""The mixture-of-experts block: routing and dispatch against float64 numpy, HF's aux loss,
expert parallelism against one device, routing statistics in the step's metrics, bad input.

Tolerances are stated at each comparison with their reason.
"""

from __future__ import annotations

import math

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from tiny import lm_rows
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from jtrain.compiled import build_compiled_steps
from jtrain.errors import ConfigError
from jtrain.losses import causal_lm_loss, routing_logs
from jtrain.models import create_model
from jtrain.models.moe import MoEFeedForward, capacity, router_statistics
from jtrain.sharding import make_mesh

E, K, D, F = 4, 2, 16, 24
TINY_MIXTRAL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, num_local_experts=E, num_experts_per_tok=K, max_position_embeddings=64,
                    output_router_logits=True, router_aux_loss_coef=0.1)


def _block(dispatch: str, capacity_factor: float = 1.25) -> MoEFeedForward:
    return MoEFeedForward(num_experts=E, top_k=K, hidden_size=D, intermediate_size=F, initializer_range=0.3,
                          dispatch=dispatch, capacity_factor=capacity_factor)


@pytest.fixture(scope="module")
def block_inputs():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 12, D)), jnp.float32)
    params = flax.linen.unbox(jax.jit(_block("dropless").init)(jax.random.key(0), x)["params"])
    return x, params


def _reference(x, params, cap: int | None):
    """float64 numpy: HF routing, then each expert takes its queue (first choices first, then second
    choices, in token order within a row) up to `cap` tokens; None = no limit. Returns (y, dropped)."""
    x = np.asarray(x, np.float64)
    gate = np.asarray(params["gate"]["kernel"], np.float64)
    w1, w3, w2 = (np.asarray(params["experts"][n], np.float64) for n in ("w1", "w3", "w2"))
    logits = x @ gate
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top = np.argsort(-probs, axis=-1, kind="stable")[..., :K]
    weights = np.take_along_axis(probs, top, -1)
    weights /= weights.sum(-1, keepdims=True)
    y, dropped = np.zeros_like(x), np.zeros(x.shape[:2])
    for b in range(x.shape[0]):
        used = [0] * E
        for k in range(K):
            for s in range(x.shape[1]):
                e = top[b, s, k]
                if cap is not None and used[e] >= cap:
                    dropped[b, s] += 1
                    continue
                used[e] += 1
                g, u = x[b, s] @ w1[e], x[b, s] @ w3[e]
                y[b, s] += weights[b, s, k] * ((g / (1 + np.exp(-g)) * u) @ w2[e])
    return y, dropped


def _run(block, params, x):
    y, state = jax.jit(lambda p: block.apply({"params": p}, x, mutable=["intermediates"]))(params)
    return np.asarray(y), np.asarray(state["intermediates"]["dropped"][0])


# float32 against float64 on values of order 1 built from sums of 16-24 products: float32 rounding
# is ~1e-6 relative; a token sent to a wrong expert or weighted wrongly moves outputs by > 1e-2.
REF_ATOL = 2e-5


def test_dropless_matches_numpy_reference(block_inputs):
    x, params = block_inputs
    y, dropped = _run(_block("dropless"), params, x)
    ref, _ = _reference(x, params, cap=None)
    np.testing.assert_allclose(y, ref, atol=REF_ATOL)
    assert not dropped.any()


def test_capacity_drops_overflow_like_the_reference(block_inputs):
    """capacity_factor 0.5: C = ceil(2 * 12 * 0.5 / 4) = 3 slots per expert and row, so tokens drop."""
    x, params = block_inputs
    cap = capacity(12, E, K, 0.5)
    assert cap == 3
    y, dropped = _run(_block("capacity", 0.5), params, x)
    ref, ref_dropped = _reference(x, params, cap=cap)
    np.testing.assert_allclose(y, ref, atol=REF_ATOL)
    np.testing.assert_array_equal(dropped, ref_dropped)
    assert 0 < dropped.sum() < 3 * 12 * K


def test_capacity_with_room_for_every_token_equals_dropless(block_inputs):
    """C >= S (capacity_factor E / K) drops nothing: outputs and gradients equal dropless up to float32
    reassociation (einsum vs grouped matmul), 1e-5 abs; a dropped or misrouted token would be ~1e-1."""
    x, params = block_inputs
    assert capacity(12, E, K, E / K) == 12

    def loss(p, block):
        return jnp.sum(jnp.sin(block.apply({"params": p}, x)))

    forward = lambda b: jax.jit(b.apply)({"params": params}, x)  # noqa: E731
    gradient = lambda b: jax.jit(jax.grad(loss), static_argnums=1)(params, b)  # noqa: E731
    for fn in (forward, gradient):
        got, want = fn(_block("capacity", E / K)), fn(_block("dropless"))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), got, want)


def test_aux_loss_equals_transformers_function():
    """Same float32 formula on both sides (softmax, top-k counts, two masked means): 1e-6 abs."""
    rng = np.random.default_rng(1)
    B, L, layers = 3, 7, 3
    logits = [rng.standard_normal((B, L, E)).astype(np.float32) for _ in range(layers)]
    mask = (np.arange(L)[None, :] < np.array([7, 5, 2])[:, None]).astype(np.int64)
    for m in (None, mask):
        ref = load_balancing_loss_func(tuple(torch.as_tensor(g.reshape(B * L, E)) for g in logits), E, K,
                                       None if m is None else torch.as_tensor(m))
        aux, stats = jax.jit(router_statistics, static_argnums=3)(
            [jnp.asarray(g) for g in logits], [jnp.zeros((B, L))] * layers,
            None if m is None else jnp.asarray(m, jnp.float32), K)
        np.testing.assert_allclose(float(aux), float(ref), atol=1e-6)
        real = B * L if m is None else int(m.sum())
        assert float(stats["moe_assignments"]) == layers * real * K


# ---------------------------------------------------------------- expert parallelism

STEPS, ACCUM, ROWS, LENGTH = 3, 2, 8, 16
# Every mesh does the same float32 math in another reduction order (the expert buffers are
# exchanged by collectives, the batch gradient is summed by an all-reduce); each sum differs by a
# few ulp and three Adam updates at lr 1e-2 carry that into later losses. rtol 1e-5 bounds it (the
# tiny Llama's mesh tests see ~1e-6); a token routed to a wrong expert or a missing reduction moves
# the loss by > 1e-3.
EP_RTOL = 1e-5


def _train(model, mesh_shape, params, batches):
    mesh = make_mesh(mesh_shape)
    steps = build_compiled_steps(model, mesh, optax.adamw(1e-2), 1e-2, causal_lm_loss, seed=0)
    state = steps.init_state(params)
    hlo = steps.train_step.lower(state, steps.place_train_batch(batches[0])).compile().as_text()
    metrics = []
    for batch in batches:  # the step's own compile is a persistent-cache hit of the one above
        state, m = steps.train_step(state, steps.place_train_batch(batch))
        metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
    return steps, metrics, hlo


@pytest.fixture(scope="module")
def ep_runs():
    """Capacity dispatch (the expert-parallel mode, factor 1.0 so that some tokens drop) on
    expert 4 x data 2, and dropless (per-device sort in shard_map) on expert 2 x tensor 2 x data 2."""
    rows = lm_rows(STEPS * ACCUM * ROWS, LENGTH, seed=0)
    batches = [{k: v[i * ACCUM * ROWS:(i + 1) * ACCUM * ROWS].reshape(ACCUM, ROWS, LENGTH) for k, v in rows.items()}
               for i in range(STEPS)]
    runs = {}
    for dispatch, mesh in (("capacity", {"expert": 4, "data": 2}), ("dropless", {"expert": 2, "tensor": 2, "data": 2})):
        model = create_model("mixtral", TINY_MIXTRAL, moe_dispatch=dispatch, moe_capacity_factor=1.0)
        params = jax.device_get(model.init(jax.random.key(0)))
        runs[f"{dispatch}-single"] = _train(model, {"data": 1}, params, batches)
        runs[f"{dispatch}-mesh"] = _train(model, mesh, params, batches)
    return runs


@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
def test_expert_parallel_trains_like_one_device(ep_runs, dispatch):
    steps, metrics, hlo = ep_runs[f"{dispatch}-mesh"]
    _, reference, _ = ep_runs[f"{dispatch}-single"]
    experts_per_device = E // steps.mesh.shape["expert"]
    w1 = steps.param_sharding["model"]["layers_0"]["block_sparse_moe"]["experts"]["w1"]
    assert w1.spec[0] == "expert" and w1.shard_shape((E, 32, 48))[0] == experts_per_device
    if dispatch == "capacity":  # tokens travel to their experts' devices and back
        assert "all-to-all" in hlo
    losses, ref_losses = [m["loss"] for m in metrics], [m["loss"] for m in reference]
    print(f"{dispatch} on {dict(steps.mesh.shape)}: losses {losses} vs one device {ref_losses}")
    np.testing.assert_allclose(losses, ref_losses, rtol=EP_RTOL)
    assert losses[-1] < losses[0]
    for m, r in zip(metrics, reference):  # routing decisions (integer counts) are the same
        for key in [f"moe_expert_{e}" for e in range(E)] + ["moe_dropped", "moe_assignments"]:
            assert m[key] == r[key], key


def test_routing_statistics_reach_the_step_metrics(ep_runs):
    _, metrics, _ = ep_runs["capacity-mesh"]
    m = metrics[0]
    # 2 micro-batches x 8 rows x 16 tokens x 2 layers x top-2, all real tokens.
    assert m["moe_assignments"] == ACCUM * ROWS * LENGTH * 2 * K
    logs = routing_logs(m)
    assert math.isclose(sum(logs[f"moe_expert_{e}_fraction"] for e in range(E)), 1.0, abs_tol=1e-5)
    assert 0 < logs["moe_dropped_fraction"] < 1  # capacity factor 1.0 with uneven routing drops some
    # aux loss >= 1 (its minimum, at perfectly even routing) and reported as a token-weighted sum
    assert logs["moe_aux_loss"] >= 1.0 - 1e-6


def test_indivisible_expert_count_is_refused_before_compiling():
    model = create_model("mixtral", {**TINY_MIXTRAL, "num_local_experts": 6})
    mesh = make_mesh({"expert": 4, "data": 2})
    with pytest.raises(ConfigError, match=r"num_local_experts=6 does not divide over mesh axis 'expert' of size 4"):
        model.check_mesh(mesh)
    # build_compiled_steps asks the model first, so the message names the config field
    with pytest.raises(ConfigError, match=r"num_local_experts=6 does not divide over mesh axis 'expert' of size 4"):
        build_compiled_steps(model, mesh, optax.sgd(1e-2), 1e-2, causal_lm_loss, seed=0)


@pytest.mark.parametrize("options,match", [
    ({"moe_dispatch": "sorted"}, "moe_dispatch 'sorted' is not one of dropless, capacity"),
    ({"moe_capacity_factor": 0.0}, "moe_capacity_factor must be > 0"),
    ({"num_experts_per_tok": 5}, "num_experts_per_tok=5 must be between 1 and num_local_experts=4"),
])
def test_bad_moe_config_is_refused(options, match):
    with pytest.raises(ConfigError, match=match):
        create_model("mixtral", {**TINY_MIXTRAL, **options})


def test_scanned_layers_report_router_statistics():
    loop = create_model("mixtral", TINY_MIXTRAL)
    scan = create_model("mixtral", TINY_MIXTRAL, scan_layers=True)
    params = loop.init(jax.random.key(0))
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs),
                           *[params["model"][f"layers_{i}"] for i in range(TINY_MIXTRAL["num_hidden_layers"])])
    scan_params = {**params, "model": {k: v for k, v in params["model"].items() if not k.startswith("layers_")}
                   | {"layers": {"layer": stacked}}}
    batch = lm_rows(2, 8)
    b = jax.jit(scan.apply)(scan_params, batch)  # first: without the hook it fails while tracing
    a = jax.jit(loop.apply)(params, batch)
    np.testing.assert_allclose(a["aux_loss"], b["aux_loss"], atol=1e-6)  # same math, same order
    np.testing.assert_allclose(a["logits"], b["logits"], atol=1e-6)
    assert {k: float(v) for k, v in a["router_stats"].items()} == {k: float(v) for k, v in b["router_stats"].items()}


def test_router_jitter_only_while_training_with_a_dropout_rng(block_inputs):
    """HF scales the block input by U(1-j, 1+j) in training only; jtrain also needs a dropout rng."""
    x, params = block_inputs
    block = MoEFeedForward(num_experts=E, top_k=K, hidden_size=D, intermediate_size=F, jitter_noise=0.5, train=True)
    plain = jax.jit(lambda p: _block("dropless").apply({"params": p}, x))(params)
    no_rng = jax.jit(lambda p: block.apply({"params": p}, x))(params)
    noisy = jax.jit(lambda p, r: block.apply({"params": p}, x, rngs={"dropout": r}))(params, jax.random.key(1))
    np.testing.assert_array_equal(no_rng, plain)
    assert np.abs(np.asarray(noisy) - np.asarray(plain)).max() > 1e-2
