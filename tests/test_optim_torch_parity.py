"""SGD, RMSprop and Adafactor against their torch/transformers implementations; Lion against
a float64 numpy transcription of the paper's update (test_optim_bnb.py: against bitsandbytes' Lion).

Every run goes through HF's loop (param groups, clip_grad_norm_, step, scheduler.step).
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from test_optim_problems import (
    TorchMLP,
    hf_param_groups,
    jax_params_from_torch,
    linear_warmup_decay,
    make_batches,
    max_abs_diff,
    run_jax,
    run_torch,
)
from transformers import get_linear_schedule_with_warmup
from transformers.optimization import Adafactor

from jtrain.optim import decay_mask, make_optimizer

STEPS, WARMUP, WD, CLIP = 10, 2, 0.05, 0.45
# 1e-5 absolute on O(1) params, float32 on both sides: the formulas are the same and only
# summation order differs (~1e-7 relative per op), over 10 steps. Measured slack is >10x.
TOL = 1e-5


def _compare(make_torch_opt, name: str, peak_lr: float, optim_args: str | None, schedule: bool = True,
             **optimizer_kw) -> float:
    """Max |jtrain - torch| after STEPS (`optimizer_kw`: make_optimizer's TrainingArguments-side values);
    also checks the run moved params far beyond TOL."""
    batches = make_batches(STEPS, seed=1)
    torch.manual_seed(1)
    model = TorchMLP()
    params0 = jax_params_from_torch(model)
    opt = make_torch_opt(hf_param_groups(model, WD), peak_lr)
    sched = get_linear_schedule_with_warmup(opt, WARMUP, STEPS) if schedule else None
    run_torch(model, opt, batches, CLIP, sched)
    lr = linear_warmup_decay(peak_lr, WARMUP, STEPS) if schedule else peak_lr
    ours = make_optimizer(name, lr, weight_decay=WD, max_grad_norm=CLIP, optim_args=optim_args, **optimizer_kw)
    params = run_jax(params0, ours, batches)
    moved = max_abs_diff(params0, model)
    assert moved > 100 * TOL, f"too little movement ({moved:.2g}) for the comparison to mean anything"
    return max_abs_diff(params, model)


@pytest.mark.parametrize(
    "optim_args, torch_kwargs",
    [
        ("momentum=0.9,nesterov=True", dict(momentum=0.9, nesterov=True)),
        ("momentum=0.8,dampening=0.3", dict(momentum=0.8, dampening=0.3)),
        (None, {}),
    ],
)
def test_sgd_matches_torch(optim_args, torch_kwargs) -> None:
    diff = _compare(lambda g, lr: torch.optim.SGD(g, lr=lr, **torch_kwargs), "sgd", 0.1, optim_args)
    assert diff <= TOL, diff


@pytest.mark.parametrize(
    "optim_args, torch_kwargs",
    [
        (None, {}),
        ("alpha=0.9,centered=true,momentum=0.5,eps=1e-6", dict(alpha=0.9, centered=True, momentum=0.5, eps=1e-6)),
    ],
)
def test_rmsprop_matches_torch(optim_args, torch_kwargs) -> None:
    diff = _compare(lambda g, lr: torch.optim.RMSprop(g, lr=lr, **torch_kwargs), "rmsprop", 1e-3, optim_args)
    assert diff <= TOL, diff


@pytest.mark.parametrize("optim_args, torch_kwargs", [(None, {}), ("alpha=0.9,eps=1e-6", dict(alpha=0.9, eps=1e-6))])
def test_rmsprop_bnb_32bit_is_torchs_rmsprop_without_momentum(optim_args, torch_kwargs) -> None:
    """bitsandbytes' 32-bit RMSprop (its reference kernel: s = alpha s + (1 - alpha) g^2, p -= lr g / (sqrt(s) +
    eps), decay added to g) is torch's RMSprop without momentum or centring; those two are refused."""
    from jtrain.errors import ConfigError

    for name in ("rmsprop_bnb", "rmsprop_bnb_32bit"):
        diff = _compare(lambda g, lr: torch.optim.RMSprop(g, lr=lr, **torch_kwargs), name, 1e-3, optim_args)
        assert diff <= TOL, (name, diff)
    for bad, match in (("momentum=0.9", "does not use it"), ("centered=true", "refuses it")):
        with pytest.raises(ConfigError, match=match):
            make_optimizer("rmsprop_bnb", 1e-3, optim_args=bad)


@pytest.mark.parametrize(
    "optim_args, torch_kwargs",
    [(None, {}), ("lr_decay=0.1,eps=1e-6", dict(lr_decay=0.1, eps=1e-6))],
)
def test_adagrad_matches_torch(optim_args, torch_kwargs) -> None:
    """HF's `adagrad` is torch.optim.Adagrad (lr_decay and eps from optim_args, L2 decay in the gradient);
    optax's adagrad differs (eps inside the sqrt, an accumulator starting at 0.1)."""
    diff = _compare(lambda g, lr: torch.optim.Adagrad(g, lr=lr, **torch_kwargs), "adagrad", 5e-2, optim_args)
    assert diff <= TOL, diff


@pytest.mark.parametrize("name, torch_class, kwargs", [
    ("schedule_free_adamw", "AdamWScheduleFree", dict(betas=(0.9, 0.999), eps=1e-8)),
    ("schedule_free_sgd", "SGDScheduleFree", dict(momentum=0.9)),
])
def test_schedule_free_matches_schedulefree_with_warmup_and_hfs_scheduler(name, torch_class, kwargs) -> None:
    """HF builds these from the `schedulefree` package, handing it TrainingArguments' warmup_steps, and still
    runs its scheduler. The training point y after 10 updates, with both warm-ups and a linear decay, matches.
    Before: jtrain's own warm-up started at rate 0 (schedulefree's at 1/warmup_steps), and optax's averaging
    weights read the rate one update ahead of the steps; with a varying rate both moved y by ~5e-3."""
    import schedulefree

    def make(groups, lr):
        opt = getattr(schedulefree, torch_class)(groups, lr=lr, weight_decay=WD, warmup_steps=3, r=0.0,
                                                weight_lr_power=2.0, **kwargs)
        opt.train()  # HF's Trainer puts it in train mode before the first step
        return opt

    assert _compare(make, name, 5e-2, "warmup_steps=3") <= TOL


@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.8, 0.95)])
def test_schedule_free_radam_matches_schedulefree_under_hfs_scheduler(betas) -> None:
    """HF builds RAdamScheduleFree with the adam betas and eps and no warm-up of its own. Over 10 updates
    its silent phase (rate 0 while rho_t <= 4: the first 4) and the rising rectification term both act.
    Before the rectification was formed stably, its float32 terms were 1e-4 off schedulefree's float64."""
    import schedulefree

    def make(groups, lr):
        opt = schedulefree.RAdamScheduleFree(groups, lr=lr, betas=betas, eps=1e-8, weight_decay=WD, r=0.0,
                                             weight_lr_power=2.0)
        opt.train()
        return opt

    assert _compare(make, "schedule_free_radam", 5e-2, None, adam_beta1=betas[0], adam_beta2=betas[1]) <= TOL


@pytest.mark.parametrize("optim_args, optimi_kwargs", [(None, {}), ("decouple_lr=true,max_lr=5e-2",
                                                                     dict(decouple_lr=True, max_lr=5e-2))])
def test_stable_adamw_matches_torch_optimi(optim_args, optimi_kwargs) -> None:
    """HF's `stable_adamw` is torch-optimi's StableAdamW with the adam betas and eps: debiased betas, the
    rate divided per tensor by its update RMS (clipping that acts here: the first steps' RMS is above 1),
    decay at that rate (or rate / max_lr)."""
    import optimi

    def make(groups, lr):
        with warnings.catch_warnings():  # optimi's advice that 0.05 is a large fully decoupled decay: known here
            warnings.simplefilter("ignore", UserWarning)
            return optimi.StableAdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=WD, foreach=False,
                                      **optimi_kwargs)

    assert _compare(make, "stable_adamw", 5e-2, optim_args) <= TOL


def test_stable_adamw_decouple_lr_takes_the_peak_rate_as_optimi_does() -> None:
    """optimi's decouple_lr without max_lr uses the rate it was built with (HF's learning_rate); under a
    schedule jtrain takes it from `peak_learning_rate` (the Trainer passes learning_rate), else refuses."""
    import optimi

    from jtrain.errors import ConfigError

    def make(groups, lr):
        with warnings.catch_warnings():  # optimi's advice that 0.05 is a large fully decoupled decay: known here
            warnings.simplefilter("ignore", UserWarning)
            return optimi.StableAdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=WD, foreach=False,
                                      decouple_lr=True)

    batches = make_batches(STEPS, seed=1)
    torch.manual_seed(1)
    model = TorchMLP()
    params0 = jax_params_from_torch(model)
    opt = make(hf_param_groups(model, WD), 5e-2)
    run_torch(model, opt, batches, CLIP, get_linear_schedule_with_warmup(opt, WARMUP, STEPS))
    schedule = linear_warmup_decay(5e-2, WARMUP, STEPS)
    ours = make_optimizer("stable_adamw", schedule, weight_decay=WD, max_grad_norm=CLIP, optim_args="decouple_lr=true",
                          peak_learning_rate=5e-2)
    assert max_abs_diff(run_jax(params0, ours, batches), model) <= TOL
    with pytest.raises(ConfigError, match="needs max_lr"):
        make_optimizer("stable_adamw", schedule, optim_args="decouple_lr=true")


def test_adafactor_matches_transformers_with_trainer_defaults() -> None:
    """HF's Trainer: Adafactor(lr=..., scale_parameter=False, relative_step=False) + scheduler."""

    def make(groups, lr):
        return Adafactor(groups, lr=lr, scale_parameter=False, relative_step=False)

    assert _compare(make, "adafactor", 1e-2, None) <= TOL


def test_adafactor_matches_transformers_relative_step_and_momentum() -> None:
    """Adafactor's own defaults (relative step, parameter scale) plus a first moment."""

    def make(groups, lr):
        del lr
        return Adafactor(groups, lr=None, scale_parameter=True, relative_step=True, beta1=0.9)

    args = "scale_parameter=True,relative_step=True,beta1=0.9"
    assert _compare(make, "adafactor", 1.0, args, schedule=False) <= TOL


def _lion_numpy(params, batches, lr, b1, b2, wd):
    """Lion (Chen et al. 2023) in float64 with torch-style clipping and decoupled decay."""
    import jax

    from test_optim_problems import jax_loss

    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    m = jax.tree.map(np.zeros_like, p)
    mask = decay_mask(params)
    grad_fn = jax.jit(jax.grad(jax_loss))
    for x, y in batches:
        g = jax.tree.map(lambda a: np.asarray(a, np.float64), grad_fn(jax.tree.map(np.float32, p), x, y))
        norm = np.sqrt(sum(np.sum(a * a) for a in jax.tree.leaves(g)))
        coef = min(1.0, CLIP / (norm + 1e-6))
        g = jax.tree.map(lambda a: a * coef, g)
        u = jax.tree.map(lambda mi, gi: np.sign(b1 * mi + (1 - b1) * gi), m, g)
        p = jax.tree.map(lambda pi, ui, di: pi - lr * (ui + (wd * pi if di else 0.0)), p, u, mask)
        m = jax.tree.map(lambda mi, gi: b2 * mi + (1 - b2) * gi, m, g)
    return p


def test_lion_matches_float64_reference() -> None:
    """HF passes (adam_beta1, adam_beta2) as Lion's betas; so does jtrain."""
    batches = make_batches(STEPS, seed=2)
    torch.manual_seed(2)
    params0 = jax_params_from_torch(TorchMLP())
    ref = _lion_numpy(params0, batches, 1e-3, 0.9, 0.999, WD)
    for name in ("lion", "lion_32bit"):
        opt = make_optimizer(name, 1e-3, weight_decay=WD, max_grad_norm=CLIP)
        got = run_jax(params0, opt, batches)
        # Each Lion step moves every weight by exactly +-lr (plus decay), so float32 vs
        # float64 differ only by rounding of p (~1e-7); a flipped sign would cost 2e-3.
        diff = max(float(np.max(np.abs(np.asarray(a) - b))) for a, b in zip(_leaves(got), _leaves(ref)))
        assert diff <= TOL, (name, diff)


def _ademamix_numpy(params, batches, lr, b1, b2, b3, alpha, eps, wd):
    """bitsandbytes' reference AdEMAMix (`_ReferenceAdEMAMix.step`, the update its kernels compute) in
    float64, after torch-style clipping: fast and slow EMAs m1, m2, second moment nu; step
    (m1 / (1 - b1^t) + alpha m2) / (sqrt(nu / (1 - b2^t)) + eps), decay added to it, times lr."""
    import jax

    from test_optim_problems import jax_loss

    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    m1, m2, nu = (jax.tree.map(np.zeros_like, p) for _ in range(3))
    mask = decay_mask(params)
    grad_fn = jax.jit(jax.grad(jax_loss))
    for t, (x, y) in enumerate(batches, start=1):
        g = jax.tree.map(lambda a: np.asarray(a, np.float64), grad_fn(jax.tree.map(np.float32, p), x, y))
        norm = np.sqrt(sum(np.sum(a * a) for a in jax.tree.leaves(g)))
        g = jax.tree.map(lambda a: a * min(1.0, CLIP / (norm + 1e-6)), g)
        m1 = jax.tree.map(lambda m, gi: b1 * m + (1 - b1) * gi, m1, g)
        m2 = jax.tree.map(lambda m, gi: b3 * m + (1 - b3) * gi, m2, g)
        nu = jax.tree.map(lambda v, gi: b2 * v + (1 - b2) * gi * gi, nu, g)
        step = jax.tree.map(lambda a, b, v: (a / (1 - b1 ** t) + alpha * b) / (np.sqrt(v) / np.sqrt(1 - b2 ** t) + eps),
                            m1, m2, nu)
        p = jax.tree.map(lambda pi, u, d: pi - lr * (u + (wd * pi if d else 0.0)), p, step, mask)
    return p


@pytest.mark.parametrize("name, optim_args, betas", [
    ("ademamix", None, (0.9, 0.999, 0.9999, 5.0)),
    ("paged_ademamix_32bit", "beta1=0.8,beta3=0.99,alpha=2.0", (0.8, 0.999, 0.99, 2.0)),
])
def test_ademamix_matches_float64_reference(name, optim_args, betas) -> None:
    """HF's `ademamix` is bitsandbytes' AdEMAMix with (adam_beta1, adam_beta2, beta3) and alpha from optim_args;
    bitsandbytes' 32-bit CPU kernel fails on one-dimensional tensors (0.50.2; test_optim_bnb.py checks the
    others against it), so the reference is its own reference update."""
    from jtrain.errors import ConfigError

    batches = make_batches(STEPS, seed=3)
    torch.manual_seed(3)
    params0 = jax_params_from_torch(TorchMLP())
    ref = _ademamix_numpy(params0, batches, 1e-3, *betas, 1e-8, WD)
    got = run_jax(params0, make_optimizer(name, 1e-3, weight_decay=WD, max_grad_norm=CLIP, optim_args=optim_args),
                  batches)
    moved = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(_leaves(ref), _leaves(params0)))
    assert moved > 100 * TOL  # the comparison means something
    diff = max(float(np.max(np.abs(np.asarray(a) - b))) for a, b in zip(_leaves(got), _leaves(ref)))
    assert diff <= TOL, diff
    with pytest.raises(ConfigError, match="t_alpha / t_beta3.*does not use them"):
        make_optimizer(name, 1e-3, optim_args="t_alpha=100")


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree)
