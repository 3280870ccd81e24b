"""The compiled side of a run: sharded state creation and the jitted steps, built once.

Abstract first: shapes come from `jax.eval_shape`, shardings are derived from them, the state
is created already sharded by a jitted init (no full copy on one host), and every compilation
is counted with the shapes that caused it. Which axes are split comes from a rule preset
(`jtrain.sharding.ShardingRules`); every layout check (indivisible dimensions, batch rows, the
per-process share of rows) runs here, before anything is compiled.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import jax
import numpy as np
import optax
from jax.sharding import Mesh

from jtrain import host_buffers
from jtrain.models import cpu_gemm
from jtrain.models.base import Model
from jtrain.param_split import split_params
from jtrain.pipeline_parallel import with_pipeline_stages
from jtrain.precision import LossScale, PrecisionPolicy, with_compute_dtype
from jtrain.sharding import (ActivationSharding, ShardingRules, batch_sharding, check_batch_rows, check_process_layout,
                             describe_param_bytes, host_local_array_to_global, opt_state_shardings, param_shardings,
                             replicated)
from jtrain.state import TrainState
from jtrain.step import make_eval_step, make_train_step

logger = logging.getLogger(__name__)


@dataclass
class CompileLog:
    """Counts traces (one per compilation) of each step and the input shapes that caused them.

    `expected` bounds the compilations a step should need (the number of length buckets, or 1):
    one more is logged as a warning with the shapes, since every extra compile stalls training.
    """

    counts: dict[str, int] = field(default_factory=dict)
    shapes: dict[str, list] = field(default_factory=dict)
    batches: dict[str, list] = field(default_factory=dict)  # abstract batches (shape, dtype) per trace
    expected: dict[str, int] = field(default_factory=dict)

    def wrap(self, name: str, fn: Callable) -> Callable:
        def traced(*args: Any) -> Any:
            self.counts[name] = self.counts.get(name, 0) + 1
            batch_shapes = {k: tuple(v.shape) for k, v in args[-1].items()}
            self.shapes.setdefault(name, []).append(batch_shapes)
            self.batches.setdefault(name, []).append(
                {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in args[-1].items()})
            logger.info("compiling %s step #%d for batch shapes %s", name, self.counts[name], batch_shapes)
            limit = self.expected.get(name)
            if limit is not None and self.counts[name] > limit:
                logger.warning(
                    "the %s step compiled %d times, more than the %d expected (one per length bucket); shapes so "
                    "far: %s. Pad batches to a few fixed lengths (length_buckets, pad_to_multiple_of) and keep "
                    "dataloader_drop_last or static batch shapes to stop recompiling", name, self.counts[name],
                    limit, self.shapes[name])
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
    abstract_state: Any = None  # TrainState of ShapeDtypeStructs carrying the state's shardings
    precision: PrecisionPolicy = field(default_factory=PrecisionPolicy)
    probe_train_step: Callable | None = None  # the train step jitted apart: memory probes of other batches

    def abstract_train_batch(self, host_batch: dict[str, np.ndarray], rows: int | None = None) -> dict:
        """What `place_train_batch(host_batch)` will give, as shapes, dtypes and shardings only.

        `rows` replaces the global rows per micro-batch (to plan another batch size)."""
        sharding = batch_sharding(self.mesh, leading_micro_axis=True)
        out = {k: _abstract(v, sharding, row_axis=1) for k, v in host_batch.items()}
        if rows is not None:
            out = {k: jax.ShapeDtypeStruct((v.shape[0], rows) + v.shape[2:], v.dtype, sharding=sharding)
                   for k, v in out.items()}
        return out

    def compile_train(self, abstract_batch: dict) -> Any:
        """Lower and compile the train step on abstract inputs (no data, no allocated state).

        jit keeps the executable in its cache, so the first real step with these shapes and
        shardings runs it without tracing or compiling again."""
        return self.train_step.lower(self.abstract_state, abstract_batch).compile()

    def compile_eval(self, params: Any, abstract_batch: dict) -> Any:
        """The eval step's executable for `abstract_batch` (from jit's cache after a first call)."""
        sharding = batch_sharding(self.mesh, leading_micro_axis=False)
        batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding) for k, v in abstract_batch.items()}
        return self.eval_step.lower(params, batch).compile()

    def place_train_batch(self, batch: dict[str, np.ndarray]) -> dict:
        """This process's rows [k, b_local, ...] -> a global [k, b, ...] array, rows over data x fsdp."""
        rows = _rows(batch, axis=1) * jax.process_count()
        check_batch_rows(rows, self.mesh, what="training micro-batch")
        return host_local_array_to_global(batch, batch_sharding(self.mesh, leading_micro_axis=True), row_axis=1)

    def place_eval_batch(self, batch: dict[str, np.ndarray]) -> dict:
        rows = _rows(batch, axis=0) * jax.process_count()
        check_batch_rows(rows, self.mesh, what="evaluation batch")
        return host_local_array_to_global(batch, batch_sharding(self.mesh, leading_micro_axis=False), row_axis=0)


def _abstract(value: np.ndarray, sharding: Any, row_axis: int) -> jax.ShapeDtypeStruct:
    shape = list(np.shape(value))
    shape[row_axis] *= jax.process_count()
    return jax.ShapeDtypeStruct(tuple(shape), jax.dtypes.canonicalize_dtype(np.asarray(value).dtype), sharding=sharding)


def use_compilation_cache(path: str | None) -> None:
    """Point JAX's persistent compilation cache at `path` (`compilation_cache_dir`).

    Every compiled program (not only slow ones) is stored, so a second identical run loads its
    executables instead of compiling. The cache is process-wide; it is re-initialised when the
    directory changes, so a Trainer created after other JAX work still uses its own directory.
    """
    if not path:
        return
    from jax.experimental.compilation_cache import compilation_cache as cc

    path = os.path.abspath(os.path.expanduser(path))
    if jax.config.jax_compilation_cache_dir != path:
        os.makedirs(path, exist_ok=True)
        cc.set_cache_dir(path)
        cc.reset_cache()
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _rows(batch: dict[str, np.ndarray], axis: int) -> int:
    return int(np.shape(next(iter(batch.values())))[axis])


def constrain_gradients(tx: optax.GradientTransformation, shardings: Any) -> optax.GradientTransformation:
    """`tx` whose incoming gradients are first pinned to `shardings` (the optimizer state's layout).

    ZeRO-2 keeps params replicated but the optimizer state sharded; pinning the gradients to the
    state's layout lets XLA reduce-scatter them instead of all-reducing full copies. The state
    and its tree are `tx`'s own, so `optax.tree_map_params` still sees through this wrapper; extra
    arguments (the train step's `grad_norm`) pass through.
    """
    inner = optax.with_extra_args_support(tx)

    def update(updates: Any, state: Any, params: Any = None, **extra_args: Any) -> tuple[Any, Any]:
        return inner.update(jax.lax.with_sharding_constraint(updates, shardings), state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(tx.init, update)


def _split(tree: Any, trainable: Callable[[tuple[str, ...]], bool]) -> tuple[Any, Any]:
    """(trainable, frozen) parts; frozen is None when nothing is frozen (the common case)."""
    train_part, frozen_part = split_params(tree, trainable)
    return train_part, (frozen_part or None)


def with_activation_sharding(model: Model, mesh: Mesh, rules: ShardingRules) -> Model:
    """The model with activation constraints, if its config has the option (else GSPMD propagates),
    and as many pipeline stages as the mesh's `stage` axis has devices (`jtrain.pipeline_parallel`)."""
    model = with_pipeline_stages(model, mesh)
    if mesh.size == 1 or not hasattr(model.config, "activation_sharding"):
        return model
    return model.with_options(activation_sharding=ActivationSharding(mesh, rules.activations))


def build_compiled_steps(model: Model, mesh: Mesh, tx: optax.GradientTransformation, schedule: Any,
                         loss_fn: Callable, *, seed: int, prediction_fn: Callable | None = None,
                         rules: ShardingRules | None = None, precision: PrecisionPolicy | None = None,
                         expected_train_compiles: int | None = None,
                         label_names: Sequence[str] = ("labels",)) -> CompiledSteps:
    """Derive every sharding from abstract shapes and jit the steps with donated state.

    `rules` is the preset (`jtrain.sharding.sharding_rules(args.fsdp)`); the default table
    shards weights over fsdp and heads/MLP/vocab over tensor, so the mesh alone decides.
    `precision` (`jtrain.precision.policy_from_args`) sets the compute dtypes: params and
    optimizer state stay float32, the model runs in the half type, fp16 adds a loss scale.
    `expected_train_compiles` (the number of length buckets) bounds train compiles before a warning.
    `prediction_fn(outputs, batch)` makes the predict step's `predictions` (default: the logits).
    `label_names` (HF's `args.label_names`): the batch keys without which eval and predict compute no loss.
    """
    precision = precision or PrecisionPolicy()
    rules = rules or ShardingRules()
    check_process_layout(mesh)
    getattr(model, "check_mesh", lambda mesh: None)(mesh)  # model-specific layout checks (MoE experts)
    if mesh.devices.flat[0].platform == "cpu":
        host_buffers.install()  # each step's scratch buffer stays mapped for the next one
    abstract_params = model.abstract_params()
    logical = model.logical_axes()
    p_sh = param_shardings(logical, abstract_params, mesh, rules.params)
    logger.info("%s", describe_param_bytes(p_sh, abstract_params, mesh))
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
    new_scale = (lambda: LossScale.create()) if precision.loss_scaling else (lambda: None)
    abstract_state = jax.eval_shape(lambda p: TrainState.create(p, tx, rng), train_params)
    o_sh = opt_state_shardings(abstract_state.opt_state, train_zero_sh, train_params, mesh)
    scale_sh = jax.tree.map(lambda _: rep, new_scale())
    s_sh = TrainState(step=rep, params=train_sh, opt_state=o_sh, rng=rep, lr_factor=rep, skipped=rep,
                      frozen=frozen_sh, loss_scale=scale_sh)
    _, frozen_params = split(abstract_params)
    shapes = jax.eval_shape(lambda p, f: TrainState.create(p, tx, rng, frozen=f, loss_scale=new_scale()),
                            train_params, frozen_params)
    abstract_state = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), shapes, s_sh)

    def init_state(params: Any = None) -> TrainState:
        """Fresh state from `params` (the full tree) or a seeded init, created already sharded."""
        init_rng, state_rng = jax.random.split(rng)
        if params is None:
            params = jax.jit(model.init, out_shardings=p_sh)(init_rng)
        else:
            params = jax.device_put(params, p_sh)
        train_part, frozen_part = split(params)
        create = jax.jit(lambda p, f: TrainState.create(p, tx, state_rng, frozen=f, loss_scale=new_scale()),
                         out_shardings=s_sh)
        return create(train_part, frozen_part)

    log = CompileLog(expected={"train": expected_train_compiles} if expected_train_compiles else {})
    on_mesh = functools.partial(cpu_gemm.traced_on, mesh.devices.size == 1)  # the CPU GEMM library: one device only
    run_model = with_activation_sharding(model, mesh, rules)
    train_model = with_compute_dtype(run_model, precision.compute_dtype)
    eval_model = with_compute_dtype(run_model, precision.eval_dtype)
    eval_param_dtype = precision.eval_dtype if precision.cast_eval_params else None
    train = make_train_step(train_model.apply, loss_fn, tx, lr_schedule=schedule,
                            matmul_precision=precision.matmul_precision)
    eval_step = functools.partial(make_eval_step, eval_model.apply, loss_fn, param_dtype=eval_param_dtype,
                                  matmul_precision=precision.matmul_precision, label_names=label_names)
    evaluate, predict = eval_step(), eval_step(predictions_fn=prediction_fn or (lambda out, batch: out["logits"]))

    return CompiledSteps(
        mesh=mesh, state_sharding=s_sh, param_sharding=p_sh,
        train_step=jax.jit(log.wrap("train", on_mesh(train)), out_shardings=(s_sh, rep), donate_argnums=0),
        probe_train_step=jax.jit(log.wrap("train_probe", on_mesh(train)), out_shardings=(s_sh, rep), donate_argnums=0),
        eval_step=jax.jit(log.wrap("eval", on_mesh(evaluate)), out_shardings=rep),
        predict_step=jax.jit(log.wrap("predict", on_mesh(predict))),
        init_state=init_state, compile_log=log, abstract_state=abstract_state, precision=precision,
    )
