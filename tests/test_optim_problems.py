"""Shared problems for the optimizer tests: one tiny MLP defined identically in torch and JAX.

The MLP has the three kinds of parameter HF treats differently for weight decay: kernels
(decayed), biases and a norm-like `scale` (not decayed). Torch weights are (out, in),
flax kernels (in, out); `jax_params_from_torch` transposes.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

D_IN, D_HIDDEN, D_OUT = 8, 16, 4


class NormScale(torch.nn.Module):
    """A bare elementwise scale, named like a norm so HF's name rule excludes it from decay."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(1.0 + 0.1 * torch.randn(dim))


class TorchMLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense_0 = torch.nn.Linear(D_IN, D_HIDDEN)
        self.norm = NormScale(D_HIDDEN)
        self.dense_1 = torch.nn.Linear(D_HIDDEN, D_OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_1(torch.tanh(self.dense_0(x)) * self.norm.weight)


def jax_params_from_torch(model: TorchMLP) -> dict:
    t = lambda p: jnp.asarray(p.detach().numpy())  # noqa: E731
    return {
        "dense_0": {"kernel": t(model.dense_0.weight).T, "bias": t(model.dense_0.bias)},
        "norm": {"scale": t(model.norm.weight)},
        "dense_1": {"kernel": t(model.dense_1.weight).T, "bias": t(model.dense_1.bias)},
    }


def jax_apply(params: dict, x: jax.Array) -> jax.Array:
    h = jnp.tanh(x @ params["dense_0"]["kernel"] + params["dense_0"]["bias"]) * params["norm"]["scale"]
    return h @ params["dense_1"]["kernel"] + params["dense_1"]["bias"]


def jax_loss(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean(jnp.square(jax_apply(params, x) - y))


def make_batches(steps: int, batch: int = 16, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(D_IN, D_OUT)).astype(np.float32)
    out = []
    for _ in range(steps):
        x = rng.normal(size=(batch, D_IN)).astype(np.float32)
        out.append((x, np.sin(x @ w).astype(np.float32)))
    return out


def hf_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """The two param groups HF's `Trainer.create_optimizer` builds (decay / no decay)."""
    from transformers import Trainer

    decay = set(Trainer.get_decay_parameter_names(None, model))
    named = list(model.named_parameters())
    return [
        {"params": [p for n, p in named if n in decay], "weight_decay": weight_decay},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
    ]


def run_torch(
    model: TorchMLP,
    optimizer: torch.optim.Optimizer,
    batches: list,
    max_grad_norm: float | None,
    scheduler=None,
) -> list[float]:
    """HF's inner loop: backward, clip_grad_norm_, optimizer.step(), scheduler.step(), zero_grad.

    Returns the pre-clip gradient norm of every step.
    """
    norms = []
    for x, y in batches:
        loss = torch.mean((model(torch.from_numpy(x)) - torch.from_numpy(y)) ** 2)
        loss.backward()
        if max_grad_norm:
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)))
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad()
    return norms


def run_jax(params: dict, opt: optax.GradientTransformation, batches: list) -> dict:
    """The same loop with jax.grad + the optax chain (jitted, as the Trainer's step is)."""
    state = opt.init(params)

    @jax.jit
    def step(params, state, x, y):
        grads = jax.grad(jax_loss)(params, x, y)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for x, y in batches:
        params, state = step(params, state, x, y)
    return params


def linear_warmup_decay(peak: float, warmup: int, total: int) -> Callable[[jax.Array], jax.Array]:
    """transformers' get_linear_schedule_with_warmup, as an optax schedule (step 0 = first update)."""

    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        up = count / max(1, warmup)
        down = jnp.maximum(0.0, (total - count) / max(1, total - warmup))
        return peak * jnp.where(count < warmup, up, down)

    return schedule


def max_abs_diff(jax_params: dict, model: TorchMLP) -> float:
    ref = jax_params_from_torch(model)
    diffs = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), jax_params, ref)
    return max(jax.tree.leaves(diffs))


def test_forward_parity() -> None:
    """Prerequisite of every parity test: both definitions compute the same loss."""
    torch.manual_seed(0)
    model = TorchMLP()
    x, y = make_batches(1)[0]
    with torch.no_grad():
        ref = float(torch.mean((model(torch.from_numpy(x)) - torch.from_numpy(y)) ** 2))
    got = float(jax_loss(jax_params_from_torch(model), x, y))
    # float32 on both sides; matmul summation order differs -> a few ulps of a O(1) loss.
    assert abs(got - ref) <= 1e-6 * max(1.0, abs(ref))


def regression_params(key: jax.Array, d_in: int = 16, hidden: int = 64, d_out: int = 4) -> dict:
    """Student/teacher MLP params: kernels, biases and a norm-like scale."""
    k = jax.random.split(key, 3)
    dense = lambda kk, a, b: {"kernel": jax.random.normal(kk, (a, b)) / np.sqrt(a), "bias": jnp.zeros(b)}  # noqa: E731
    return {
        "dense_0": dense(k[0], d_in, hidden),
        "norm": {"scale": jnp.ones(hidden)},
        "dense_1": dense(k[1], hidden, hidden),
        "head": dense(k[2], hidden, d_out),
    }


def regression_apply(params: dict, x: jax.Array) -> jax.Array:
    h = jnp.tanh(x @ params["dense_0"]["kernel"] + params["dense_0"]["bias"]) * params["norm"]["scale"]
    h = jnp.tanh(h @ params["dense_1"]["kernel"] + params["dense_1"]["bias"])
    return h @ params["head"]["kernel"] + params["head"]["bias"]


def _regression_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(256, 16)).astype(np.float32)
    with jax.ensure_compile_time_eval():
        y = regression_apply(regression_params(jax.random.key(2), hidden=32), jnp.asarray(x))
    return x, np.asarray(y)


_X, _Y = _regression_data()


def regression_loss(params: dict) -> jax.Array:
    """Full-batch MSE against a smaller random teacher MLP (fixed data, deterministic)."""
    return jnp.mean(jnp.square(regression_apply(params, _X) - _Y))


def train_regression(opt: optax.GradientTransformation, steps: int = 100) -> tuple[dict, np.ndarray, object]:
    """Jitted full-batch training; returns final params, per-step losses (before each update), state."""
    params = regression_params(jax.random.key(0))
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(regression_loss)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for _ in range(steps):
        params, state, loss = step(params, state)
        losses.append(loss)
    return params, np.asarray(jax.device_get(losses)), state
