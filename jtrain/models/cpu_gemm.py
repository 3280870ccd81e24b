"""Matrix products on the CPU through oneDNN or MKL, as an XLA FFI custom call.

bfloat16: XLA:CPU computes a bf16 dot at its float32 speed: on a Xeon with AMX that is about 190
GFLOP/s on two cores, where oneDNN's matmul primitive (the kernel PyTorch's bf16 matmul uses) and
MKL's `cblas_gemm_bf16bf16f32` run at 1300-1900 (benchmarks/TRIED.md).

float32: oneDNN's AVX-512 kernels ran the benchmark model's products 1.0-1.4x faster than XLA's
dot (near PyTorch's float32 `mm`, MKL's, except on large square products), and take transposed operands as flags, so
the weight gradients need no transposed copy: the float32 step ran 1.05-1.09x faster.

The dense layers (`jtrain.models.matmul`) and the CPU attention's batched products
(`jtrain.models.attention`) therefore call one of them instead, through `cpu_gemm.cc` compiled once
against JAX's FFI headers and registered as an XLA custom call. The same library holds the float32
attention kernel of `jtrain.models.cpu_attention` (two more FFI targets, registered by that module,
with its own AVX-512 products: it needs neither library).

Which library for bf16: oneDNN where it loads, because it writes a bf16 result itself (MKL writes
float32, which XLA then rounds in a second pass over fresh memory: oneDNN's steps measured 1.1x
faster); MKL otherwise. float32 products use oneDNN only (MKL's `sgemm` measured no faster in the
step). The choice is made once per process and dtype (`library_for`) and recorded in each call's
`onednn` attribute, so the compiled step does not depend on what a later process loads.

When it is used (`applies`): the CPU backend, both operands of one dtype with a library for it, and
a computation on one device (the custom call cannot be split by XLA's sharding partitioner).
Environment variables choose, each read once per process when the first product is traced:
- `JTRAIN_CPU_BF16_GEMM`: `auto` (default) uses a library when the CPU has AMX or AVX512-BF16 and a
  library and a C++ compiler are found, and otherwise stays on XLA's dot (logging why once);
  `onednn` or `mkl` require that library (a clear error if it cannot load); `xla` never uses one.
- `JTRAIN_CPU_F32_GEMM`: `auto` (default) uses oneDNN where it loads on a CPU with AVX-512 (where it
  was measured), `onednn` requires it on any CPU, `xla` keeps XLA's dot.
- `JTRAIN_CPU_F32_SGEMM`: `auto` (default) runs float32 products with neither operand transposed
  and 8192 result columns or more (an lm_head's forward) on oneDNN's `gemm:jit` (sgemm) kernel
  instead of the brgemm kernel oneDNN ranks first (the large benchmark step 1.03x faster); `off`
  keeps oneDNN's own choice everywhere; a number sets the column threshold.

What it needs: the `onednn-cpu-gomp` wheel (`pip install "jtrain[cpu-bf16]"`; or `JTRAIN_ONEDNN_LIB`
naming a `libdnnl.so` of oneDNN 3.x) or, for bf16 only, the `mkl` wheel (or `JTRAIN_MKL_LIB` naming
a `libmkl_rt.so`), and `g++`. The compiled library is cached under `JTRAIN_CACHE_DIR` (default
`~/.cache/jtrain`), keyed by the source and the jaxlib version.

Numerics: both multiply the operands exactly and accumulate in float32, as XLA:CPU's dot does (for
float32, oneDNN's default strict floating-point mode: no reduced-precision arithmetic); results
differ from XLA's only in summation order (float32 rounding), and a bf16 result is the float32
accumulator rounded to nearest, as XLA's convert rounds it.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import dataclasses
import functools
import glob
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jtrain import native
from jtrain.errors import ConfigError

logger = logging.getLogger(__name__)

TARGET = "jtrain_cpu_gemm"
ENV_MODE = "JTRAIN_CPU_BF16_GEMM"
ENV_F32_MODE = "JTRAIN_CPU_F32_GEMM"
ENV_LIBRARY = "JTRAIN_MKL_LIB"
ENV_ONEDNN_LIBRARY = "JTRAIN_ONEDNN_LIB"
ENV_F32_SGEMM = "JTRAIN_CPU_F32_SGEMM"
# Float32 products (neither operand transposed) with this many result columns or more take oneDNN's
# sgemm kernel rather than its brgemm. Alone it ran every such product of 1024 columns or more
# 1.1-1.7x faster; in the step only the vocabulary-wide lm_head kept its lead (the MLP's gate and up
# products run side by side there, and the sgemm kernel shares the cores worse): TRIED.md.
SGEMM_MIN_COLUMNS = 8192
_SOURCE = Path(__file__).with_name("cpu_gemm.cc")
_CPU_FEATURES = ("amx_bf16", "avx512_bf16")

# Set while a step is traced for a known mesh: whether that mesh is a single device. Outside
# such a scope (a bare `model.apply` under jit) the visible device count decides.
_single_device: contextvars.ContextVar[bool | None] = contextvars.ContextVar("jtrain_cpu_gemm_single", default=None)


def mode(env: str = ENV_MODE) -> str:
    """The `JTRAIN_CPU_BF16_GEMM` (or `JTRAIN_CPU_F32_GEMM`) setting, checked."""
    return native.env_setting(env, ("auto", *next(p.libraries for p in _POLICIES.values() if p.env == env), "xla"))


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


def _library_path(env: str, pattern: str, hint: str) -> str:
    """The file `env` names, or the first `pattern` under the environment's lib/ (where wheels put them)."""
    explicit = os.environ.get(env)
    if explicit:
        if not os.path.isfile(explicit):
            raise ConfigError(f"{env}={explicit} is not a file; point it at {pattern.rstrip('*')}")
        return explicit
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        found = sorted(glob.glob(os.path.join(prefix, "lib", pattern)))
        if found:
            return found[0]
    raise ConfigError(f"{pattern.rstrip('*')} was not found under {sys.prefix}/lib; {hint} or set {env} to its path")


def _load_mkl() -> ctypes.CDLL:
    """dlopen MKL (after its Intel OpenMP runtime, which `libmkl_rt` resolves at load) and size its pool."""
    path = _library_path(ENV_LIBRARY, "libmkl_rt.so*", "install it with `pip install mkl`")
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


def _build_extension() -> Path:
    """`cpu_gemm.cc` compiled against JAX's FFI headers (once per source and jaxlib version)."""
    return native.build_library(_SOURCE, TARGET, [f"-I{jax.ffi.include_dir()}"],
                                without_compiler=f"set {ENV_MODE}=xla and {ENV_F32_MODE}=xla")


def sgemm_min_columns() -> int:
    """From how many result columns float32 products prefer oneDNN's sgemm kernel to its brgemm
    (`JTRAIN_CPU_F32_SGEMM`: `auto`, the default, from `SGEMM_MIN_COLUMNS`; `off` (0): oneDNN's own
    first choice; or a number)."""
    value = os.environ.get(ENV_F32_SGEMM, "auto")
    if value not in ("auto", "off") and not value.isdigit():
        raise ConfigError(f"{ENV_F32_SGEMM}={value!r} is not a setting: use auto (the default), off, "
                          "or a number of result columns")
    return SGEMM_MIN_COLUMNS if value == "auto" else 0 if value == "off" else int(value)


def _load_onednn(ext: ctypes.CDLL) -> None:
    """Point the extension at oneDNN (which it dlopens and resolves itself)."""
    path = _library_path(ENV_ONEDNN_LIBRARY, "libdnnl.so*",
                         'install it with `pip install "jtrain[cpu-bf16]"` (the onednn-cpu-gomp wheel)')
    ext.jtrain_load_onednn.restype = ctypes.c_char_p
    error = ext.jtrain_load_onednn(path.encode())
    if error:
        raise ConfigError(f"oneDNN at {path} cannot be used: {error.decode()}")
    ext.jtrain_set_onednn_sgemm_min_columns(ctypes.c_int64(sgemm_min_columns()))


def _hand_over_mkl(ext: ctypes.CDLL) -> None:
    """Give the extension MKL's GEMM and its per-thread pool setter."""
    mkl = _load_mkl()
    set_local = getattr(mkl, "MKL_Set_Num_Threads_Local", None)
    ext.jtrain_set_bf16_gemm(ctypes.cast(mkl.cblas_gemm_bf16bf16f32, ctypes.c_void_p),
                             ctypes.cast(set_local, ctypes.c_void_p) if set_local else None,
                             ctypes.c_int(_threads()))


@functools.cache
def extension() -> ctypes.CDLL:
    """The compiled handlers, loaded, with the GEMM registered as an FFI target (once per process);
    `jtrain.models.cpu_attention` registers its own two."""
    ext = ctypes.CDLL(str(_build_extension()))
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(ext.JtrainCpuGemm), platform="cpu")
    return ext


@functools.cache
def _load(name: str) -> None:
    """Load library `name` ("onednn" or "mkl") into the extension; ConfigError if it cannot be."""
    try:
        (_load_onednn if name == "onednn" else _hand_over_mkl)(extension())
    except (OSError, AttributeError) as err:
        raise ConfigError(f"{name} cannot be loaded: {err}") from err


@dataclasses.dataclass(frozen=True)
class _Policy:
    """How products of one operand dtype choose their library."""

    env: str  # the setting: "auto", "xla", or one of `libraries`
    libraries: tuple[str, ...]  # what `auto` tries, in order
    features: tuple[str, ...]  # `auto` needs one of these CPU flags (where the path was measured faster)
    without_features: str  # logged when `auto` stays on XLA's dot for want of them
    fallback_level: int  # how loudly `auto` reports a library that does not load


_POLICIES = {
    "bfloat16": _Policy(ENV_MODE, ("onednn", "mkl"), _CPU_FEATURES,
                        "this CPU has neither AMX nor AVX512-BF16", logging.WARNING),
    "float32": _Policy(ENV_F32_MODE, ("onednn",), ("avx512f",),
                       f"oneDNN's float32 kernels were measured faster only on AVX-512 CPUs (set {ENV_F32_MODE}="
                       "onednn to use them here)", logging.INFO),
}


_NAMES = {"onednn": "oneDNN", "mkl": "MKL"}


@functools.cache
def _choose(dtype: str) -> str | None:
    """The library `dtype` products go to in this process (see `_POLICIES`), or None for XLA's dot.

    `auto` tries the policy's libraries in order, and only on a CPU with one of its features; a
    named library is required (a ConfigError naming the setting if it cannot load); `xla` never
    uses one."""
    policy = _POLICIES[dtype]
    chosen = mode(policy.env)
    if chosen == "xla":
        return None
    flags = cpu_flags()
    features = [f for f in policy.features if f in flags]
    if chosen == "auto" and not features:
        logger.info("%s matmuls stay on XLA's dot: %s", dtype, policy.without_features)
        return None
    errors = []
    for name in policy.libraries if chosen == "auto" else (chosen,):
        try:
            _load(name)
        except ConfigError as err:
            errors.append(str(err))
            continue
        logger.info("%s dense matmuls on the CPU use %s (%s)", dtype, name,
                    ", ".join(features) or f"without {'/'.join(policy.features)}: not measured here")
        return name
    if chosen != "auto":
        raise ConfigError(f"{policy.env}={chosen}, but {_NAMES[chosen]} cannot be used: {errors[0]}")
    logger.log(policy.fallback_level, "%s matmuls stay on XLA's dot: %s", dtype, "; ".join(errors))
    return None


def library() -> str | None:
    """The library bf16 products go to in this process (`auto`: oneDNN, which writes bf16 results
    itself, else MKL, on a CPU with AMX or AVX512-BF16), or None for XLA's dot."""
    return _choose("bfloat16")


def f32_library() -> str | None:
    """The library float32 products go to ("onednn", under `auto` on an AVX-512 CPU), or None."""
    return _choose("float32")


def library_for(dtype: Any) -> str | None:
    """The library products of two `dtype` operands go to in this process, or None (XLA's dot)."""
    name = jnp.dtype(dtype).name
    return _choose(name) if name in _POLICIES else None


def reset() -> None:
    """Forget the per-process choices, so the environment variables are read again (tests)."""
    _choose.cache_clear()


def available() -> bool:
    """Whether bf16 products go to a GEMM library in this process (`library()` is not None)."""
    return library() is not None


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


def on_one_cpu() -> bool:
    """Whether what is traced now runs on the CPU backend and one device (a custom call cannot be
    split by XLA's sharding partitioner): `single_device` where a step says so, else the count."""
    if jax.default_backend() != "cpu":
        return False
    single = _single_device.get()
    return jax.device_count() == 1 if single is None else single


def active(dtype: Any = jnp.bfloat16) -> bool:
    """Whether `dtype` products traced now go to a library: `on_one_cpu()` and `library_for(dtype)`."""
    return on_one_cpu() and library_for(dtype) is not None


def applies(lhs: jax.Array, rhs: jax.Array) -> bool:
    """True where a product of `lhs` and `rhs` should go to a library (see the module docstring)."""
    return lhs.dtype == rhs.dtype and active(lhs.dtype)


def gemm(a: jax.Array, b: jax.Array, *, trans_a: bool = False, trans_b: bool = False,
         out_dtype: Any = jnp.float32) -> jax.Array:
    """`op(a) @ op(b)` of bfloat16 (or float32) operands, accumulated in float32 and returned as
    `out_dtype`, `op` transposing the last two axes where asked (a BLAS flag, no copy): 2-D
    operands, or 3-D ones with the same leading batch size.

    oneDNN writes a bfloat16 result itself (half the bytes, no second pass: 1.2-2.5x faster
    products, TRIED.md); MKL returns float32, which XLA then rounds in a fused convert."""
    if a.ndim not in (2, 3) or b.ndim != a.ndim or a.dtype != b.dtype or a.dtype not in (jnp.bfloat16, jnp.float32):
        raise ValueError(f"gemm takes 2-D or 3-D operands of equal rank, both bfloat16 or both float32, got "
                         f"{a.dtype}{a.shape} and {b.dtype}{b.shape}")
    m, k = a.shape[-1:-3:-1] if trans_a else a.shape[-2:]
    k_b, n = b.shape[-1:-3:-1] if trans_b else b.shape[-2:]
    if k != k_b or a.shape[:-2] != b.shape[:-2]:
        raise ValueError(f"gemm: contracting sizes ({k} vs {k_b}) or batch sizes differ for {a.shape} and {b.shape}")
    name = library_for(a.dtype)
    if name is None:
        env = _POLICIES[a.dtype.name].env
        raise ConfigError(f"no {a.dtype} GEMM library is in use ({env}={mode(env)}, CPU features: "
                          f"{', '.join(cpu_bf16_features()) or 'none'}); call XLA's dot instead")
    direct = jnp.dtype(out_dtype) == jnp.bfloat16 and a.dtype == jnp.bfloat16 and name == "onednn"
    out = jax.ShapeDtypeStruct((*a.shape[:-2], m, n), jnp.bfloat16 if direct else jnp.float32)
    call = jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")
    return call(a, b, trans_a=bool(trans_a), trans_b=bool(trans_b), onednn=name == "onednn").astype(out_dtype)


@functools.cache
def _batched_vjp(trans_b: bool, out_dtype: Any):
    @jax.custom_vjp
    def product(a: jax.Array, b: jax.Array) -> jax.Array:
        return gemm(a, b, trans_b=trans_b, out_dtype=out_dtype)

    def fwd(a: jax.Array, b: jax.Array):
        return product(a, b), (a, b)

    def bwd(res, g: jax.Array):
        a, b = res
        g = g.astype(a.dtype)
        da = gemm(g, b, trans_b=not trans_b, out_dtype=a.dtype)
        db = gemm(g, a, trans_a=True, out_dtype=b.dtype) if trans_b else gemm(a, g, trans_a=True, out_dtype=b.dtype)
        return da, db

    product.defvjp(fwd, bwd)
    return product


def batched_matmul(a: jax.Array, b: jax.Array, *, trans_b: bool = False, out_dtype: Any = jnp.float32) -> jax.Array:
    """Differentiable `a @ op(b)` of bfloat16 (or float32) [batch, m, k] and [batch, k, n] (or
    [batch, n, k] with `trans_b`) operands, every product through the library. The backward rounds
    the incoming gradient to the operands' dtype before its two products, as PyTorch's bf16
    autocast does."""
    return _batched_vjp(bool(trans_b), jnp.dtype(out_dtype))(a, b)
