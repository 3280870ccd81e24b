"""`TrainState`: everything that changes from one update to the next, as one pytree.

It is the only argument (with the batch) of the compiled step and is donated to it. Values a
host callback may change at run time (the learning-rate factor of plateau schedules) live here
as arrays, so changing them never recompiles the step. Params that are not trained (a LoRA
base, frozen layers) live in `frozen`: passed to the step, never differentiated or optimised.
Under fp16, `loss_scale` holds the dynamic loss scale (`jtrain.precision.LossScale`).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jtrain.param_split import combine


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array  # int32 scalar: updates applied or skipped so far
    params: Any
    opt_state: Any
    rng: jax.Array  # typed PRNG key, split once per update
    lr_factor: jax.Array  # float32 scalar multiplying every update (1.0 unless a plateau lowers it)
    skipped: jax.Array  # int32 scalar: updates skipped because of non-finite values
    frozen: Any = None  # params outside the optimizer (see jtrain.param_split); None when all train
    loss_scale: Any = None  # jtrain.precision.LossScale under fp16 (dynamic loss scaling); None otherwise

    def full_params(self) -> Any:
        """The whole params tree the model applies (trainable and frozen parts combined)."""
        return combine(self.params, self.frozen)

    @classmethod
    def create(cls, params: Any, tx: optax.GradientTransformation, rng: jax.Array,
               frozen: Any = None, loss_scale: Any = None) -> TrainState:
        """Fresh state; call under `jax.jit` with out_shardings to create it already sharded.

        `params` are the trainable params only; `frozen` the rest of the tree, if any;
        `loss_scale` a `jtrain.precision.LossScale` to train with dynamic loss scaling (fp16)."""
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            rng=rng,
            lr_factor=jnp.ones((), jnp.float32),
            skipped=jnp.zeros((), jnp.int32),
            frozen=frozen,
            loss_scale=loss_scale,
        )
