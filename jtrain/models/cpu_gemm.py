"""bf16 matrix products on the CPU through MKL (AMX / AVX512-BF16), as an XLA FFI custom call.

XLA:CPU computes a bfloat16 dot at its float32 speed: on a Xeon with AMX that is about 190
GFLOP/s on two cores, where MKL's `cblas_gemm_bf16bf16f32` (the kernel PyTorch's bf16 matmul
reaches through oneDNN) runs at about 1700 (benchmarks/TRIED.md). The dense layers
(`jtrain.models.matmul`) and the CPU attention's batched products (`jtrain.models.attention`) of a
bf16 run on such a CPU therefore call that kernel instead, through `cpu_gemm.cc` compiled once
against JAX's FFI headers and registered as an XLA custom call.

When it is used (`applies`): the CPU backend, both operands bfloat16, and a computation on one
device (the custom call cannot be split by XLA's sharding partitioner). The environment variable
`JTRAIN_CPU_BF16_GEMM` chooses: `auto` (default) uses it when the CPU has AMX or AVX512-BF16 and
the MKL library and a C++ compiler are found, and otherwise stays on XLA's dot (logging why
once); `mkl` requires it (a clear error if it cannot load); `xla` never uses it. It is read once
per process, when the first bf16 product is traced.

What it needs: the `mkl` wheel from PyPI (`pip install "jtrain[cpu-bf16]"`; or `JTRAIN_MKL_LIB`
naming a `libmkl_rt.so`) and `g++`. The compiled library is cached under `JTRAIN_CACHE_DIR`
(default `~/.cache/jtrain`), keyed by the source and the jaxlib version.

Numerics: MKL multiplies the bf16 operands exactly and accumulates in float32, as XLA:CPU's
bf16 dot does; results differ from XLA's only in summation order (float32 rounding).
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import glob
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jtrain.errors import ConfigError

logger = logging.getLogger(__name__)

TARGET = "jtrain_bf16_gemm"
ENV_MODE = "JTRAIN_CPU_BF16_GEMM"
ENV_LIBRARY = "JTRAIN_MKL_LIB"
_MODES = ("auto", "mkl", "xla")
_SOURCE = Path(__file__).with_name("cpu_gemm.cc")
_CPU_FEATURES = ("amx_bf16", "avx512_bf16")

# Set while a step is traced for a known mesh: whether that mesh is a single device. Outside
# such a scope (a bare `model.apply` under jit) the visible device count decides.
_single_device: contextvars.ContextVar[bool | None] = contextvars.ContextVar("jtrain_cpu_gemm_single", default=None)


def mode() -> str:
    """The `JTRAIN_CPU_BF16_GEMM` setting, checked."""
    value = os.environ.get(ENV_MODE, "auto").strip().lower() or "auto"
    if value not in _MODES:
        raise ConfigError(f"{ENV_MODE}={value!r} is not one of {', '.join(_MODES)}")
    return value


def cpu_flags() -> set[str]:
    """This CPU's feature flags from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as fh:
            line = next((line for line in fh if line.startswith("flags")), "")
    except OSError:
        return set()
    return set(line.partition(":")[2].split())


def cpu_bf16_features() -> list[str]:
    """The bf16 matrix features of this CPU that MKL's bf16 GEMM uses."""
    flags = cpu_flags()
    return [f for f in _CPU_FEATURES if f in flags]


def _mkl_path() -> str:
    """`JTRAIN_MKL_LIB`, or the `libmkl_rt.so` the `mkl` wheel puts under the environment's lib/."""
    explicit = os.environ.get(ENV_LIBRARY)
    if explicit:
        if not os.path.isfile(explicit):
            raise ConfigError(f"{ENV_LIBRARY}={explicit} is not a file; point it at libmkl_rt.so")
        return explicit
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        found = sorted(glob.glob(os.path.join(prefix, "lib", "libmkl_rt.so*")))
        if found:
            return found[0]
    raise ConfigError(f"MKL was not found under {sys.prefix}/lib; install it with `pip install \"jtrain[cpu-bf16]\"` "
                      f"(the `mkl` wheel) or set {ENV_LIBRARY} to a libmkl_rt.so")


def _load_mkl() -> ctypes.CDLL:
    """dlopen MKL (after its Intel OpenMP runtime, which `libmkl_rt` resolves at load) and size its pool."""
    path = _mkl_path()
    # Intel OpenMP threads spin for 200 ms after each parallel region by default, taking the cores
    # XLA's own threads need between the products (measured: +0.5 s of CPU time per tiny step). The
    # runtime reads this when it starts, so it is set before MKL is loaded.
    os.environ.setdefault("KMP_BLOCKTIME", "0")
    omp = os.path.join(os.path.dirname(path), "libiomp5.so")
    if os.path.isfile(omp):
        ctypes.CDLL(omp, mode=ctypes.RTLD_GLOBAL)
    mkl = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    if "MKL_NUM_THREADS" not in os.environ and hasattr(mkl, "MKL_Set_Num_Threads"):
        mkl.MKL_Set_Num_Threads(ctypes.c_int(_threads()))
    return mkl


def _threads() -> int:
    """MKL's threads per product (`MKL_NUM_THREADS`, else the cores this process may run on)."""
    value = os.environ.get("MKL_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else len(os.sched_getaffinity(0))


def _cache_dir() -> Path:
    return Path(os.environ.get("JTRAIN_CACHE_DIR") or Path.home() / ".cache" / "jtrain")


def _build_extension() -> Path:
    """Compile `cpu_gemm.cc` once per source and jaxlib version; concurrent builders rename atomically."""
    import jaxlib

    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + jaxlib.__version__.encode()).hexdigest()[:16]
    target = _cache_dir() / f"libjtrain_cpu_gemm-{key}.so"
    if target.is_file():
        return target
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise ConfigError("no C++ compiler (g++) was found to build jtrain's bf16 CPU GEMM; install g++ or "
                          f"set {ENV_MODE}=xla")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    cmd = [compiler, "-O3", "-std=c++17", "-shared", "-fPIC", f"-I{jax.ffi.include_dir()}", str(_SOURCE), "-o", tmp]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        os.unlink(tmp)
        raise ConfigError(f"building jtrain's bf16 CPU GEMM failed ({' '.join(cmd)}):\n{done.stderr[-2000:]}")
    os.replace(tmp, target)
    return target


@functools.cache
def _register() -> None:
    """Load MKL and the extension, hand it MKL's GEMM, register the FFI target (once per process)."""
    mkl = _load_mkl()
    ext = ctypes.CDLL(str(_build_extension()))
    set_local = getattr(mkl, "MKL_Set_Num_Threads_Local", None)
    ext.jtrain_set_bf16_gemm(ctypes.cast(mkl.cblas_gemm_bf16bf16f32, ctypes.c_void_p),
                             ctypes.cast(set_local, ctypes.c_void_p) if set_local else None,
                             ctypes.c_int(_threads()))
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(ext.JtrainBf16Gemm), platform="cpu")


@functools.cache
def available() -> bool:
    """Whether the MKL path is on for this process (`JTRAIN_CPU_BF16_GEMM` and what the machine has)."""
    chosen = mode()
    if chosen == "xla":
        return False
    if chosen == "auto" and not cpu_bf16_features():
        logger.info("bf16 matmuls stay on XLA's dot: this CPU has neither AMX nor AVX512-BF16")
        return False
    try:
        _register()
    except (ConfigError, OSError, AttributeError) as err:
        if chosen == "mkl":
            raise ConfigError(f"{ENV_MODE}=mkl, but MKL's bf16 GEMM cannot be used: {err}") from err
        logger.warning("bf16 matmuls stay on XLA's dot (slower on this CPU): %s", err)
        return False
    logger.info("bf16 dense matmuls on the CPU use MKL's cblas_gemm_bf16bf16f32 (%s)",
                ", ".join(cpu_bf16_features()) or "no AMX/AVX512-BF16: emulated")
    return True


@contextlib.contextmanager
def single_device(flag: bool) -> Iterator[None]:
    """Trace inside this to say whether the computation runs on one device (the mesh's size is 1)."""
    token = _single_device.set(flag)
    try:
        yield
    finally:
        _single_device.reset(token)


def traced_on(single: bool, fn: Callable) -> Callable:
    """`fn` traced under `single_device(single)` (for the steps `jtrain.compiled` jits for a mesh)."""

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with single_device(single):
            return fn(*args, **kwargs)

    return wrapped


def active() -> bool:
    """Whether bf16 products traced now go to MKL: the CPU backend, one device, `available()`."""
    if jax.default_backend() != "cpu":
        return False
    single = _single_device.get()
    if single is None:
        single = jax.device_count() == 1
    return single and available()


def applies(lhs: jax.Array, rhs: jax.Array) -> bool:
    """True where a product of `lhs` and `rhs` should go to MKL (see the module docstring)."""
    return lhs.dtype == jnp.bfloat16 and rhs.dtype == jnp.bfloat16 and active()


def gemm(a: jax.Array, b: jax.Array, *, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
    """float32 `op(a) @ op(b)` of bfloat16 operands, `op` transposing the last two axes where asked
    (a BLAS flag, no copy): 2-D operands, or 3-D ones with the same leading batch size.

    The result is float32 (MKL's accumulator); callers round it to bfloat16 in XLA, which fuses
    that convert into the next op. Rounding inside the call measured slower (TRIED.md)."""
    if a.ndim not in (2, 3) or b.ndim != a.ndim or a.dtype != jnp.bfloat16 or b.dtype != jnp.bfloat16:
        raise ValueError(f"gemm takes 2-D or 3-D bfloat16 operands of equal rank, got {a.dtype}{a.shape} and "
                         f"{b.dtype}{b.shape}")
    m, k = a.shape[-1:-3:-1] if trans_a else a.shape[-2:]
    k_b, n = b.shape[-1:-3:-1] if trans_b else b.shape[-2:]
    if k != k_b or a.shape[:-2] != b.shape[:-2]:
        raise ValueError(f"gemm: contracting sizes ({k} vs {k_b}) or batch sizes differ for {a.shape} and {b.shape}")
    _register()
    out = jax.ShapeDtypeStruct((*a.shape[:-2], m, n), jnp.float32)
    call = jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")
    return call(a, b, trans_a=bool(trans_a), trans_b=bool(trans_b))


@functools.cache
def _batched_vjp(trans_b: bool, out_dtype: Any):
    @jax.custom_vjp
    def product(a: jax.Array, b: jax.Array) -> jax.Array:
        return gemm(a, b, trans_b=trans_b).astype(out_dtype)

    def fwd(a: jax.Array, b: jax.Array):
        return product(a, b), (a, b)

    def bwd(res, g: jax.Array):
        a, b = res
        g = g.astype(jnp.bfloat16)
        da = gemm(g, b, trans_b=not trans_b)
        db = gemm(g, a, trans_a=True) if trans_b else gemm(a, g, trans_a=True)
        return da.astype(a.dtype), db.astype(b.dtype)

    product.defvjp(fwd, bwd)
    return product


def batched_matmul(a: jax.Array, b: jax.Array, *, trans_b: bool = False, out_dtype: Any = jnp.float32) -> jax.Array:
    """Differentiable `a @ op(b)` of bfloat16 [batch, m, k] and [batch, k, n] (or [batch, n, k] with
    `trans_b`) operands, every product through MKL. The backward rounds the incoming gradient to
    bfloat16 before its two products, as PyTorch's bf16 autocast does."""
    return _batched_vjp(bool(trans_b), jnp.dtype(out_dtype))(a, b)
