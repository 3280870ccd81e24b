"""Learning-rate schedules with Hugging Face `get_scheduler` semantics, as optax schedules.

Why this module exists: a user who sets `lr_scheduler_type="cosine"` and `warmup_steps=0.1` must get
the same learning rate at every step as HF's `Trainer`. HF steps `optimizer.step()` and then
`scheduler.step()`, so update number k (0-based) uses `learning_rate * lr_lambda(k)`; an optax
schedule receives the count of updates already applied, which is the same k. Every formula below
follows `transformers.optimization` operation by operation (same divisions, same clamps, same edge
cases), so in float64 the values agree to the last few bits; in float32 (the default) they agree to
float32 rounding relative to the peak learning rate.

Metric-driven schedules (`reduce_lr_on_plateau`, `greedy`) have a constant compiled part; their
learning-rate multiplier lives on the host in a controller (`PlateauController`, `GreedyController`)
and is fed to the compiled step as an input, so changing it never recompiles.

Example:
    >>> sched = make_schedule("linear", learning_rate=1e-3, num_training_steps=100, num_warmup_steps=10)
    >>> round(float(sched(5)), 9)  # halfway through warmup
    0.0005
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jtrain.coerce import closest_key_hint
from jtrain.errors import ConfigError

# A multiplier maps the float step (already cast) to HF's lr_lambda value, computed with the array module
# `xp` it is given: jax.numpy in the compiled step, numpy (float64) for the rate the host logs.
Multiplier = Callable[[Any, Any], Any]
_Builder = Callable[[int, int, float, dict[str, Any]], Multiplier]

_CYCLES = {"num_cycles": 0.5}
_MIN_LR = {"num_cycles": 0.5, "min_lr": None, "min_lr_rate": None}
_WSD_DEFAULTS: dict[str, Any] = {
    "num_decay_steps": None,
    "num_stable_steps": None,
    "warmup_type": "linear",
    "decay_type": "cosine",
    "min_lr_ratio": 0.0,
    "num_cycles": 0.5,
}
_WSD_SHAPES = ("linear", "cosine", "1-sqrt")


def resolve_warmup_steps(warmup_steps: int | float, num_training_steps: int) -> int:
    """HF's `TrainingArguments.get_warmup_steps`: a number >= 1 is a count, a float in [0, 1) a ratio.

    A ratio is rounded up (`ceil`) as HF does, so a small positive ratio never gives zero warmup.
    A non-integral count such as 2.5 is rejected rather than silently truncated as HF does.
    """
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, (int, float)):
        raise ConfigError(f"warmup_steps must be a count or a ratio in [0, 1), got {warmup_steps!r}")
    if not math.isfinite(warmup_steps) or warmup_steps < 0:
        raise ConfigError(f"warmup_steps must be >= 0 (a count, or a ratio in [0, 1)), got {warmup_steps!r}")
    if warmup_steps >= 1:
        if float(warmup_steps).is_integer():
            return int(warmup_steps)
        raise ConfigError(
            f"warmup_steps={warmup_steps!r} is neither a whole step count (>= 1) nor a ratio in [0, 1)"
        )
    return math.ceil(num_training_steps * warmup_steps)


def _warm(s: Any, w: int) -> Any:
    """HF's linear warmup `float(step) / float(max(1, warmup))`: 0 at step 0, never 1 inside warmup."""
    return s / float(max(1, w))


def _half_cosine(c: float, progress: Any, xp: Any) -> Any:
    """`0.5 * (1 + cos(c * progress))` with HF's operation order (c folds pi, cycles and 2)."""
    return 0.5 * (1.0 + xp.cos(c * progress))


def _constant(w: int, total: int, lr: float, kw: dict[str, Any]) -> Multiplier:
    return lambda s, xp: xp.ones_like(s)


def _constant_with_warmup(w: int, total: int, lr: float, kw: dict[str, Any]) -> Multiplier:
    return lambda s, xp: xp.where(s < w, s / max(1.0, float(w)), 1.0)


def _linear(w: int, total: int, lr: float, kw: dict[str, Any]) -> Multiplier:
    den = float(max(1, total - w))
    return lambda s, xp: xp.where(s < w, _warm(s, w), xp.maximum(0.0, (total - s) / den))


def _cosine(w: int, total: int, lr: float, kw: dict[str, Any]) -> Multiplier:
    den, c = float(max(1, total - w)), math.pi * float(kw["num_cycles"]) * 2.0

    def fn(s: Any, xp: Any) -> Any:
        return xp.where(s < w, _warm(s, w), xp.maximum(0.0, _half_cosine(c, (s - w) / den, xp)))

    return fn


def _cosine_with_restarts(w: int, total: int, lr: float, kw: dict[str, Any]) -> Multiplier:
    den, cycles = float(max(1, total - w)), float(kw["num_cycles"])

    def fn(s: Any, xp: Any) -> Any:
        progress = (s - w) / den
        value = xp.maximum(0.0, 0.5 * (1.0 + xp.cos(math.pi * xp.mod(cycles * progress, 1.0))))
        return xp.where(s < w, _warm(s, w), xp.where(progress >= 1.0, 0.0, value))

    return fn


def _polynomial(w: int, total: int, lr: float, kw: dict[str, Any]) -> Multiplier:
    lr_end, power = float(kw["lr_end"]), float(kw["power"])
    if not lr > lr_end:
        raise ConfigError(f"polynomial: lr_end ({lr_end}) must be smaller than learning_rate ({lr})")
    lr_range, decay_steps = lr - lr_end, float(max(1, total - w))  # HF divides by zero if total == warmup

    def fn(s: Any, xp: Any) -> Any:
        remaining = xp.maximum(0.0, 1.0 - (s - w) / decay_steps)  # clamp only guards the unused branch
        decay = (lr_range * remaining**power + lr_end) / lr
        return xp.where(s < w, _warm(s, w), xp.where(s > total, lr_end / lr, decay))

    return fn


def _inverse_sqrt(w: int, total: int, lr: float, kw: dict[str, Any]) -> Multiplier:
    timescale = kw["timescale"]
    timescale = float(timescale if timescale is not None else (w or 10_000))
    shift = timescale - w

    def fn(s: Any, xp: Any) -> Any:
        arg = xp.maximum((s + shift) / timescale, xp.finfo(s.dtype).tiny)  # guards the unused branch
        return xp.where(s < w, _warm(s, w), 1.0 / xp.sqrt(arg))

    return fn


def _min_lr_rate(name: str, lr: float, kw: dict[str, Any]) -> float:
    """HF takes exactly one of `min_lr` (absolute) or `min_lr_rate` (fraction of learning_rate)."""
    if kw["min_lr"] is not None and kw["min_lr_rate"] is not None:
        raise ConfigError(f"{name}: set only one of min_lr or min_lr_rate in lr_scheduler_kwargs")
    if kw["min_lr"] is not None:
        return float(kw["min_lr"]) / lr
    if kw["min_lr_rate"] is None:
        raise ConfigError(f"{name}: set one of min_lr or min_lr_rate in lr_scheduler_kwargs")
    return float(kw["min_lr_rate"])


def _cosine_with_min_lr(w: int, total: int, lr: float, kw: dict[str, Any]) -> Multiplier:
    rate = _min_lr_rate("cosine_with_min_lr", lr, kw)
    den, c = float(max(1, total - w)), math.pi * float(kw["num_cycles"]) * 2.0

    def fn(s: Any, xp: Any) -> Any:
        factor = _half_cosine(c, (s - w) / den, xp) * (1 - rate) + rate
        return xp.where(s < w, _warm(s, w), xp.maximum(0.0, factor))

    return fn


def _cosine_warmup_with_min_lr(w: int, total: int, lr: float, kw: dict[str, Any]) -> Multiplier:
    """HF's lr_rate variant: warmup starts above 0 and the decay is shifted one step earlier."""
    rate = _min_lr_rate("cosine_warmup_with_min_lr", lr, kw)
    wlr = kw["warmup_lr_rate"]
    den, c = max(1.0, float(total - w)), math.pi * float(kw["num_cycles"]) * 2.0

    def warm(s: Any) -> Any:
        if wlr is None:
            return (s + 1.0) / max(1.0, float(w))
        return float(wlr) + (1.0 - float(wlr)) * s / max(1, w - 1)

    def fn(s: Any, xp: Any) -> Any:
        factor = _half_cosine(c, (s - w + 1.0) / den, xp) * (1 - rate) + rate
        return xp.where(s < w, warm(s), xp.maximum(0.0, factor))

    return fn


def _wsd_shape(kind: str, progress: Any, rising: bool, cycles: float, xp: Any) -> Any:
    """One warmup (rising) or decay shape of HF's warmup_stable_decay, before min_lr_ratio scaling."""
    if kind == "linear":
        return progress if rising else 1.0 - progress
    if kind == "cosine":
        if rising:
            return 0.5 * (1.0 - xp.cos(math.pi * progress))
        return _half_cosine(math.pi * cycles * 2.0, progress, xp)
    base = 1.0 - progress if rising else progress  # "1-sqrt"
    return 1.0 - xp.sqrt(xp.clip(base, 0.0, None))


def _warmup_stable_decay(w: int, total: int, lr: float, kw: dict[str, Any]) -> Multiplier:
    for key in ("warmup_type", "decay_type"):
        if kw[key] not in _WSD_SHAPES:
            raise ConfigError(f"warmup_stable_decay: {key}={kw[key]!r}; expected one of {_WSD_SHAPES}")
    if kw["num_decay_steps"] is None:
        raise ConfigError("warmup_stable_decay needs `num_decay_steps` in lr_scheduler_kwargs")
    decay = int(kw["num_decay_steps"])
    stable = kw["num_stable_steps"]
    stable = int(stable) if stable is not None else total - w - decay
    ratio, cycles = float(kw["min_lr_ratio"]), float(kw["num_cycles"])

    def fn(s: Any, xp: Any) -> Any:
        up = _wsd_shape(kw["warmup_type"], _warm(s, w), True, cycles, xp)
        down_p = (s - w - stable) / float(max(1, decay))
        down = _wsd_shape(kw["decay_type"], down_p, False, cycles, xp)
        up, down = (xp.maximum(0.0, x * (1.0 - ratio) + ratio) for x in (up, down))
        tail = xp.where(s < w + stable + decay, down, ratio)
        return xp.where(s < w, up, xp.where(s < w + stable, 1.0, tail))

    return fn


_PLATEAU_DEFAULTS: dict[str, Any] = {
    "mode": "min", "factor": 0.1, "patience": 10, "threshold": 1e-4,
    "threshold_mode": "rel", "cooldown": 0, "min_lr": 0.0, "eps": 1e-8,
}  # fmt: skip
_GREEDY_DEFAULTS: dict[str, Any] = {
    "mode": "min", "factor": 0.95, "patience": 10, "threshold": 1e-6, "threshold_mode": "abs",
    "cooldown": 0, "warmup": 0, "min_lr": 1e-3, "max_lr": 1.0, "eps": 1e-8, "verbose": False,
    "smooth": False, "window_size": 50, "reset_start": 500,
}  # fmt: skip

# name -> (builder, the lr_scheduler_kwargs it accepts with HF's defaults)
_REGISTRY: dict[str, tuple[_Builder, dict[str, Any]]] = {
    "linear": (_linear, {}),
    "cosine": (_cosine, _CYCLES),
    "cosine_with_restarts": (_cosine_with_restarts, {"num_cycles": 1}),
    "polynomial": (_polynomial, {"lr_end": 1e-7, "power": 1.0}),
    "constant": (_constant, {}),
    "constant_with_warmup": (_constant_with_warmup, {}),
    "inverse_sqrt": (_inverse_sqrt, {"timescale": None}),
    "reduce_lr_on_plateau": (_constant, _PLATEAU_DEFAULTS),
    "cosine_with_min_lr": (_cosine_with_min_lr, _MIN_LR),
    "cosine_warmup_with_min_lr": (_cosine_warmup_with_min_lr, {**_MIN_LR, "warmup_lr_rate": None}),
    "warmup_stable_decay": (_warmup_stable_decay, _WSD_DEFAULTS),
    "greedy": (_constant, _GREEDY_DEFAULTS),
}
SCHEDULE_NAMES: tuple[str, ...] = tuple(_REGISTRY)
# HF ignores warmup for these: their compiled part is a constant learning rate.
_NO_WARMUP = frozenset({"constant", "reduce_lr_on_plateau", "greedy"})


def _merged_kwargs(name: str, scheduler_kwargs: dict | None) -> dict[str, Any]:
    """HF's defaults overlaid with the user's kwargs; an unknown kwarg is a ConfigError naming it."""
    if name not in _REGISTRY:
        raise ConfigError(
            f"unknown lr_scheduler_type {name!r}{closest_key_hint(str(name), SCHEDULE_NAMES)}; "
            f"valid names: {', '.join(SCHEDULE_NAMES)}"
        )
    defaults = _REGISTRY[name][1]
    for key in scheduler_kwargs or {}:
        if key not in defaults:
            valid = ", ".join(defaults) or "none"
            raise ConfigError(
                f"unknown lr_scheduler_kwargs key {key!r} for {name!r}"
                f"{closest_key_hint(key, defaults)}; valid kwargs: {valid}"
            )
    return {**defaults, **(scheduler_kwargs or {})}


def make_schedule(
    name: str,
    *,
    learning_rate: float,
    num_training_steps: int,
    num_warmup_steps: int = 0,
    scheduler_kwargs: dict | None = None,
) -> HFSchedule:
    """The optax schedule whose value at update count t is HF `get_scheduler`'s lr after t steps.

    It is jit-traceable with a traced integer step and computes in the default float dtype
    (float32, or float64 under `jax.enable_x64`). Steps are exact as floats up to 2**24 in float32.
    """
    name = str(getattr(name, "value", name))  # accept HF's SchedulerType enum as well as a string
    kw = _merged_kwargs(name, scheduler_kwargs)
    if isinstance(num_warmup_steps, bool) or not isinstance(num_warmup_steps, int) or num_warmup_steps < 0:
        hint = "(a ratio goes through resolve_warmup_steps first)"
        raise ConfigError(f"num_warmup_steps must be an int >= 0, got {num_warmup_steps!r} {hint}")
    warmup = 0 if name in _NO_WARMUP else num_warmup_steps
    return HFSchedule(_REGISTRY[name][0](warmup, int(num_training_steps), float(learning_rate), kw),
                      float(learning_rate))


class HFSchedule:
    """An optax schedule (`schedule(count)`, jit-traceable) that also gives its value on the host in float64
    (`host(count)`), the Python-float rate HF's LambdaLR holds and its Trainer logs."""

    def __init__(self, multiplier: Multiplier, learning_rate: float) -> None:
        self.multiplier, self.learning_rate = multiplier, learning_rate

    def __call__(self, step: jax.Array | int) -> jax.Array:
        s = jnp.asarray(step).astype(jnp.result_type(float))
        return self.learning_rate * self.multiplier(s, jnp)  # LambdaLR: base_lr * lr_lambda(step)

    def host(self, step: int) -> float:
        with np.errstate(all="ignore"):  # both sides of a `where` are computed, as in the compiled step
            return float(self.learning_rate * self.multiplier(np.float64(step), np))


class _MetricController:
    """Shared host-side state of a metric-driven schedule; it tracks the lr exactly as torch does.

    The compiled step multiplies the constant schedule by `factor` (= current lr / learning_rate),
    so the lr applied equals torch's `param_groups[0]["lr"]` up to one float rounding.
    """

    _NAME = ""  # the schedule name whose lr_scheduler_kwargs this controller accepts

    def __init__(self, learning_rate: float, **kwargs: Any) -> None:
        cfg = _merged_kwargs(self._NAME, kwargs)
        if not cfg["factor"] < 1.0:
            raise ConfigError(f"{self._NAME}: factor must be < 1.0, got {cfg['factor']}")
        if cfg["mode"] not in ("min", "max") or cfg["threshold_mode"] not in ("rel", "abs"):
            raise ConfigError(f"{self._NAME}: mode must be min|max and threshold_mode rel|abs, got {cfg}")
        self.learning_rate = float(learning_rate)
        self.config = cfg
        self.lr = self.learning_rate
        self.best = math.inf if cfg["mode"] == "min" else -math.inf
        self.num_bad_epochs = 0
        self.cooldown_counter = 0
        self.last_epoch = 0

    @property
    def factor(self) -> float:
        """The multiplier for the compiled step's learning rate (1.0 until the first reduction)."""
        return self.lr / self.learning_rate if self.learning_rate else 1.0

    def is_better(self, current: float, best: float) -> bool:
        """torch's `_is_better`: an improvement must beat `best` by the (rel or abs) threshold."""
        t, rel = self.config["threshold"], self.config["threshold_mode"] == "rel"
        if self.config["mode"] == "min":
            return current < (best * (1.0 - t) if rel else best - t)
        return current > (best * (1.0 + t) if rel else best + t)

    def state_dict(self) -> dict[str, Any]:
        """Plain (JSON-friendly, inf allowed) state for checkpoints."""
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in vars(self).items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `state_dict()`; the config saved with it wins, as in torch."""
        for key, value in state.items():
            setattr(self, key, dict(value) if isinstance(value, dict) else value)


class PlateauController(_MetricController):
    """torch `ReduceLROnPlateau` (HF's reduce_lr_on_plateau) on the host, as an lr multiplier.

    Example:
        >>> ctl = PlateauController(1e-3, patience=0)
        >>> ctl.step(1.0), ctl.step(2.0)  # baseline, then one bad evaluation
        (1.0, 0.1)
    """

    _NAME = "reduce_lr_on_plateau"

    def step(self, metric: float) -> float:
        """Feed one evaluation metric (HF steps after each evaluate); return the new factor."""
        current, cfg = float(metric), self.config
        self.last_epoch += 1
        if self.is_better(current, self.best):
            self.best, self.num_bad_epochs = current, 0
        else:
            self.num_bad_epochs += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0
        if self.num_bad_epochs > cfg["patience"]:
            new_lr = max(self.lr * cfg["factor"], cfg["min_lr"])
            if self.lr - new_lr > cfg["eps"]:
                self.lr = new_lr
            self.cooldown_counter, self.num_bad_epochs = cfg["cooldown"], 0
        return self.factor


class GreedyController(_MetricController):
    """HF's `GreedyLR` (lr_scheduler_type="greedy") on the host, as an lr multiplier.

    Unlike plateau it also raises the lr (divides by `factor`) after `patience` improvements, and
    resets to the initial lr after `reset_start` reductions spent at `min_lr`. `min_lr`/`max_lr` are
    absolute learning rates, as in HF. `verbose` is accepted for config compatibility and ignored.
    """

    _NAME = "greedy"

    def __init__(self, learning_rate: float, **kwargs: Any) -> None:
        super().__init__(learning_rate, **kwargs)
        self.num_good_epochs = 0
        self.warmup_counter = 0
        self.reset_start = int(self.config["reset_start"])
        self.window: list[float] = []
        self.window_sum = 0.0

    def _smoothed(self, value: float) -> float:
        """HF's StreamingAverage: the mean of the last `window_size` metrics (same float ops)."""
        self.window.append(value)
        self.window_sum += value
        if len(self.window) > self.config["window_size"]:
            self.window_sum -= self.window.pop(0)
        return self.window_sum / len(self.window)

    def step(self, metric: float) -> float:
        """Feed one evaluation metric; return the new factor."""
        current, cfg = float(metric), self.config
        if cfg["smooth"]:
            current = self._smoothed(current)
        self.last_epoch += 1
        if self.cooldown_counter > 0 or self.warmup_counter > 0:
            if self.cooldown_counter > 0:
                self.cooldown_counter -= 1
            else:
                self.warmup_counter -= 1
            self.num_bad_epochs = self.num_good_epochs = 0
            return self.factor
        if self.is_better(current, self.best):
            self.best, self.num_bad_epochs = current, 0
            self.num_good_epochs += 1
        else:
            self.num_bad_epochs, self.num_good_epochs = self.num_bad_epochs + 1, 0
        if self.num_good_epochs > cfg["patience"]:
            self._increase()
            self.warmup_counter, self.num_good_epochs = cfg["warmup"], 0
        elif self.num_bad_epochs > cfg["patience"]:
            self._reduce()
            self.cooldown_counter, self.num_bad_epochs = cfg["cooldown"], 0
        return self.factor

    def _increase(self) -> None:
        new_lr = min(self.lr / self.config["factor"], self.config["max_lr"])
        if new_lr - self.lr > self.config["eps"]:
            self.lr = new_lr
        self.reset_start = int(self.config["reset_start"])

    def _reduce(self) -> None:
        new_lr = max(self.lr * self.config["factor"], self.config["min_lr"])
        if self.lr - new_lr > self.config["eps"]:
            self.lr = new_lr
        if not self.lr > self.config["min_lr"]:
            self.reset_start -= 1
            if self.reset_start <= 0:
                self._reset()

    def _reset(self) -> None:
        """Back to the initial lr and a fresh metric history (HF's `_reset`)."""
        self.lr = self.learning_rate
        self.best = math.inf if self.config["mode"] == "min" else -math.inf
        self.num_bad_epochs = self.num_good_epochs = 0
        self.cooldown_counter = self.warmup_counter = 0
        self.reset_start = int(self.config["reset_start"])
        self.window, self.window_sum = [], 0.0


def make_lr_controller(
    name: str, *, learning_rate: float, scheduler_kwargs: dict | None = None
) -> PlateauController | GreedyController | None:
    """The host-side controller for a metric-driven schedule, or None for a pure step schedule.

    The Trainer calls `controller.step(metrics[metric_for_best_model])` after each evaluation, as
    HF does, and feeds `controller.factor` into the compiled step.
    """
    name = str(getattr(name, "value", name))
    _merged_kwargs(name, scheduler_kwargs)  # validates the name and the kwargs
    kinds = {"reduce_lr_on_plateau": PlateauController, "greedy": GreedyController}
    if name not in kinds:
        return None
    return kinds[name](learning_rate, **(scheduler_kwargs or {}))
