"""AdamW as one pass per parameter on the CPU: the update `make_optimizer("adamw_torch", ...)`
describes, run by a custom call (`cpu_adamw.cc`) instead of optax's chain.

Why: XLA:CPU turns clip -> AdamW -> apply into four loops per parameter (the clipped gradient,
each moment, the parameter) that read 8 and write 4 floats per parameter; the kernel reads the
parameter, its gradient sum and both moments once and writes the three it updates in place (28
bytes instead of 48). The pass is bound by memory bandwidth, so that is the optimizer's share of
the step cut by about 40% (benchmarks/TRIED.md). PyTorch's `adamw_torch_fused`, which HF's
Trainer uses by default, is the same idea.

What it computes: exactly what the optax chain does, in one expression per element: the gradient
sum divided by the token count and scaled by torch's clip coefficient, optax's `scale_by_adam`
moments and bias corrections, decoupled weight decay where `decay_mask` applies it, the
schedule's learning rate times the Trainer's `lr_factor`. The state it reads and returns is the
chain's own (`ScaleByAdamState`, the schedule's count), so checkpoints, resume and any code
reading the optimizer state see no difference. Results equal the chain's to float32 rounding
(the kernel may contract a multiply and an add into one FMA).

When (`applies`): the chain came from `make_optimizer` with an AdamW name (it records what the
pass needs, `spec_of`), the step runs on the CPU backend on one device, every parameter,
gradient and moment is float32, and the kernel builds (`g++`). `JTRAIN_CPU_FUSED_ADAMW=off`
keeps optax's chain. Anything else (a user's own optax chain, ZeRO's wrapped optimizer, several
devices, accelerators, bf16 moments) takes the chain as before.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import logging
import os
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jtrain import native
from jtrain.errors import ConfigError
from jtrain.optim.decay_mask import decay_mask
from jtrain.optim.transforms import clip_coefficient

logger = logging.getLogger(__name__)

ENV = "JTRAIN_CPU_FUSED_ADAMW"
TARGET = "jtrain_cpu_adamw"
_SOURCE = Path(__file__).with_name("cpu_adamw.cc")


@dataclasses.dataclass(frozen=True)
class AdamWSpec:
    """What the fused pass needs to know about a `make_optimizer` AdamW chain."""

    b1: float
    b2: float
    eps: float
    weight_decay: float
    learning_rate: float | Callable[[jax.Array], jax.Array]
    max_grad_norm: float | None  # None: the chain does not clip


# chain.update -> its spec. Keyed by the update function (optax transformations are tuples, which
# cannot be weakly referenced), so a wrapped chain (ZeRO's `constrain_gradients`) is not found.
_SPECS: weakref.WeakKeyDictionary[Callable, AdamWSpec] = weakref.WeakKeyDictionary()


def register(tx: optax.GradientTransformation, spec: AdamWSpec) -> optax.GradientTransformation:
    """Record that `tx` is the AdamW chain `spec` describes; returns `tx`."""
    _SPECS[tx.update] = spec
    return tx


def spec_of(tx: optax.GradientTransformation) -> AdamWSpec | None:
    """The spec `register` recorded for `tx`, or None."""
    try:
        return _SPECS.get(tx.update)
    except TypeError:  # an update that cannot be weakly referenced was never registered
        return None


def mode() -> str:
    """The `JTRAIN_CPU_FUSED_ADAMW` setting, checked."""
    return native.env_setting(ENV, ("auto", "off"))


@functools.cache
def _built() -> str | None:
    """Build and register the kernel (once per process); None, or why that failed (logged once)."""
    try:
        path = native.build_library(_SOURCE, TARGET, [f"-I{jax.ffi.include_dir()}", "-fno-math-errno"],
                                    without_compiler=f"set {ENV}=off")
        lib = ctypes.CDLL(str(path))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.JtrainCpuAdamW), platform="cpu")
    except (ConfigError, OSError) as err:
        logger.info("AdamW stays on optax's chain: %s", err)
        return str(err)
    return None


def _state_nodes(opt_state: Any) -> tuple[list[Any], Any]:
    """The optimizer state's leaves, with optax's Adam and schedule states kept whole, and its treedef."""
    return jax.tree.flatten(opt_state, is_leaf=lambda x: isinstance(x, (optax.ScaleByAdamState,
                                                                          optax.ScaleByScheduleState)))


def applies(spec: AdamWSpec | None, params: Any, grads: Any, opt_state: Any, single_device: bool) -> bool:
    """Whether the fused pass should run this update (see the module docstring)."""
    if spec is None or mode() != "auto" or jax.default_backend() != "cpu" or not single_device:
        return False
    nodes, _ = _state_nodes(opt_state)
    adam = [n for n in nodes if isinstance(n, optax.ScaleByAdamState)]
    schedules = [n for n in nodes if isinstance(n, optax.ScaleByScheduleState)]
    if len(adam) != 1 or len(schedules) != int(callable(spec.learning_rate)):
        return False
    structure = jax.tree.structure(params)
    trees = (params, grads, adam[0].mu, adam[0].nu)
    if any(jax.tree.structure(t) != structure for t in trees):
        return False
    if any(x.dtype != jnp.float32 for t in trees for x in jax.tree.leaves(t)):
        return False
    return _built() is None


def update(spec: AdamWSpec, grad_sums: Any, grad_denom: jax.Array, grad_norm: jax.Array, params: Any,
           opt_state: Any, lr_factor: jax.Array) -> tuple[Any, Any]:
    """New (params, opt_state) of one AdamW step from the gradient sums, in one custom call.

    `grad_denom` divides the sums into the mean gradient and `grad_norm` is that mean's global
    norm (the train step has both); the result is what `optax.apply_updates(params, updates *
    lr_factor)` gives for the chain's updates."""
    nodes, state_def = _state_nodes(opt_state)
    adam = next(n for n in nodes if isinstance(n, optax.ScaleByAdamState))
    count = optax.safe_increment(adam.count)
    if callable(spec.learning_rate):
        schedule = next(n for n in nodes if isinstance(n, optax.ScaleByScheduleState))
        lr = jnp.asarray(spec.learning_rate(schedule.count), jnp.float32)
    else:
        lr = jnp.float32(spec.learning_rate)
    coef = 1.0 if spec.max_grad_norm is None else clip_coefficient(grad_norm, spec.max_grad_norm)
    scalars = jnp.stack([
        jnp.asarray(coef / grad_denom, jnp.float32),
        1.0 / (1.0 - spec.b1 ** count.astype(jnp.float32)),
        1.0 / (1.0 - spec.b2 ** count.astype(jnp.float32)),
        lr * lr_factor.astype(jnp.float32),
    ]).astype(jnp.float32)

    p_leaves, p_def = jax.tree.flatten(params)
    operands = [scalars]
    for leaves in zip(p_leaves, jax.tree.leaves(grad_sums), jax.tree.leaves(adam.mu), jax.tree.leaves(adam.nu)):
        operands.extend(leaves)
    n = len(p_leaves)
    results = [jax.ShapeDtypeStruct(p.shape, p.dtype) for p in p_leaves for _ in range(3)]
    aliases = {1 + 4 * i + src: 3 * i + dst for i in range(n) for src, dst in ((0, 0), (2, 1), (3, 2))}
    decay = np.array([spec.weight_decay if d else 0.0 for d in jax.tree.leaves(decay_mask(params))], np.float32)
    call = jax.ffi.ffi_call(TARGET, results, input_output_aliases=aliases)
    # 1 - b in double, then float32, as optax's Python-float constants are (1.0f - float32(b) differs by 1e-5)
    out = call(*operands, b1=np.float32(spec.b1), b2=np.float32(spec.b2), c1=np.float32(1.0 - spec.b1),
               c2=np.float32(1.0 - spec.b2), eps=np.float32(spec.eps), decay=decay,
               threads=np.int64(len(os.sched_getaffinity(0))))
    new_params = jax.tree.unflatten(p_def, out[0::3])
    new_adam = adam._replace(count=count, mu=jax.tree.unflatten(p_def, out[1::3]),
                             nu=jax.tree.unflatten(p_def, out[2::3]))

    def advance(node: Any) -> Any:
        if isinstance(node, optax.ScaleByAdamState):
            return new_adam
        if isinstance(node, optax.ScaleByScheduleState):
            return node._replace(count=optax.safe_increment(node.count))
        return node

    return new_params, jax.tree.unflatten(state_def, [advance(node) for node in nodes])
