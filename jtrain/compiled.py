"""The compiled side of a run: sharded state creation and the jitted steps, built once.

Abstract first: shapes come from `jax.eval_shape`, shardings are derived from them, the state
is created already sharded by a jitted init (no full copy on one host), and every compilation
is counted with the shapes that caused it. Which axes are split comes from a rule preset
(`jtrain.sharding.ShardingRules`); every layout check (indivisible dimensions, batch rows, the
per-process share of rows) runs here, before anything is compiled.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import numpy as np
import optax
from jax.sharding import Mesh

from jtrain.models.base import Model
from jtrain.param_split import split_params
from jtrain.sharding import (ActivationSharding, ShardingRules, batch_sharding, check_batch_rows,
                             check_process_layout, host_local_array_to_global, opt_state_shardings,
                             param_shardings, replicated)
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
        """This process's rows [k, b_local, ...] -> a global [k, b, ...] array, rows over data x fsdp."""
        rows = _rows(batch, axis=1) * jax.process_count()
        check_batch_rows(rows, self.mesh, what="training micro-batch")
        return host_local_array_to_global(batch, batch_sharding(self.mesh, leading_micro_axis=True), row_axis=1)

    def place_eval_batch(self, batch: dict[str, np.ndarray]) -> dict:
        rows = _rows(batch, axis=0) * jax.process_count()
        check_batch_rows(rows, self.mesh, what="evaluation batch")
        return host_local_array_to_global(batch, batch_sharding(self.mesh, leading_micro_axis=False), row_axis=0)


def _rows(batch: dict[str, np.ndarray], axis: int) -> int:
    return int(np.shape(next(iter(batch.values())))[axis])


def constrain_gradients(tx: optax.GradientTransformation, shardings: Any) -> optax.GradientTransformation:
    """`tx` whose incoming gradients are first pinned to `shardings` (the optimizer state's layout).

    ZeRO-2 keeps params replicated but the optimizer state sharded; pinning the gradients to the
    state's layout lets XLA reduce-scatter them instead of all-reducing full copies. The state
    and its tree are `tx`'s own, so `optax.tree_map_params` still sees through this wrapper.
    """

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        return tx.update(jax.lax.with_sharding_constraint(updates, shardings), state, params)

    return optax.GradientTransformation(tx.init, update)


def _split(tree: Any, trainable: Callable[[tuple[str, ...]], bool]) -> tuple[Any, Any]:
    """(trainable, frozen) parts; frozen is None when nothing is frozen (the common case)."""
    train_part, frozen_part = split_params(tree, trainable)
    return train_part, (frozen_part or None)


def with_activation_sharding(model: Model, mesh: Mesh, rules: ShardingRules) -> Model:
    """The model with activation constraints, if its config has the option (else GSPMD propagates)."""
    if mesh.size == 1 or not hasattr(model.config, "activation_sharding"):
        return model
    return model.with_options(activation_sharding=ActivationSharding(mesh, rules.activations))


def build_compiled_steps(model: Model, mesh: Mesh, tx: optax.GradientTransformation, schedule: Any,
                         loss_fn: Callable, *, seed: int, preprocess_logits: Callable | None = None,
                         rules: ShardingRules | None = None) -> CompiledSteps:
    """Derive every sharding from abstract shapes and jit the steps with donated state.

    `rules` is the preset (`jtrain.sharding.sharding_rules(args.fsdp)`); the default table
    shards weights over fsdp and heads/MLP/vocab over tensor, so the mesh alone decides.
    """
    rules = rules or ShardingRules()
    check_process_layout(mesh)
    abstract_params = model.abstract_params()
    logical = model.logical_axes()
    p_sh = param_shardings(logical, abstract_params, mesh, rules.params)
    zero_sh = p_sh if rules.opt_state == rules.params else param_shardings(logical, abstract_params, mesh,
                                                                           rules.opt_state)
    rep = replicated(mesh)
    rng = jax.random.key(seed)
    trainable = getattr(model, "is_trainable", None)
    split = (lambda tree: (tree, None)) if trainable is None else (lambda tree: _split(tree, trainable))
    train_params, _ = split(abstract_params)
    train_sh, frozen_sh = split(p_sh)
    train_zero_sh, _ = split(zero_sh)
    if zero_sh is not p_sh:
        tx = constrain_gradients(tx, train_zero_sh)
    abstract_state = jax.eval_shape(lambda p: TrainState.create(p, tx, rng), train_params)
    o_sh = opt_state_shardings(tx, abstract_state.opt_state, train_zero_sh, train_params, mesh)
    s_sh = TrainState(step=rep, params=train_sh, opt_state=o_sh, rng=rep, lr_factor=rep, skipped=rep,
                      frozen=frozen_sh)

    def init_state(params: Any = None) -> TrainState:
        """Fresh state from `params` (the full tree) or a seeded init, created already sharded."""
        init_rng, state_rng = jax.random.split(rng)
        if params is None:
            params = jax.jit(model.init, out_shardings=p_sh)(init_rng)
        else:
            params = jax.device_put(params, p_sh)
        train_part, frozen_part = split(params)
        create = jax.jit(lambda p, f: TrainState.create(p, tx, state_rng, frozen=f), out_shardings=s_sh)
        return create(train_part, frozen_part)

    log = CompileLog()
    run_model = with_activation_sharding(model, mesh, rules)
    train = make_train_step(run_model.apply, loss_fn, tx, lr_schedule=schedule)
    evaluate = make_eval_step(run_model.apply, loss_fn)

    def predict(params: Any, batch: dict) -> dict:
        logits = run_model.apply(params, batch, rng=None, train=False)["logits"]
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
