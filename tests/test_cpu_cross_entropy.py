"""jtrain.models.cpu_cross_entropy: the float32 token cross-entropy as two custom calls on XLA:CPU.

References and tolerances:
- the loss sum and the logits' gradient against numpy float64 on the same float32 logits: the
  kernel's exp has a relative error of about 2e-7 and it sums each row's exponentials in double, so
  every entry is held to 1e-6 of the largest entry of its array (measured: 8e-8; XLA's own ops
  2e-7; the first version, summing 32000 terms in float32 lanes, was 1.6e-6 off and failed this);
- a Trainer step with the kernel against the same step with XLA's ops (`tiny.assert_kernel_step_matches_xla`:
  losses to 1e-5 relative, as the attention kernel's).
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jtrain.errors import ConfigError
from jtrain.losses import token_cross_entropy
from jtrain.models import cpu_cross_entropy, cpu_gemm
from tiny import assert_kernel_step_matches_xla, cpu_kernel_on

pytestmark = pytest.mark.cpu_only("an XLA:CPU custom call")


@pytest.fixture
def kernel(monkeypatch):
    """The kernel on, on one device (it needs AVX-512 and g++)."""
    with cpu_kernel_on(monkeypatch, cpu_cross_entropy.ENV, cpu_cross_entropy._CPU_FEATURES):
        yield


def _reference(logits, labels):
    x, y = np.asarray(logits, np.float64), np.asarray(labels)
    valid = y != -100
    m = x.max(-1, keepdims=True)
    p = np.exp(x - m)
    p /= p.sum(-1, keepdims=True)
    picked = np.take_along_axis(p, np.where(valid, y, 0)[..., None], -1)[..., 0]
    onehot = np.zeros_like(p)
    np.put_along_axis(onehot, np.where(valid, y, 0)[..., None], 1.0, -1)
    return float(np.sum(np.where(valid, -np.log(picked), 0.0))), (p - onehot) * valid[..., None]


@pytest.mark.parametrize("shape", [(2, 7, 37), (3, 9, 1000), (1, 64, 4099)])
def test_matches_float64(kernel, shape):
    key = jax.random.key(0)
    logits = 4.0 * jax.random.normal(key, shape)
    labels = jax.random.randint(jax.random.fold_in(key, 1), shape[:-1], 0, shape[-1]).at[0, :3].set(-100)
    loss, grad = jax.jit(jax.value_and_grad(lambda x: token_cross_entropy(x, labels).loss_sum))(logits)
    want_loss, want_grad = _reference(logits, labels)
    assert abs(float(loss) - want_loss) <= 1e-6 * abs(want_loss)
    assert np.max(np.abs(np.asarray(grad) - want_grad)) <= 1e-6 * np.max(np.abs(want_grad))
    assert not np.any(np.asarray(grad)[0, :3])  # ignored positions get no gradient


def test_a_label_past_the_vocabulary_is_nan(kernel):
    logits = jnp.zeros((1, 2, 8))
    nll = cpu_cross_entropy.token_nll(logits, jnp.array([[3, 8]]))
    assert np.isfinite(float(nll[0, 0])) and np.isnan(float(nll[0, 1]))


@pytest.mark.parametrize("path", ["kernel", "xla"])
def test_labels_outside_the_vocabulary_are_nan_on_both_paths(monkeypatch, path):
    """A label past the vocabulary, or negative other than -100, is invalid (PyTorch raises): both
    the kernel and XLA's ops give a NaN loss, where a gather alone would wrap -1 to the last class
    and the kernel would skip it; -100 alone is ignored. Eager and jitted agree."""
    monkeypatch.setenv(cpu_cross_entropy.ENV, "xla")
    with cpu_kernel_on(monkeypatch, cpu_cross_entropy.ENV, cpu_cross_entropy._CPU_FEATURES) if path == "kernel" \
            else contextlib.nullcontext():
        logits = jax.random.normal(jax.random.key(2), (1, 3, 8))
        assert cpu_cross_entropy.applies(logits) == (path == "kernel")
        for fn in (token_cross_entropy, jax.jit(token_cross_entropy)):
            assert np.isfinite(float(fn(logits, jnp.array([[3, -100, 7]])).loss_sum))
            for bad in (-1, -5, 8, 100):
                assert np.isnan(float(fn(logits, jnp.array([[3, -100, bad]])).loss_sum)), bad


def test_where_it_applies(monkeypatch):
    logits, labels = jnp.ones((2, 4, 16)), jnp.ones((2, 4), jnp.int32)

    def lowered(logits=logits, single=True, smoothing=0.0):
        with cpu_gemm.single_device(single):
            loss = lambda x: token_cross_entropy(x, labels, label_smoothing=smoothing).loss_sum
            return jax.jit(jax.grad(loss)).lower(logits).as_text()

    monkeypatch.setenv(cpu_cross_entropy.ENV, "auto")
    if not cpu_cross_entropy._CPU_FEATURES <= cpu_gemm.cpu_flags():
        assert cpu_cross_entropy.FORWARD not in lowered()  # no AVX-512: XLA's ops
        return
    assert cpu_cross_entropy.FORWARD in lowered() and cpu_cross_entropy.BACKWARD in lowered()
    assert cpu_cross_entropy.FORWARD not in lowered(single=False)  # sharded: XLA must partition the loss
    assert cpu_cross_entropy.FORWARD not in lowered(logits.astype(jnp.bfloat16))  # bf16 logits keep XLA's ops
    assert cpu_cross_entropy.FORWARD not in lowered(smoothing=0.1)  # label smoothing keeps XLA's ops
    with monkeypatch.context() as m:  # no compiler: XLA's ops, and a clear error if asked directly
        m.setattr(cpu_cross_entropy, "_built", lambda: "no C++ compiler (g++) was found")
        assert cpu_cross_entropy.FORWARD not in lowered()
        with cpu_gemm.single_device(True), pytest.raises(ConfigError, match="does not apply"):
            cpu_cross_entropy.token_nll(logits, labels)
    monkeypatch.setenv(cpu_cross_entropy.ENV, "xla")
    assert cpu_cross_entropy.FORWARD not in lowered()
    monkeypatch.setenv(cpu_cross_entropy.ENV, "sometimes")
    with pytest.raises(ConfigError, match=r"JTRAIN_CPU_CROSS_ENTROPY='sometimes' is not one of auto, xla"):
        lowered()


def test_trainer_step_with_the_kernel_matches_xla(kernel, tmp_path, monkeypatch):
    assert_kernel_step_matches_xla(monkeypatch, tmp_path, cpu_cross_entropy.ENV, cpu_cross_entropy.BACKWARD)
