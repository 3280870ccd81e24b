"""Memory planning before step 1, and HF-style memory metrics per phase.

Planning: the train step is lowered and compiled on abstract inputs (shapes, dtypes and
shardings only); the compiler's `memory_analysis()` gives the per-device bytes of arguments,
outputs, temporaries and the part of the outputs that aliases donated arguments. Their sum
(`MemoryEstimate.peak`) is checked against the device's memory (`bytes_limit` of
`device.memory_stats()`, where the backend reports it) and the user's budget
(`max_device_memory_bytes`; the smaller one wins when both exist) before any state is
allocated. The executable is the one jit's cache then runs, so planning costs no extra compile.

Metrics (`skip_memory_metrics=False`), per phase (`init`, `train`, `eval`), in bytes:

- `{phase}_mem_cpu_alloc_delta` / `{phase}_mem_cpu_peaked_delta`: host RSS at the end minus at
  the start, and the peak (sampled every 5 ms) above the end value: HF's definitions.
- `{phase}_mem_device_alloc_delta`: bytes held on the first local device at the end minus at
  the start (HF's `_gpu_` keys, renamed because the device may be a TPU or a CPU).
- `{phase}_mem_device_peak`: the device's own peak (`peak_bytes_in_use`) when the backend
  reports memory statistics; it is exact when the phase set a new peak for the process, and a
  lower bound otherwise (JAX cannot reset the peak counter).
- `{phase}_mem_device_peak_estimate`: on backends without statistics (CPU), the largest compiler
  estimate (`MemoryEstimate.peak`) of the steps the phase ran; the key says it is an estimate.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import numpy as np

from jtrain.errors import ConfigError
from jtrain.flop_count import traced_flops
from jtrain.models.attention import refuse_failed_fused_attention

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MemoryEstimate:
    """Per-device bytes of one compiled executable, from `compiled.memory_analysis()`."""

    arguments: int
    outputs: int
    aliased: int  # output bytes that reuse donated argument buffers
    temporaries: int
    code: int

    @property
    def peak(self) -> int:
        """Bytes live at once in the worst case: arguments + new outputs + temporaries + code."""
        return self.arguments + max(self.outputs - self.aliased, 0) + self.temporaries + self.code

    @classmethod
    def from_compiled(cls, compiled: Any) -> MemoryEstimate | None:
        try:
            stats = compiled.memory_analysis()
        except Exception:  # some backends do not implement it
            return None
        if stats is None:
            return None
        return cls(arguments=int(stats.argument_size_in_bytes), outputs=int(stats.output_size_in_bytes),
                   aliased=int(stats.alias_size_in_bytes), temporaries=int(stats.temp_size_in_bytes),
                   code=int(getattr(stats, "generated_code_size_in_bytes", 0) or 0))

    def describe(self) -> str:
        return (f"{fmt_bytes(self.peak)} per device (arguments {fmt_bytes(self.arguments)}, outputs "
                f"{fmt_bytes(self.outputs)} of which {fmt_bytes(self.aliased)} reuse donated inputs, temporaries "
                f"{fmt_bytes(self.temporaries)})")


def tree_nbytes(tree: Any) -> int:
    """Bytes held by a pytree of arrays or ShapeDtypeStructs (quantised nodes count their codes
    and scales, which are their leaves)."""
    return sum(int(np.dtype(x.dtype).itemsize) * math.prod(x.shape) for x in jax.tree.leaves(tree))


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def device_memory_stats(device: Any = None) -> dict | None:
    """`device.memory_stats()` or None where the backend has none (CPU)."""
    device = device or jax.local_devices()[0]
    try:
        return device.memory_stats() or None
    except Exception:
        return None


def device_memory_limit(budget: int | None = None, device: Any = None) -> tuple[int | None, str]:
    """(usable bytes per device, where the number came from); the smaller of device and budget."""
    stats = device_memory_stats(device)
    limit = int(stats["bytes_limit"]) if stats and stats.get("bytes_limit") else None
    if budget is not None and (limit is None or budget < limit):
        return int(budget), "max_device_memory_bytes"
    if limit is not None:
        return limit, "the device's bytes_limit"
    return None, "unknown (the backend reports no memory limit; set max_device_memory_bytes)"


def fits(estimate: MemoryEstimate | None, limit: int | None) -> bool:
    return estimate is None or limit is None or estimate.peak <= limit


def refuse_if_too_big(estimate: MemoryEstimate | None, limit: int | None, source: str, *,
                      per_device_batch: int) -> None:
    """Raise ConfigError naming the estimate, the device's memory and what to change."""
    if fits(estimate, limit):
        return
    raise ConfigError(
        f"the train step needs about {estimate.describe()}, but the device has {fmt_bytes(limit)} ({source}). "
        f"Lower per_device_train_batch_size (now {per_device_batch}) and raise gradient_accumulation_steps to keep "
        "the global batch, set gradient_checkpointing=true (gradient_checkpointing_kwargs={policy: "
        "nothing_saveable}), shard parameters and optimizer state with fsdp=full_shard, or set "
        "auto_find_batch_size=true")


def largest_fitting(fits_at: Callable[[int], bool], start: int) -> int | None:
    """The largest n in [1, start] with fits_at(n), assuming memory grows with n (binary search).

    `start` is tried first, so a configuration that fits costs one probe; otherwise about
    log2(start) more. None when even 1 does not fit.
    """
    if fits_at(start):
        return start
    lo, hi = 0, start  # fits_at(lo) holds (or lo == 0), fits_at(hi) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits_at(mid):
            lo = mid
        else:
            hi = mid
    return lo or None


# ---- metrics --------------------------------------------------------------------------------

def host_rss() -> int | None:
    """Resident set size of this process in bytes (None where it cannot be read)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.Process().memory_info().rss)


def device_bytes_in_use(device: Any = None) -> int:
    """Bytes held on `device`: its statistics where available, else the live arrays' shards there."""
    device = device or jax.local_devices()[0]
    stats = device_memory_stats(device)
    if stats and "bytes_in_use" in stats:
        return int(stats["bytes_in_use"])
    total = 0
    for array in jax.live_arrays():
        try:
            total += sum(s.data.nbytes for s in array.addressable_shards if s.device == device)
        except Exception:  # deleted or donated while we looked
            continue
    return total


class _PeakSampler:
    """Samples host RSS in a background thread (as HF's tracker does) to find the phase's peak."""

    def __init__(self, interval: float = 0.005):
        self.peak, self.interval = host_rss() or 0, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="jtrain-mem-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, host_rss() or 0)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, host_rss() or 0)


class MemoryTracker:
    """HF's `TrainerMemoryTracker` for jtrain: `start(phase)`, then `stop(phase)` gives the metrics.

    Only the outermost phase is tracked (an evaluation inside training is part of `train`).
    """

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.phase: str | None = None
        self.estimates: dict[str, int] = {}  # phase -> largest compiler estimate of its steps
        self._start: dict[str, Any] = {}

    def start(self, phase: str) -> None:
        if not self.enabled or self.phase is not None:
            return
        self.phase = phase
        gc.collect()  # arrays only waiting for the collector would count as held
        stats = device_memory_stats()
        self._start = {"rss": host_rss(), "device": device_bytes_in_use(),
                       "device_peak": stats.get("peak_bytes_in_use") if stats else None,
                       "sampler": _PeakSampler()}

    def note_estimate(self, phase: str, estimate: MemoryEstimate | None) -> None:
        if estimate is not None:
            self.estimates[phase] = max(self.estimates.get(phase, 0), estimate.peak)

    def stop(self, phase: str) -> dict[str, int]:
        if not self.enabled or self.phase != phase:
            return {}
        self.phase = None
        gc.collect()
        s = self._start
        peak_rss, rss = s["sampler"].stop(), host_rss()
        out: dict[str, int] = {}
        if rss is not None and s["rss"] is not None:
            out[f"{phase}_mem_cpu_alloc_delta"] = rss - s["rss"]
            out[f"{phase}_mem_cpu_peaked_delta"] = max(0, peak_rss - rss)
        out[f"{phase}_mem_device_alloc_delta"] = device_bytes_in_use() - s["device"]
        stats = device_memory_stats()
        if stats and "peak_bytes_in_use" in stats:
            peak = int(stats["peak_bytes_in_use"])
            out[f"{phase}_mem_device_peak"] = peak if peak > (s["device_peak"] or 0) else int(
                max(s["device"], stats.get("bytes_in_use", 0)))
        elif phase in self.estimates:
            out[f"{phase}_mem_device_peak_estimate"] = self.estimates[phase]
        return out


def tracker_for(trainer: Any) -> MemoryTracker:
    """The trainer's tracker, created on first use from `skip_memory_metrics`."""
    tracker = getattr(trainer, "_memory_tracker", None)
    if tracker is None:
        tracker = MemoryTracker(enabled=not trainer.args.skip_memory_metrics)
        trainer._memory_tracker = tracker
    return tracker


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


# ---- gradient checkpointing and the planning of the train step ----------------------------------

_IGNORED_CHECKPOINTING_KWARGS = ("use_reentrant",)  # torch-only options; meaningless under jax.checkpoint


def remat_policy_from_args(gradient_checkpointing: bool, kwargs: dict | None) -> str | None:
    """HF's `gradient_checkpointing(_kwargs)` -> the model's `remat_policy` ("full" by default).

    HF recomputes each layer whole in the backward pass, which is the "full" policy here;
    `{"policy": name}` picks another of `jtrain.models.layers.REMAT_POLICIES`.
    """
    from jtrain.models.layers import REMAT_POLICIES

    kwargs = dict(kwargs or {})
    for key in _IGNORED_CHECKPOINTING_KWARGS:
        kwargs.pop(key, None)
    policy = kwargs.pop("policy", "full")
    if kwargs:
        raise ConfigError(f"unknown gradient_checkpointing_kwargs {sorted(kwargs)}; jtrain understands "
                          f"`policy` (one of {sorted(REMAT_POLICIES)})")
    if not gradient_checkpointing:
        return None
    if policy not in REMAT_POLICIES:
        raise ConfigError(f"gradient_checkpointing_kwargs.policy {policy!r} is unknown; "
                          f"valid: {sorted(REMAT_POLICIES)}")
    return policy


def with_gradient_checkpointing(model: Any, policy: str | None) -> Any:
    """`model` rematerialising each layer under `policy`; refuses models without the option."""
    if policy is None:
        return model
    if not hasattr(getattr(model, "config", None), "remat_policy"):
        raise ConfigError(f"gradient_checkpointing needs a model whose config has a `remat_policy` option; "
                          f"{type(model).__name__} has none: set gradient_checkpointing=false")
    return model.with_options(remat_policy=policy)


@dataclass
class StepPlanResult:
    """Outcome of planning the train step: the batch that fits and its compiled executable."""

    per_device_batch: int
    compiled: Any  # the executable for per_device_batch (None when it must be compiled after a rebuild)
    estimate: MemoryEstimate | None
    limit: int | None
    limit_source: str
    probes: dict[int, MemoryEstimate | None] = field(default_factory=dict)  # batch -> estimate, all tried
    flops: float | None = None  # model FLOPs per device of one update at per_device_batch (jtrain.flop_count)


def longest_batch(host_batch: dict, length: int | None) -> dict | None:
    """`host_batch` ([k, rows, L, ...] token arrays) padded to `length` tokens, for planning memory
    at the longest padded length a run can meet; None when that is not longer than the batch's."""
    ids = host_batch.get("input_ids")
    if length is None or ids is None or ids.ndim < 3 or length <= ids.shape[2]:
        return None
    L = ids.shape[2]
    widths = lambda v: [(0, 0)] * 2 + [(0, length - L)] + [(0, 0)] * (v.ndim - 3)
    return {k: np.pad(v, widths(v)) if v.ndim >= 3 and v.shape[2] == L else v for k, v in host_batch.items()}


def plan_train_step(steps: Any, host_batch: dict, per_device_batch: int, data_parallel: int, *,
                    budget: int | None, auto_find: bool, longest: dict | None = None) -> StepPlanResult:
    """Compile the train step on abstract inputs, log its memory estimate, refuse or shrink it.

    With `auto_find` (HF's `auto_find_batch_size`) a batch that does not fit is searched down
    (`largest_fitting`) from the compiler's estimates of smaller batches, compiled with an
    uncounted twin of the step (`steps.probe_train_step`); no step ever runs out of memory.
    `longest` (see `longest_batch`): when batches are padded to several lengths, the decision is
    made at the longest one (with the twin), so that no later, longer batch runs out of memory;
    the first batch's shape is still compiled, for the run and its FLOP count.
    """
    limit, source = device_memory_limit(budget)

    flops: dict[int, float] = {}  # per-device batch -> model FLOPs per device, at the run's own shape

    def count(n: int, jitted: Any, batch: dict) -> None:
        # jit caches the trace, so a lower() after this does not trace again; that lower() must be
        # jit's own (not Traced.lower), or the loop's first call would compile a second time
        flops[n] = traced_flops(jitted.trace(steps.abstract_state, batch), steps.mesh.size)

    def compile_at(n: int, jitted: Any, host: dict) -> tuple[Any, MemoryEstimate | None]:
        batch = steps.abstract_train_batch(host, rows=n * data_parallel)
        if host is host_batch:  # the shape the run starts with (not a longer planning shape)
            count(n, jitted, batch)
        try:
            compiled = jitted.lower(steps.abstract_state, batch).compile()
        except ValueError as err:  # XLA:CPU has no float16 x float16 -> float32 matmul
            if "not supported" not in str(err) or steps.precision.compute_dtype != "float16":
                raise
            raise ConfigError(f"fp16 is not supported by this backend ({jax.default_backend()}): {err}. "
                              "Use bf16=true instead (or run fp16 on a GPU)") from err
        except jax.errors.JaxRuntimeError as err:
            refuse_failed_fused_attention(err)
            raise
        estimate = MemoryEstimate.from_compiled(compiled)
        ids = host.get("input_ids")
        length = f", rows of {ids.shape[2]} tokens" if ids is not None and ids.ndim >= 3 else ""
        logger.info("train step at per_device_train_batch_size=%d%s: %s; device memory %s (%s)", n, length,
                    estimate.describe() if estimate else "no estimate from this backend", fmt_bytes(limit), source)
        return compiled, estimate

    compiled, estimate = compile_at(per_device_batch, steps.train_step, host_batch)
    planned = host_batch  # the shape every fit decision is made at
    if longest is not None:
        planned = longest
        estimate = compile_at(per_device_batch, steps.probe_train_step, planned)[1]
    if fits(estimate, limit):
        return StepPlanResult(per_device_batch, compiled, estimate, limit, source, {per_device_batch: estimate},
                              flops.get(per_device_batch))
    if not auto_find:
        refuse_if_too_big(estimate, limit, source, per_device_batch=per_device_batch)
    estimates: dict[int, MemoryEstimate | None] = {per_device_batch: estimate}

    def fits_at(n: int) -> bool:
        if n not in estimates:
            estimates[n] = compile_at(n, steps.probe_train_step, planned)[1]
        return fits(estimates[n], limit)

    found = largest_fitting(fits_at, per_device_batch)
    if found is None:
        refuse_if_too_big(estimates[1], limit, source, per_device_batch=1)
    logger.warning("auto_find_batch_size: per_device_train_batch_size %d needs %s, more than %s (%s); using %d "
                   "(%s)", per_device_batch, fmt_bytes(estimate.peak), fmt_bytes(limit), source, found,
                   fmt_bytes(estimates[found].peak))
    if found not in flops:  # planned at a longer shape: count the run's own shape (a trace, no compile)
        count(found, steps.train_step, steps.abstract_train_batch(host_batch, rows=found * data_parallel))
    return StepPlanResult(found, None, estimates[found], limit, source, estimates, flops[found])


def eval_memory_metrics(trainer: Any, phase: str) -> dict[str, int]:
    """End an evaluation phase; on backends without statistics, estimate from the eval executable."""
    tracker = tracker_for(trainer)
    if not tracker.enabled or tracker.phase != phase:
        return {}
    batches = trainer.steps.compile_log.batches.get("eval") if trainer.steps is not None else None
    if device_memory_stats() is None and batches:
        compiled = trainer.steps.compile_eval(trainer.train_state.full_params(), batches[-1])
        tracker.note_estimate(phase, MemoryEstimate.from_compiled(compiled))
    return tracker.stop(phase)
