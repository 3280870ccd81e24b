"""NEFTune (`neftune_noise_alpha`): uniform noise on the input token embeddings, in training only.

HF's `neftune_post_forward_hook` adds `Uniform(-m, m)` noise with `m = alpha / sqrt(L * d)` (L the
padded sequence length, d the hidden size) to the output of the model's input embedding module
whenever the module is in training mode. Here the same happens through
`flax.linen.intercept_methods` around the token embedding's `__call__` (llama `embed_tokens`,
gpt2 `wte`, bert `word_embeddings`; on a mesh the table is read directly and reports through
`TokenEmbeddingOutput`): position embeddings and a tied head's `attend` are untouched. The noise
comes from the `dropout` rng stream, so it is a pure function of the step's rng and the same
on every mesh. Evaluation and prediction (`train=False`) see no noise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jtrain.errors import ConfigError

TOKEN_EMBEDDING_NAMES = ("embed_tokens", "wte", "word_embeddings")


def neftune_magnitude(alpha: float, length: int, hidden: int) -> float:
    """HF's bound: alpha / sqrt(L * d)."""
    return alpha / math.sqrt(length * hidden)


def _is_token_embedding(module: nn.Module, method_name: str) -> bool:
    if method_name != "__call__":
        return False
    if isinstance(module, nn.Embed):
        return module.name in TOKEN_EMBEDDING_NAMES
    from jtrain.models.layers import TokenEmbeddingOutput

    return isinstance(module, TokenEmbeddingOutput)


def neftune_interceptor(alpha: float):
    """A Linen method interceptor adding NEFTune noise to the token embeddings' output [B, L, D]."""

    def intercept(next_fun: Any, args: tuple, kwargs: dict, context: nn.module.InterceptorContext) -> Any:
        out = next_fun(*args, **kwargs)
        if not _is_token_embedding(context.module, context.method_name):
            return out
        magnitude = neftune_magnitude(alpha, out.shape[-2], out.shape[-1])
        rng = context.module.make_rng("dropout")
        noise = jax.random.uniform(rng, out.shape, jnp.float32, -magnitude, magnitude)
        return (out.astype(jnp.float32) + noise).astype(out.dtype)

    return intercept


class NEFTuneModel:
    """`model` whose training forward adds NEFTune noise; every other attribute is the model's own.

    Example::

        noisy = NEFTuneModel.wrap(model, alpha=5.0)
        out = noisy.apply(params, batch, rng=jax.random.key(0), train=True)
    """

    def __init__(self, model: Any, alpha: float):
        self.inner, self.alpha = model, float(alpha)

    @classmethod
    def wrap(cls, model: Any, alpha: float) -> NEFTuneModel:
        if not alpha > 0 or not math.isfinite(alpha):
            raise ConfigError(f"`neftune_noise_alpha` must be a positive number, got {alpha!r}")
        return cls(model, alpha)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["inner"], name)

    def apply(self, params: Any, batch: Mapping[str, jax.Array], *, rng: jax.Array | None = None,
              train: bool = False) -> dict[str, jax.Array]:
        if not train:
            return self.inner.apply(params, batch, rng=rng, train=train)
        if rng is None:
            raise ConfigError("NEFTune draws its noise from the dropout rng: the training forward needs `rng`")
        with nn.intercept_methods(neftune_interceptor(self.alpha)):
            return self.inner.apply(params, batch, rng=rng, train=train)

    def with_options(self, **changes: Any) -> NEFTuneModel:
        return NEFTuneModel(self.inner.with_options(**changes), self.alpha)
