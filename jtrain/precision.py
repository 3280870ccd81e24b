"""Mixed precision: HF's `bf16` / `fp16` / `*_full_eval` / `tf32` flags as one static policy.

Parameters and optimizer state stay float32 (the master copy); the model computes in the half
type (`Model.with_options(dtype=...)`), and logits and the loss are float32 (every jtrain model
casts its logits up). float16 has a narrow exponent range, so small gradients underflow to zero
unless the loss is multiplied by a large factor before differentiation: `fp16` carries a
dynamic `LossScale` in the `TrainState`, as torch's `GradScaler` does (start at 2**16, halve and
skip the update on overflow, double after 2000 good steps in a row).

Overflow versus divergence. Under fp16 an infinite gradient is expected now and then: it is
how the scale finds its ceiling, so the step skips the update, halves the scale and reports
`overflow` (not `nonfinite`), and `nonfinite_policy="error"` does not stop the run. A run that
has genuinely diverged is still caught: the step reports `nonfinite` when the loss itself is
not finite (the forward pass blew up, which no scale causes or cures), or when the gradients
overflow although the scale is already at its floor (`min_scale`, 1.0): scaling can no longer
be the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from jtrain.errors import ConfigError

# HF's tf32 flag -> JAX's default matmul precision (None leaves JAX's default alone).
_TF32_PRECISION = {True: "tensorfloat32", False: "highest"}


class LossScale(flax.struct.PyTreeNode):
    """Dynamic loss-scale state (part of `TrainState.loss_scale`, saved in checkpoints)."""

    scale: jax.Array  # float32 scalar multiplying the summed loss before differentiation
    good_steps: jax.Array  # int32 scalar: finite updates since the scale last changed
    overflows: jax.Array  # int32 scalar: updates skipped because the scaled gradients overflowed
    growth_interval: int = flax.struct.field(pytree_node=False, default=2000)
    min_scale: float = flax.struct.field(pytree_node=False, default=1.0)

    @classmethod
    def create(cls, init_scale: float = 2.0 ** 16, growth_interval: int = 2000, min_scale: float = 1.0) -> LossScale:
        """torch.cuda.amp.GradScaler's defaults: init 2**16, growth x2 every 2000 good steps."""
        return cls(scale=jnp.asarray(init_scale, jnp.float32), good_steps=jnp.zeros((), jnp.int32),
                   overflows=jnp.zeros((), jnp.int32), growth_interval=growth_interval, min_scale=min_scale)

    def update(self, grads_finite: jax.Array) -> LossScale:
        """Halve (not below `min_scale`) after an overflow; double after `growth_interval` good steps."""
        grown = self.good_steps + 1 >= self.growth_interval
        scale = jnp.where(grads_finite, jnp.where(grown, self.scale * 2.0, self.scale),
                          jnp.maximum(self.scale * 0.5, self.min_scale))
        good = jnp.where(grads_finite & ~grown, self.good_steps + 1, 0)
        return self.replace(scale=scale.astype(jnp.float32), good_steps=good.astype(jnp.int32),
                            overflows=self.overflows + (~grads_finite).astype(jnp.int32))


@dataclass(frozen=True)
class PrecisionPolicy:
    """Static dtypes of a run, bound into the compiled steps (never read from the config there).

    `compute_dtype`: dtype of the model's activations and matmuls in training; `eval_dtype`: the
    same for eval/predict; `cast_eval_params`: eval params are cast to `eval_dtype` as well (HF's
    `*_full_eval`, which casts the whole model); `loss_scaling`: dynamic loss scaling (fp16);
    `matmul_precision`: JAX's default matmul precision inside the steps (HF's `tf32`).
    """

    compute_dtype: str = "float32"
    eval_dtype: str = "float32"
    cast_eval_params: bool = False
    loss_scaling: bool = False
    matmul_precision: str | None = None

    @property
    def is_mixed(self) -> bool:
        return self.compute_dtype != "float32" or self.eval_dtype != "float32"


def policy_from_args(args: Any) -> PrecisionPolicy:
    """The policy for HF's flags: bf16/fp16 train in the half type; *_full_eval also casts eval params.

    As HF (autocast), evaluation after bf16/fp16 training computes in the same half type even
    without `*_full_eval`; the flags additionally cast the parameters themselves.
    """
    if args.bf16_full_eval and args.fp16_full_eval:
        raise ConfigError("`bf16_full_eval` and `fp16_full_eval` are both set: choose one")
    compute = "bfloat16" if args.bf16 else "float16" if args.fp16 else "float32"
    full_eval = "bfloat16" if args.bf16_full_eval else "float16" if args.fp16_full_eval else None
    return PrecisionPolicy(compute_dtype=compute, eval_dtype=full_eval or compute,
                           cast_eval_params=full_eval is not None, loss_scaling=bool(args.fp16),
                           matmul_precision=_TF32_PRECISION.get(args.tf32))


def with_compute_dtype(model: Any, dtype: str) -> Any:
    """`model` computing in `dtype` (its params keep their float32 dtype); refuses models without the option."""
    config = getattr(model, "config", None)
    if str(jnp.dtype(getattr(config, "dtype", "float32"))) == dtype:
        return model
    if not hasattr(config, "dtype"):
        raise ConfigError(f"bf16/fp16 need a model whose config has a `dtype` option; {type(model).__name__} has "
                          "none: remove bf16/fp16/*_full_eval from the training arguments")
    return model.with_options(dtype=dtype)


def cast_floating(tree: Any, dtype: str) -> Any:
    """Floating leaves of `tree` cast to `dtype` (integer leaves such as quantized weights kept)."""
    target = jnp.dtype(dtype)
    return jax.tree.map(lambda x: x.astype(target) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def all_finite(tree: Any) -> jax.Array:
    """One boolean: every element of every leaf is finite."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)
