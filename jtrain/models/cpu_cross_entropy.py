"""Float32 token cross-entropy on XLA:CPU as two custom calls (forward, backward) of `cpu_gemm.cc`.

Why: the loss over a large vocabulary is a few passes over the [tokens, vocab] logits (262 MB for
the large benchmark model), and XLA:CPU's autodiff of logsumexp stores exp(logits - max) in the
forward for the backward to read: a 262 MB write and read more than the loss needs. The kernel
keeps each row in the core's cache between its max and its sum of exponentials, so the forward
reads the logits once and stores two floats per row; the backward recomputes the exponentials and
writes the gradient over the logits' own buffer (they are dead by then), so no second
[tokens, vocab] buffer exists (benchmarks/TRIED.md has the measurements).

When (`applies`): the CPU backend on one device (`cpu_gemm.on_one_cpu`), a CPU with AVX-512 (F, BW,
VL: the row loops and exp are AVX-512), float32 logits, and the extension builds (`g++`).
`JTRAIN_CPU_CROSS_ENTROPY=auto` (default) takes it where it applies, `xla` never.

Numerics: nll = logsumexp(row) - row[label] as `jtrain.losses.token_cross_entropy` writes it, with
exp from the attention kernel's polynomial (relative error about 2e-7) and another summation order.
Labels of -100 give 0 and no gradient; a label past the vocabulary gives NaN, as XLA's gather does.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

from jtrain import native
from jtrain.errors import ConfigError
from jtrain.models import cpu_gemm

logger = logging.getLogger(__name__)

ENV = "JTRAIN_CPU_CROSS_ENTROPY"
FORWARD = "jtrain_cpu_cross_entropy"
BACKWARD = "jtrain_cpu_cross_entropy_backward"
_CPU_FEATURES = {"avx512f", "avx512bw", "avx512vl"}


def mode() -> str:
    """The `JTRAIN_CPU_CROSS_ENTROPY` setting, checked."""
    return native.env_setting(ENV, ("auto", "xla"))


def applies(logits: jax.Array) -> bool:
    """Whether `token_nll` should compute this loss (see the module docstring)."""
    return (logits.dtype == jnp.float32 and logits.ndim >= 2 and logits.shape[-1] > 0 and mode() == "auto"
            and cpu_gemm.on_one_cpu() and _CPU_FEATURES <= cpu_gemm.cpu_flags() and _built() is None)


@functools.cache
def _built() -> str | None:
    """Build the extension and register both handlers (once per process); None, or why that failed."""
    try:
        ext = cpu_gemm.extension()
    except (ConfigError, OSError) as err:
        logger.info("the float32 cross-entropy stays on XLA's ops: %s", err)
        return str(err)
    for target, symbol in ((FORWARD, ext.JtrainCpuCrossEntropyForward),
                           (BACKWARD, ext.JtrainCpuCrossEntropyBackward)):
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(symbol), platform="cpu")
    return None


def _forward(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Each row's nll, maximum and sum of exp(row - maximum)."""
    rows = (jax.ShapeDtypeStruct(labels.shape, jnp.float32),) * 3
    return tuple(jax.ffi.ffi_call(FORWARD, rows, vmap_method="sequential")(logits, labels))


@jax.custom_vjp
def _nll(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return _forward(logits, labels)[0]


def _nll_fwd(logits: jax.Array, labels: jax.Array):
    nll, row_max, row_sum = _forward(logits, labels)
    return nll, (logits, labels, row_max, row_sum)


def _nll_bwd(res, d_nll: jax.Array):
    logits, labels, row_max, row_sum = res
    # The gradient is written over the logits (operand 0), which nothing reads after this.
    call = jax.ffi.ffi_call(BACKWARD, jax.ShapeDtypeStruct(logits.shape, jnp.float32), vmap_method="sequential",
                            input_output_aliases={0: 0})
    return call(logits, labels, row_max, row_sum, d_nll.astype(jnp.float32)), None


_nll.defvjp(_nll_fwd, _nll_bwd)


def token_nll(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """-log softmax(logits)[label] per position of float32 logits [..., vocab] and labels [...];
    0 (and no gradient) where the label is -100 or any negative value."""
    if not applies(logits):
        raise ConfigError(f"the CPU cross-entropy kernel does not apply here ({ENV}={mode()}, logits "
                          f"{logits.dtype}{logits.shape}); check `applies` first")
    vocab = logits.shape[-1]
    nll = _nll(logits.reshape(-1, vocab), labels.reshape(-1).astype(jnp.int32))
    return nll.reshape(labels.shape)
