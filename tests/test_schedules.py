"""jtrain.schedules against the reference: transformers.get_scheduler / ReduceLROnPlateau / GreedyLR.

Precision, once for the whole file. HF computes every learning rate in Python float64
(`base_lr * lr_lambda(step)`). The schedule follows HF's operation order, so in float64 it agrees
to ~1e-14 relative (XLA's cos/sqrt may differ from libm by a few ulp); the issue's rtol=1e-6 is
therefore checked under `jax.enable_x64`, where it holds with a wide margin at every step,
including the zeros of the cosine. In float32 (what the Trainer runs by default) a relative bound
cannot hold near those zeros: `0.5 * (1 + cos(x))` cancels, and float32 rounding of x alone
(|x| <= pi * num_cycles) moves the value by ~|x| * eps32 absolute. So the float32 test bounds the
error in units of the peak learning rate instead (see `F32_ATOL_IN_LR`).
"""

from __future__ import annotations

import json
import math
import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from transformers.optimization import GreedyLR

from jtrain.errors import ConfigError
from jtrain.schedules import (
    SCHEDULE_NAMES,
    GreedyController,
    PlateauController,
    make_lr_controller,
    make_schedule,
    resolve_warmup_steps,
)

# HF warns when a WSD case sets both num_training_steps and num_stable_steps; that case is intended.
pytestmark = pytest.mark.filterwarnings("ignore:Both num_training_steps and num_stable_steps:UserWarning")

LR = 1e-3
TOTAL = 100
# The tolerance; it holds in float64 (module docstring): both sides round the same ops.
RTOL, ATOL = 1e-6, 1e-12
# float32: the largest error term is the rounding of the cosine argument, <= 3*pi/2 * eps32 for
# num_cycles <= 3, plus a few eps32 from the divisions and the final product; 8 * eps32 of the
# peak learning rate bounds their sum (observed worst: ~3.9e-7 * LR, restarts with 3 cycles).
F32_ATOL_IN_LR = 8 * float(np.finfo(np.float32).eps)

# (name, num_warmup_steps, lr_scheduler_kwargs): every HF name plus the kwargs that change shapes.
CASES: list[tuple[str, int, dict[str, Any]]] = [
    ("linear", 10, {}),
    ("linear", 0, {}),
    ("cosine", 10, {}),
    ("cosine", 0, {"num_cycles": 1.5}),
    ("cosine_with_restarts", 10, {}),
    ("cosine_with_restarts", 10, {"num_cycles": 3}),
    ("polynomial", 10, {}),
    ("polynomial", 10, {"power": 2.0, "lr_end": 1e-5}),
    ("polynomial", 5, {"power": 0.5, "lr_end": 1e-4}),
    ("constant", 10, {}),  # HF ignores warmup for constant
    ("constant_with_warmup", 10, {}),
    ("inverse_sqrt", 10, {}),
    ("inverse_sqrt", 10, {"timescale": 25}),
    ("inverse_sqrt", 0, {}),  # timescale falls back to 10_000
    ("reduce_lr_on_plateau", 10, {"patience": 3}),
    ("cosine_with_min_lr", 10, {"min_lr": 1e-5}),
    ("cosine_with_min_lr", 10, {"min_lr_rate": 0.1, "num_cycles": 1.0}),
    ("cosine_warmup_with_min_lr", 10, {"min_lr_rate": 0.1}),
    ("cosine_warmup_with_min_lr", 10, {"min_lr": 1e-5, "warmup_lr_rate": 0.05}),
    ("warmup_stable_decay", 10, {"num_decay_steps": 30}),
    ("warmup_stable_decay", 10, {"num_decay_steps": 30, "decay_type": "linear", "min_lr_ratio": 0.1}),
    ("warmup_stable_decay", 10, {"num_decay_steps": 20, "decay_type": "1-sqrt", "warmup_type": "1-sqrt"}),
    ("warmup_stable_decay", 8, {"num_decay_steps": 20, "num_stable_steps": 50, "warmup_type": "cosine"}),
    ("greedy", 10, {}),
]


def _case_id(case: tuple[str, int, dict[str, Any]]) -> str:
    name, warmup, kw = case
    return f"{name}-w{warmup}-" + "-".join(f"{k}={v}" for k, v in kw.items())


def _hf_lrs(name: str, warmup: int, kw: dict[str, Any], steps: int = TOTAL) -> np.ndarray:
    """The lr HF's Trainer uses for updates 0..steps-1: read it, optimizer.step(), scheduler.step()."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=LR)
    sched = transformers.get_scheduler(
        name, opt, num_warmup_steps=warmup, num_training_steps=TOTAL, scheduler_specific_kwargs=dict(kw)
    )
    metric_driven = name in ("reduce_lr_on_plateau", "greedy")  # HF steps these only after evaluate
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        param.grad = torch.ones(1)
        opt.step()
        if not metric_driven:
            sched.step()
    return np.asarray(lrs, dtype=np.float64)


def _ours(name: str, warmup: int, kw: dict[str, Any], steps: int = TOTAL) -> np.ndarray:
    """Our schedule at 0..steps-1, jitted with a traced int32 step (what optax passes)."""
    sched = make_schedule(
        name, learning_rate=LR, num_training_steps=TOTAL, num_warmup_steps=warmup, scheduler_kwargs=kw
    )
    return np.asarray(jax.jit(jax.vmap(sched))(jnp.arange(steps, dtype=jnp.int32)), dtype=np.float64)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_hf_float64(case: tuple[str, int, dict[str, Any]]) -> None:
    name, warmup, kw = case
    expected = _hf_lrs(name, warmup, kw)
    with jax.enable_x64(True):
        got = _ours(name, warmup, kw)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_host_value_is_hfs_python_float(case: tuple[str, int, dict[str, Any]]) -> None:
    """`HFSchedule.host`, the rate the Trainer logs: numpy float64 through the same formulas, bit for bit
    the Python floats torch's LambdaLR holds (measured: every case, every step)."""
    name, warmup, kw = case
    sched = make_schedule(name, learning_rate=LR, num_training_steps=TOTAL, num_warmup_steps=warmup,
                          scheduler_kwargs=kw)
    assert [sched.host(k) for k in range(TOTAL)] == _hf_lrs(name, warmup, kw).tolist()


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_hf_float32(case: tuple[str, int, dict[str, Any]]) -> None:
    name, warmup, kw = case
    got = _ours(name, warmup, kw)
    np.testing.assert_allclose(got, _hf_lrs(name, warmup, kw), rtol=0, atol=F32_ATOL_IN_LR * LR)


def test_beyond_training_steps_matches_hf() -> None:
    """Steps past num_training_steps keep HF's shape (polynomial holds lr_end, restarts give 0)."""
    cases = [
        ("polynomial", 10, {"lr_end": 1e-5}),
        ("cosine_with_restarts", 10, {"num_cycles": 2}),
        ("cosine", 10, {}),
        ("linear", 10, {}),
        ("warmup_stable_decay", 10, {"num_decay_steps": 30}),
    ]
    for name, warmup, kw in cases:
        expected = _hf_lrs(name, warmup, kw, steps=130)
        with jax.enable_x64(True):
            got = _ours(name, warmup, kw, steps=130)
        np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL, err_msg=name)  # as above


@pytest.mark.parametrize("ratio", [0.1, 0.05, 0.033, 0.0])
def test_warmup_ratio_matches_hf(ratio: float) -> None:
    """A float warmup is a ratio, rounded up as HF's TrainingArguments.get_warmup_steps does."""
    hf_args = types.SimpleNamespace(warmup_steps=ratio)  # get_warmup_steps reads only this field
    hf_warmup = transformers.TrainingArguments.get_warmup_steps(hf_args, TOTAL)
    warmup = resolve_warmup_steps(ratio, TOTAL)
    assert warmup == hf_warmup
    with jax.enable_x64(True):
        got = _ours("linear", warmup, {})
    np.testing.assert_allclose(got, _hf_lrs("linear", hf_warmup, {}), rtol=RTOL, atol=ATOL)  # as above


def test_resolve_warmup_steps_counts_and_errors() -> None:
    assert resolve_warmup_steps(7, TOTAL) == 7
    assert resolve_warmup_steps(7.0, TOTAL) == 7
    assert resolve_warmup_steps(0, TOTAL) == 0
    assert resolve_warmup_steps(0.001, TOTAL) == 1  # ceil: a positive ratio never rounds to zero
    for bad in (-1, -0.5, 1.5, float("nan"), True, "3"):
        with pytest.raises(ValueError, match="warmup_steps"):
            resolve_warmup_steps(bad, TOTAL)  # type: ignore[arg-type]


def test_schedule_names_cover_hf_scheduler_type() -> None:
    assert set(SCHEDULE_NAMES) == {s.value for s in transformers.SchedulerType}


def test_optax_count_is_the_update_index() -> None:
    """optax passes the number of updates already applied, so update k uses schedule(k) = HF's lr."""
    sched = make_schedule("linear", learning_rate=LR, num_training_steps=TOTAL, num_warmup_steps=10)
    tx = optax.scale_by_schedule(sched)
    state = tx.init(jnp.zeros(()))
    update = jax.jit(tx.update)
    for k in range(12):
        scaled, state = update(jnp.ones(()), state)
        # same float32 program evaluated twice: bitwise equal, so exact comparison
        assert float(scaled) == float(jax.jit(sched)(jnp.int32(k)))


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown lr_scheduler_type 'cosin'.*did you mean `cosine`") as err:
        make_schedule("cosin", learning_rate=LR, num_training_steps=TOTAL)
    assert all(name in str(err.value) for name in SCHEDULE_NAMES)


@pytest.mark.parametrize(
    ("name", "kw", "bad", "valid"),
    [
        ("linear", {"num_cycles": 2}, "num_cycles", "none"),
        ("cosine", {"num_cycle": 2}, "num_cycle", "num_cycles"),
        ("polynomial", {"lr_ed": 1e-6}, "lr_ed", "lr_end, power"),
        ("reduce_lr_on_plateau", {"patiance": 2}, "patiance", "patience"),
        ("warmup_stable_decay", {"num_decay_steps": 5, "min_lr_rate": 0.1}, "min_lr_rate", "min_lr_ratio"),
    ],
)
def test_unknown_kwarg_names_it_and_valid_ones(name: str, kw: dict, bad: str, valid: str) -> None:
    with pytest.raises(ValueError, match=f"unknown lr_scheduler_kwargs key '{bad}' for '{name}'.*{valid}"):
        make_schedule(name, learning_rate=LR, num_training_steps=TOTAL, scheduler_kwargs=kw)


@pytest.mark.parametrize(
    ("name", "kw", "match"),
    [
        ("cosine_with_min_lr", {}, "one of min_lr or min_lr_rate"),
        ("cosine_with_min_lr", {"min_lr": 1e-5, "min_lr_rate": 0.1}, "only one of"),
        ("warmup_stable_decay", {}, "num_decay_steps"),
        ("warmup_stable_decay", {"num_decay_steps": 5, "decay_type": "exp"}, "decay_type"),
        ("polynomial", {"lr_end": 1e-2}, "lr_end"),
        ("reduce_lr_on_plateau", {"factor": 1.5}, "factor"),
    ],
)
def test_invalid_kwarg_values(name: str, kw: dict, match: str) -> None:
    """What the Trainer builds for a name: the schedule, then the host controller if any."""
    with pytest.raises(ConfigError, match=match):
        make_schedule(name, learning_rate=LR, num_training_steps=TOTAL, scheduler_kwargs=kw)
        make_lr_controller(name, learning_rate=LR, scheduler_kwargs=kw)  # only reached for plateau


def _metrics(n: int, seed: int) -> list[float]:
    """Noisy, mostly-decreasing then flat metrics: improvements, plateaus and ties all occur."""
    rng = np.random.default_rng(seed)
    trend = np.concatenate([np.linspace(2.0, 1.0, n // 2), np.full(n - n // 2, 1.0)])
    values = trend + rng.normal(0.0, 0.02, n)
    values[5] = values[4]  # an exact tie is not an improvement
    return [float(v) for v in values]


PLATEAU_KWARGS = [
    {},
    {"patience": 1, "factor": 0.5, "cooldown": 2, "min_lr": 2e-4},
    {"mode": "max", "threshold_mode": "abs", "threshold": 0.01, "patience": 2},
    {"patience": 0, "factor": 0.9, "eps": 5e-5},  # eps blocks reductions smaller than 5e-5
]


def _check_controller_vs_torch(ctl: Any, sched: Any, metrics: list[float]) -> None:
    """Same float64 ops on the same lr: `lr` is bitwise equal; `factor * LR` is two roundings off."""
    for i, metric in enumerate(metrics):
        factor = ctl.step(metric)
        sched.step(metric)
        torch_lr = sched.optimizer.param_groups[0]["lr"]
        assert ctl.lr == torch_lr, f"step {i}"
        # factor = lr / LR, then the step computes LR * factor: 2 float64 roundings <= 2.3e-16 rel
        assert factor * LR == pytest.approx(torch_lr, rel=1e-15, abs=0), f"step {i}"


@pytest.mark.parametrize("kw", PLATEAU_KWARGS)
def test_plateau_controller_matches_torch(kw: dict[str, Any]) -> None:
    metrics = _metrics(80, seed=0)
    if kw.get("mode") == "max":
        metrics = [-m for m in metrics]
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    ctl = make_lr_controller("reduce_lr_on_plateau", learning_rate=LR, scheduler_kwargs=kw)
    assert isinstance(ctl, PlateauController) and ctl.factor == 1.0
    _check_controller_vs_torch(ctl, torch.optim.lr_scheduler.ReduceLROnPlateau(opt, **kw), metrics)
    assert ctl.factor < 1.0  # the sequence really exercised a reduction


GREEDY_KWARGS = [
    {"patience": 2, "factor": 0.8, "min_lr": 1e-4, "max_lr": 2e-3},
    {"patience": 1, "factor": 0.5, "cooldown": 1, "warmup": 2, "min_lr": 3e-4, "reset_start": 3},
    {"patience": 2, "smooth": True, "window_size": 4, "threshold_mode": "rel", "threshold": 1e-3},
]


@pytest.mark.parametrize("kw", GREEDY_KWARGS)
def test_greedy_controller_matches_hf(kw: dict[str, Any]) -> None:
    metrics = _metrics(120, seed=1)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    ctl = make_lr_controller("greedy", learning_rate=LR, scheduler_kwargs=kw)
    assert isinstance(ctl, GreedyController)
    _check_controller_vs_torch(ctl, GreedyLR(opt, **kw), metrics)


@pytest.mark.parametrize("cls", [PlateauController, GreedyController])
def test_controller_state_dict_resumes_exactly(cls: type) -> None:
    kw = {"patience": 1, "factor": 0.5, "cooldown": 1}
    metrics = _metrics(60, seed=2)
    straight = cls(LR, **kw)
    expected = [straight.step(m) for m in metrics]
    first = cls(LR, **kw)
    got = [first.step(m) for m in metrics[:30]]
    resumed = cls(LR)  # config comes back from the checkpoint
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # through JSON, as on disk
    got += [resumed.step(m) for m in metrics[30:]]
    assert got == expected  # identical float64 ops in the same order: exact


def test_make_lr_controller_only_for_metric_schedules() -> None:
    assert make_lr_controller("cosine", learning_rate=LR) is None
    with pytest.raises(ValueError, match="patiance"):
        make_lr_controller("reduce_lr_on_plateau", learning_rate=LR, scheduler_kwargs={"patiance": 1})


def test_schedule_accepts_traced_step_and_enum() -> None:
    sched = make_schedule(transformers.SchedulerType.COSINE, learning_rate=LR, num_training_steps=TOTAL)
    value = jax.jit(sched)(jnp.int32(50))
    assert value.dtype == jnp.float32 and value.shape == ()
    # half-way through a half cosine is exactly 0.5 in exact arithmetic; float32 rounding, as above
    assert math.isclose(float(value), 0.5 * LR, rel_tol=F32_ATOL_IN_LR)
