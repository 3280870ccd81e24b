"""Device peaks and MFU, so that speed is reported as model FLOPs utilisation.

The FLOP count of a step is counted on its jaxpr (`jtrain.flop_count`): matrix products and
fused attention, without gradient checkpointing's recomputation, the same on every platform.
XLA's cost analysis (`cost_analysis`, still used for bytes accessed) misses the work a GPU hands
to cuBLAS and cuDNN.
Peaks come from a table of known accelerators; a CPU has no published peak, so one is measured
once by a large matmul in the requested precision and cached on disk.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jtrain.flop_count import traced_flops
from jtrain.models import cpu_gemm, matmul

# Dense (non-sparse) peak FLOP/s per device, from the vendors' datasheets. "tensorfloat32" is the
# tensor-core rate float32 matmuls get at JAX's default precision on these GPUs (TF32).
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "NVIDIA H200": {"bfloat16": 989e12, "float16": 989e12, "tensorfloat32": 494.7e12, "float32": 67e12},
    "NVIDIA H100": {"bfloat16": 989e12, "float16": 989e12, "tensorfloat32": 494.7e12, "float32": 67e12},
    "NVIDIA A100": {"bfloat16": 312e12, "float16": 312e12, "tensorfloat32": 156e12, "float32": 19.5e12},
    "NVIDIA L4": {"bfloat16": 121e12, "float16": 121e12, "tensorfloat32": 60e12, "float32": 30e12},
    "TPU v4": {"bfloat16": 275e12, "float32": 275e12},
    "TPU v5 lite": {"bfloat16": 197e12, "float32": 197e12},
    "TPU v5p": {"bfloat16": 459e12, "float32": 459e12},
    "TPU v6 lite": {"bfloat16": 918e12, "float32": 918e12},
}

CACHE_ENV = "JTRAIN_PEAK_CACHE"


def cost_analysis(compiled: Any) -> dict[str, float]:
    """The compiler's cost analysis of a compiled executable as one dict ({} if unavailable)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return {}
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return dict(cost or {})


def step_flops(jitted: Callable, *args: Any, devices: int = 1) -> float:
    """Model FLOPs per device of `jitted(*args)` on `devices` devices; args may be abstract."""
    return traced_flops(jitted.trace(*args), devices)


def _matmul_seconds(n: int, dtype: Any, repeats: int) -> float:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
    # The dense layers' own product: where oneDNN (or MKL) computes them, the peak is its kernel's, as the step's is.
    mm = jax.jit(lambda x, y: matmul.dot_general(x, y, (((1,), (0,)), ((), ()))))
    mm(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mm(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return best


def measure_matmul_peak(dtype: str = "float32", n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the best of `repeats` n x n matmuls on the default device in `dtype`."""
    return 2.0 * n ** 3 / _matmul_seconds(n, jnp.dtype(dtype), repeats)


def _cache_path() -> str:
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "jtrain")
    return os.path.join(root, "peak_flops.json")


def device_peak_flops(dtype: str = "float32", device: Any = None, *, measure: bool = True,
                      matmul_precision: str | None = None) -> tuple[float | None, str]:
    """(peak FLOP/s of one device in `dtype`, where the number came from).

    Known accelerators use the table; anything else (a CPU) is measured once by a matmul and
    cached per device kind and dtype. With `measure=False` an unknown device gives (None, ...).
    `matmul_precision` is the steps' (HF's `tf32`: None, "tensorfloat32" or "highest"). On a GPU,
    float32 matmuls at JAX's default or at "tensorfloat32" run on the TF32 tensor cores, so their
    peak is the TF32 one; against the plain float32 peak MFU would read several times too high.
    """
    device = device or jax.devices()[0]
    kind, dtype = str(device.device_kind), str(jnp.dtype(dtype))
    tf32 = dtype == "float32" and device.platform == "gpu" and matmul_precision in (None, "tensorfloat32")
    for name, peaks in PEAK_FLOPS.items():
        if kind.startswith(name) and tf32 and "tensorfloat32" in peaks:
            return peaks["tensorfloat32"], f"datasheet ({name}, TF32)"
        if kind.startswith(name) and dtype in peaks:
            return peaks[dtype], f"datasheet ({name})"
    key = f"{device.platform}:{kind}:{dtype}:{os.cpu_count()}"
    if device.platform == "cpu" and cpu_gemm.active(dtype):
        key += f":{cpu_gemm.library_for(dtype)}"  # jtrain.models.cpu_gemm's kernel, not XLA's dot
    path = _cache_path()
    try:
        with open(path) as fh:
            cached = json.load(fh)
    except (OSError, json.JSONDecodeError):
        cached = {}
    if key in cached:
        return float(cached[key]), f"measured matmul (cached in {path})"
    if not measure:
        return None, "unknown device"
    peak = measure_matmul_peak(dtype)
    cached[key] = peak
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(cached, fh, indent=2)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home only costs a re-measurement next time
    return peak, "measured matmul"


def mfu(flops_per_step: float | None, seconds_per_step: float, peak_per_device: float | None) -> float | None:
    """Model FLOPs utilisation: achieved per-device FLOP/s over the per-device peak.

    `flops_per_step` is per device (`jtrain.flop_count.traced_flops`); None in, None out.
    """
    if not flops_per_step or not peak_per_device or seconds_per_step <= 0:
        return None
    return flops_per_step / seconds_per_step / peak_per_device
