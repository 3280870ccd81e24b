"""`TrainState`: everything that changes from one update to the next, as one pytree.

It is the only argument (with the batch) of the compiled step and is donated to it. Values a
host callback may change at run time (the learning-rate factor of plateau schedules) live here
as arrays, so changing them never recompiles the step.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array  # int32 scalar: updates applied or skipped so far
    params: Any
    opt_state: Any
    rng: jax.Array  # typed PRNG key, split once per update
    lr_factor: jax.Array  # float32 scalar multiplying every update (1.0 unless a plateau lowers it)
    skipped: jax.Array  # int32 scalar: updates skipped because of non-finite values

    @classmethod
    def create(cls, params: Any, tx: optax.GradientTransformation, rng: jax.Array) -> "TrainState":
        """Fresh state; call under `jax.jit` with out_shardings to create it already sharded."""
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            rng=rng,
            lr_factor=jnp.ones((), jnp.float32),
            skipped=jnp.zeros((), jnp.int32),
        )
