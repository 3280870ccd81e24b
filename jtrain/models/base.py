"""`Model`: the boundary between Flax and the rest of jtrain.

Downstream code sees only plain functions of pytrees: `init(rng) -> params`,
`apply(params, batch, *, rng, train) -> outputs`, and `logical_axes()` (a pytree of
PartitionSpecs over logical names, shaped like params). Nothing outside `jtrain.models`
depends on Linen.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "segment_ids", "token_type_ids")


@dataclass(frozen=True)
class Model:
    """A Flax module with its config and task, exposed as pure functions.

    Example::

        model = create_model("llama", {"vocab_size": 256, "hidden_size": 64, ...})
        params = model.init(jax.random.key(0))
        logits = model.apply(params, {"input_ids": ids})["logits"]
    """

    module: nn.Module
    config: Any
    task: str = "causal_lm"
    input_names: tuple[str, ...] = MODEL_INPUTS

    def _dummy_inputs(self, batch: int = 1, length: int = 8) -> dict[str, jax.Array]:
        return {"input_ids": jnp.zeros((batch, length), jnp.int32)}

    def _boxed_init(self, rng: jax.Array) -> Any:
        return self.module.init({"params": rng}, **self._dummy_inputs())["params"]

    def init(self, rng: jax.Array) -> Any:
        """Fresh parameters (a plain nested dict of arrays), built by one compiled init.

        Compiled rather than eager: op-by-op init dispatches (and compiles) every initializer
        separately, which is far slower even for tiny models. Call it inside `jax.jit` with
        `out_shardings` to create params already sharded.
        """
        return jax.jit(lambda r: nn.unbox(self._boxed_init(r)))(rng)

    def abstract_params(self) -> Any:
        """Shapes and dtypes of the params, computed without allocating them."""
        return nn.unbox(self._abstract_boxed())

    def logical_axes(self) -> Any:
        """PartitionSpecs of logical axis names, one per parameter (same tree as params)."""
        return nn.get_partition_spec(self._abstract_boxed())

    def _abstract_boxed(self) -> Any:
        """The boxed params' shapes, traced once per Model: each trace is a trace of the whole model (0.2 s
        for a two-layer toy, seconds for a large one), and setting up a Trainer asks for the shapes and the
        axes several times. A Model is immutable (`with_options` makes a new one), so the shapes cannot go
        stale."""
        cached = self.__dict__.get("_abstract_boxed_params")
        if cached is None:
            cached = jax.eval_shape(self._boxed_init, jax.random.key(0))
            object.__setattr__(self, "_abstract_boxed_params", cached)
        return cached

    def apply(self, params: Any, batch: Mapping[str, jax.Array], *, rng: jax.Array | None = None,
              train: bool = False) -> dict[str, jax.Array]:
        """Forward pass on the model inputs found in `batch` (labels are ignored here)."""
        inputs = {k: batch[k] for k in self.input_names if k in batch}
        rngs = {"dropout": rng} if (rng is not None and train) else None
        return self.module.apply({"params": params}, **inputs, train=train, rngs=rngs)

    def with_options(self, **changes: Any) -> "Model":
        """Same weights, different execution options (compute dtype, remat policy, attention impl).

        `scan_layers` also changes the params layout (layers stacked on a leading axis): load
        with `from_pretrained(..., scan_layers=True)` rather than reusing unscanned params.
        """
        cfg = dataclasses.replace(self.config, **changes)
        return dataclasses.replace(self, module=type(self.module)(cfg), config=cfg)


def param_count(params: Any) -> int:
    return int(sum(x.size for x in jax.tree.leaves(params)))


def is_partition_spec(x: Any) -> bool:
    return isinstance(x, PartitionSpec)
