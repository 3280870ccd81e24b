"""The compiled side of a run: sharded state creation and the jitted steps, built once.

Abstract first: shapes come from `jax.eval_shape`, shardings are derived from them, the state
is created already sharded by a jitted init (no full copy on one host), and every compilation
is counted with the shapes that caused it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from jtrain.models.base import Model
from jtrain.sharding import (batch_sharding, host_local_array_to_global, opt_state_shardings, param_shardings,
                             replicated)
from jtrain.state import TrainState
from jtrain.step import make_eval_step, make_train_step

logger = logging.getLogger(__name__)


@dataclass
class CompileLog:
    """Counts traces (one per compilation) of each step and the input shapes that caused them."""

    counts: dict[str, int] = field(default_factory=dict)
    shapes: dict[str, list] = field(default_factory=dict)

    def wrap(self, name: str, fn: Callable) -> Callable:
        def traced(*args: Any) -> Any:
            self.counts[name] = self.counts.get(name, 0) + 1
            batch_shapes = {k: tuple(v.shape) for k, v in args[-1].items()}
            self.shapes.setdefault(name, []).append(batch_shapes)
            logger.info("compiling %s step #%d for batch shapes %s", name, self.counts[name], batch_shapes)
            return fn(*args)

        return traced


@dataclass
class CompiledSteps:
    mesh: Mesh
    state_sharding: Any
    param_sharding: Any
    train_step: Callable
    eval_step: Callable
    predict_step: Callable
    init_state: Callable[[Any], TrainState]
    compile_log: CompileLog

    def place_train_batch(self, batch: dict[str, np.ndarray]) -> dict:
        return host_local_array_to_global(batch, batch_sharding(self.mesh, leading_micro_axis=True))

    def place_eval_batch(self, batch: dict[str, np.ndarray]) -> dict:
        return host_local_array_to_global(batch, batch_sharding(self.mesh, leading_micro_axis=False))


def build_compiled_steps(model: Model, mesh: Mesh, tx: optax.GradientTransformation, schedule: Any,
                         loss_fn: Callable, *, seed: int,
                         preprocess_logits: Callable | None = None) -> CompiledSteps:
    """Derive every sharding from abstract shapes and jit the steps with donated state."""
    abstract_params = model.abstract_params()
    p_sh = param_shardings(model.logical_axes(), abstract_params, mesh)
    rep = replicated(mesh)
    rng = jax.random.key(seed)
    abstract_state = jax.eval_shape(lambda p: TrainState.create(p, tx, rng), abstract_params)
    o_sh = opt_state_shardings(tx, abstract_state.opt_state, p_sh, abstract_params, mesh)
    s_sh = TrainState(step=rep, params=p_sh, opt_state=o_sh, rng=rep, lr_factor=rep, skipped=rep)

    def init_state(params: Any = None) -> TrainState:
        init_rng, state_rng = jax.random.split(rng)
        if params is None:
            params = jax.jit(model.init, out_shardings=p_sh)(init_rng)
        else:
            params = jax.device_put(params, p_sh)
        create = jax.jit(lambda p: TrainState.create(p, tx, state_rng), out_shardings=s_sh)
        return create(params)

    log = CompileLog()
    train = make_train_step(model.apply, loss_fn, tx, lr_schedule=schedule)
    evaluate = make_eval_step(model.apply, loss_fn)

    def predict(params: Any, batch: dict) -> dict:
        logits = model.apply(params, batch, rng=None, train=False)["logits"]
        if preprocess_logits is not None:
            logits = preprocess_logits(logits, batch.get("labels"))
        return {"predictions": logits, **evaluate(params, batch)}

    return CompiledSteps(
        mesh=mesh, state_sharding=s_sh, param_sharding=p_sh,
        train_step=jax.jit(log.wrap("train", train), out_shardings=(s_sh, rep), donate_argnums=0),
        eval_step=jax.jit(log.wrap("eval", evaluate), out_shardings=rep),
        predict_step=jax.jit(log.wrap("predict", predict)),
        init_state=init_state, compile_log=log,
    )
