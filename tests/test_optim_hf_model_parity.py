"""The optimizers that see a weight's shape, against what HF's Trainer builds on a real model: GaLore and
APOLLO (galore_torch / apollo_torch), Adafactor (transformers') and StableAdamW (torch-optimi's).

HF's own `Trainer.create_optimizer` picks the parameters (its nn.Linear rule and decay groups on a tiny
LlamaForCausalLM, its defaults) and its optimizer steps them. jtrain's `make_optimizer` gets the same
model's layout (`trainer_setup.kernel_layout`), as the Trainer passes it.
Both are fed the same random gradients (made in HF's layout, converted with the model's leaf maps),
so that only the optimizers are compared. jtrain's attention projections are head-shaped 3-D kernels
([embed, heads, head_dim] and [heads, head_dim, embed]); with scan_layers every kernel is stacked over
the layers; each must be projected as HF's matrix of that layer. The tiny Llama's weights cover every
projection side: q/o are square (the "std" tie), k/v and down reduce torch's output side, gate/up and
lm_head its input side.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from test_models_common import hf_model

from jtrain.models import from_pretrained
from jtrain.models import convert
from jtrain.models.hub import model_leaf_maps, to_hf_state_dict
from jtrain.optim import make_optimizer
from jtrain.trainer_setup import kernel_layout

STEPS, LR, RANK = 7, 1e-2, 4  # RANK differs from every weight dimension (16, 32, 64): see _projector_table
# float32 on both sides, the same formulas; SVDs by LAPACK on both sides, singular values well apart in
# random 16..64-wide gradients. As the other torch parity tests: 1e-5 absolute on O(0.1-1) params
# (measured: at most 2.1e-6 with refreshes, 1.2e-7 without; 5.6e-6 for GaLore's 8-bit AdamW).
TOL = 1e-5


def _pair(tmp_path, scan: bool):
    torch_model = hf_model("llama", "causal_lm", seed=3)
    torch_model.save_pretrained(tmp_path / "hf")
    model, params = from_pretrained(tmp_path / "hf", scan_layers=scan)
    return torch_model, model, params


def _hf_optimizer(torch_model, tmp_path, **training_args):
    """The optimizer HF's Trainer.create_optimizer makes for these TrainingArguments."""
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), learning_rate=LR, report_to=[],
                                          use_cpu=True, **training_args)
    return transformers.Trainer(model=torch_model, args=args).create_optimizer()


def _run_both(tmp_path, name: str, scan: bool, layout: bool = True, **training_args) -> tuple[float, float]:
    """(max |jtrain - HF| over the params after STEPS, how far the params moved)."""
    torch_model, model, params = _pair(tmp_path, scan)
    start = {k: v.detach().numpy().copy() for k, v in torch_model.named_parameters()}
    hf_opt = _hf_optimizer(torch_model, tmp_path, optim=name, **training_args)
    tx = make_optimizer(name, LR, max_grad_norm=0, adam_beta1=training_args.get("adam_beta1", 0.9),
                        weight_decay=training_args.get("weight_decay", 0.0), optim_args=training_args.get("optim_args"),
                        optim_target_modules=training_args.get("optim_target_modules"),
                        param_layout=kernel_layout(model) if layout else None)
    state = tx.init(params)
    update = jax.jit(tx.update)
    maps, rng = model_leaf_maps(model), np.random.default_rng(0)
    for _ in range(STEPS):
        grads = {k: (0.1 * rng.normal(size=v.shape)).astype(np.float32) for k, v in start.items()}
        for k, p in torch_model.named_parameters():
            p.grad = torch.from_numpy(grads[k])
        hf_opt.step()
        tree = convert.unflatten({m.path: jnp.asarray(convert.to_leaf(m, [grads[n] for n in m.hf_names]))
                                  for m in maps})
        updates, state = update(tree, state, params)
        params = optax.apply_updates(params, updates)
    ours = to_hf_state_dict(model, params)
    theirs = {k: v.detach().numpy() for k, v in torch_model.named_parameters()}
    diff = max(float(np.max(np.abs(ours[k] - theirs[k]))) for k in theirs)
    moved = max(float(np.max(np.abs(start[k] - theirs[k]))) for k in theirs)
    print(f"\n{name}: max |jtrain - HF| {diff:.2g} after moving {moved:.2g}")
    return diff, moved


@pytest.mark.parametrize("name, targets, scan, optim_args", [
    ("galore_adamw", ["attn", "mlp"], False, f"rank={RANK},update_proj_gap=3,scale=0.5"),
    ("galore_adamw", "all-linear", True, f"rank={RANK},update_proj_gap=3,proj_type=reverse_std"),
    ("galore_adamw", r".*\.(q_proj|down_proj)", False, f"rank={RANK},update_proj_gap=2,proj_type=right"),
    ("galore_adamw_8bit", "all-linear", True, f"rank={RANK},update_proj_gap=3,scale=0.5"),
    ("galore_adafactor", ["attn", "mlp"], False, f"rank={RANK},update_proj_gap=3,scale=0.5"),
    ("galore_adafactor", "all-linear", True, f"rank={RANK},update_proj_gap=2,proj_type=reverse_std"),
])
def test_galore_matches_galore_torch_as_hf_builds_it(tmp_path, monkeypatch, name, targets, scan, optim_args) -> None:
    """Refreshes every 2-3 steps. The moments kept across a refresh depend on the singular vectors' signs,
    which are LAPACK's arbitrary choice (torch and JAX disagree on most vectors of wide matrices), so torch's
    SVD is given jtrain's sign rule (each vector's largest entry positive); with one projector (no refresh)
    the runs agree to 4.4e-7 without it. Before: jtrain's attention kernels were left to plain Adam,
    "left"/"right" named jtrain's (transposed) sides, square weights were projected on the other side,
    and the Adam step put eps after the bias correction."""
    _sign_torch_svd(monkeypatch)
    if name == "galore_adamw_8bit":
        _mend_galore_torch_8bit(monkeypatch)
    diff, moved = _run_both(tmp_path, name, scan, optim_target_modules=targets, optim_args=optim_args)
    assert moved > 100 * TOL, moved
    assert diff <= TOL, diff


def _sign_torch_svd(monkeypatch) -> None:
    """torch's SVD with jtrain's sign rule (each singular vector's largest entry positive)."""
    svd = torch.linalg.svd

    def signed_svd(matrix, full_matrices=True):
        u, s, vh = svd(matrix, full_matrices=full_matrices)  # galore_torch uses one side only: sign each alone
        return u * _largest_sign(u, 0), s, vh * _largest_sign(vh, 1)

    monkeypatch.setattr(torch.linalg, "svd", signed_svd)


def test_galore_8bit_keeps_low_rank_moments_in_8_bits_as_galore_torch(monkeypatch) -> None:
    """A 256 x 128 weight at rank 32: its projected gradient (256 x 32) has 8192 elements, so both sides keep
    its Adam moments block-wise in 8 bits (HF's galore_adamw_8bit: bitsandbytes' min_8bit_size 4096, which
    optim_args cannot change). With 32-bit moments both compute the same numbers (TOL). With 8-bit moments
    most entries round to the same code, but bitsandbytes' search lands some small entries a code away
    (test_optim_bnb.py), and those few dominate a maximum: the runs are compared by their mean distance,
    bounded by a fifth of what 8-bit storage itself moves galore_torch's run (measured 0.08-0.09 over three
    seeds; the maxima are of one size, 0.8-1.1 of it)."""
    import jtrain.optim.low_rank_builders as builders
    from jtrain.optim.quantize import QuantizedArray

    _sign_torch_svd(monkeypatch)
    _mend_galore_torch_8bit(monkeypatch)
    rng = np.random.default_rng(0)
    start = (0.3 * rng.normal(size=(256, 128))).astype(np.float32)
    grads = [(0.1 * rng.normal(size=start.shape)).astype(np.float32) for _ in range(STEPS)]
    galore = {"rank": 32, "update_proj_gap": 3, "scale": 0.5, "proj_type": "std"}

    def torch_run(min_8bit_size: int) -> np.ndarray:
        from galore_torch.adamw8bit import AdamW8bit

        w = torch.nn.Parameter(torch.from_numpy(start.copy()))
        opt = AdamW8bit([{"params": [w], **galore}], lr=LR)
        opt.args.min_8bit_size = min_8bit_size
        for g in grads:
            w.grad = torch.from_numpy(g)
            opt.step()
        return w.detach().numpy()

    def jtrain_run(min_8bit_size: int) -> tuple[np.ndarray, bool]:
        monkeypatch.setattr(builders, "_BNB_MIN_8BIT", min_8bit_size)
        tx = make_optimizer("galore_adamw_8bit", LR, max_grad_norm=0, optim_target_modules="all-linear",
                            optim_args=",".join(f"{k}={v}" for k, v in galore.items()))
        params = {"proj": {"kernel": jnp.asarray(start.T)}}  # jtrain's (in, out) kernel
        state, update = tx.init(params), jax.jit(tx.update)
        blocks = lambda x: isinstance(x, QuantizedArray)  # noqa: E731
        quantized = any(blocks(x) for x in jax.tree.leaves(state, is_leaf=blocks))
        for g in grads:
            updates, state = update({"proj": {"kernel": jnp.asarray(g.T)}}, state, params)
            params = optax.apply_updates(params, updates)
        return np.asarray(params["proj"]["kernel"]).T, quantized

    (ours_32, quantized_32), (ours_8, quantized_8) = jtrain_run(10**9), jtrain_run(4096)
    theirs_32, theirs_8 = torch_run(10**9), torch_run(4096)
    assert quantized_8 and not quantized_32
    assert float(np.max(np.abs(ours_32 - theirs_32))) <= TOL
    ours, storage_effect = float(np.mean(np.abs(ours_8 - theirs_8))), float(np.mean(np.abs(theirs_8 - theirs_32)))
    print(f"\ngalore 8-bit: mean |jtrain - galore_torch| {ours:.2g}; 8-bit storage moves galore_torch "
          f"{storage_effect:.2g}")
    assert ours < 0.2 * storage_effect, (ours, storage_effect)


def _mend_galore_torch_8bit(monkeypatch) -> None:
    """galore_torch 1.0's 8-bit AdamW hands bitsandbytes its arguments by position, and bitsandbytes 0.50 has
    dropped `percentile_clipping` from that list: its 100 lands on `max_unorm` (a LAMB-style trust ratio,
    |update| <= 100 |p|) and `block_wise` on `skip_zeros`. galore_torch steps a targeted weight's projection
    as a zeroed tensor, so the ratio zeroes every update whose state is 32-bit (under 4096 elements: all of this
    tiny model's), and a zero-initialised bias would never move. jtrain builds the optimizer galore_torch
    means; its arguments are passed by name here so that HF's side computes that too. Its step also calls
    torch.cuda.synchronize(), on the CPU as well."""
    import bitsandbytes as bnb
    from galore_torch.adamw8bit import AdamW8bit

    def init(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, **_):
        bnb.optim.optimizer.Optimizer2State.__init__(self, "adam", params, lr, betas, eps, weight_decay, optim_bits=8)

    monkeypatch.setattr(AdamW8bit, "__init__", init)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)


def _largest_sign(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The sign of each column's (dim 0) or row's (dim 1) largest-magnitude entry, broadcastable over x."""
    largest = torch.gather(x, dim, x.abs().argmax(dim=dim, keepdim=True))
    return torch.where(largest < 0, -1.0, 1.0)


def _projector_table() -> dict[tuple[int, int], np.ndarray]:
    """One N(0, 1) matrix per (reduced side, RANK): the projector both sides draw for a weight (their
    generators differ, torch's Philox/MT seeded per parameter against JAX's keys, so both are replaced)."""
    rng = np.random.default_rng(7)
    return {(n, RANK): rng.normal(size=(n, RANK)).astype(np.float32) for n in (16, 32, 64)}


@pytest.mark.parametrize("targets, scan, optim_args", [
    (["attn", "mlp"], True, f"rank={RANK},update_proj_gap=50,scale=2"),
    ("all-linear", False, f"rank={RANK},update_proj_gap=50,scale_type=tensor"),
])
def test_apollo_matches_apollo_torch_as_hf_builds_it(tmp_path, monkeypatch, targets, scan, optim_args) -> None:
    """The random projections are the one part drawn differently (replaced by the same matrices on both
    sides); the rest, the moments, the channel scaling, the norm-growth limiter, HF's betas for the
    targeted group only, is compared. Before: jtrain's attention kernels were left to plain Adam, and
    the scaling read the bias-corrected moments."""
    import apollo_torch.random_projector as torch_projector

    import jtrain.optim.apollo as jax_apollo

    table = _projector_table()

    def torch_randn(shape, seed, device=None, dtype=None):
        rows, cols = shape
        drawn = table[(rows, RANK)] if cols == RANK else table[(cols, RANK)].T
        return torch.from_numpy(np.ascontiguousarray(drawn))

    monkeypatch.setattr(torch_projector, "stable_randn", torch_randn)
    monkeypatch.setattr(jax_apollo, "random_projector",
                        lambda key, shape: jnp.asarray(table[tuple(shape)]) / np.sqrt(shape[1]))
    diff, moved = _run_both(tmp_path, "apollo_adamw", scan, optim_target_modules=targets, optim_args=optim_args,
                            adam_beta1=0.8)
    assert moved > 100 * TOL, moved
    assert diff <= TOL, diff


@pytest.mark.parametrize("scan", [False, True])
def test_adafactor_factors_each_hf_weight_matrix(tmp_path, scan) -> None:
    """HF factors q_proj's (out, in) weight; jtrain's [embed, heads, head_dim] kernel factored over its last two
    axes (heads, head_dim) per embed row was another optimizer, and a scanned stack was RMS-clipped as one
    tensor where HF clips each layer's. With the layout, the same numbers; without it (a bare tree), not."""
    diff, moved = _run_both(tmp_path, "adafactor", scan, weight_decay=0.1)
    assert moved > 100 * TOL, moved
    assert diff <= TOL, diff
    without, _ = _run_both(tmp_path / "bare", "adafactor", scan, layout=False, weight_decay=0.1)
    assert without > 100 * TOL, without


def test_stable_adamw_clips_each_layers_tensor(tmp_path) -> None:
    """torch-optimi's StableAdamW divides each tensor's rate by its own RMS ratio; a scanned stack holds one
    tensor per layer, which jtrain clipped as one. With the layout, the same numbers; without it, not."""
    diff, moved = _run_both(tmp_path, "stable_adamw", True, weight_decay=0.1)
    assert moved > 100 * TOL, moved
    assert diff <= TOL, diff
    without, _ = _run_both(tmp_path / "bare", "stable_adamw", True, layout=False, weight_decay=0.1)
    assert without > 100 * TOL, without


@pytest.mark.parametrize("scan", [False, True])
def test_muon_orthogonalises_each_hf_weight_matrix(tmp_path, scan) -> None:
    """Muon has no HF reference; its rule is per weight matrix. jtrain's run on the model (head-shaped attention
    kernels, with scan_layers one stack per kernel) must equal a run on HF's own 2-D weights (transposed to
    (in, out)). Before, the 3-D kernels and the scanned stacks got AdamW (only 2-D leaves were matrices)."""
    _, model, params = _pair(tmp_path, scan)
    maps = model_leaf_maps(model)
    flat = {name: np.asarray(t).T if t.ndim == 2 and "norm" not in name and "embed" not in name else np.asarray(t)
            for name, t in to_hf_state_dict(model, params).items()}
    ours = make_optimizer("muon", LR, max_grad_norm=0, param_layout=kernel_layout(model))
    plain = make_optimizer("muon", LR, max_grad_norm=0)  # every 2-D leaf of the HF-shaped dict is a matrix
    ours_state, plain_state = ours.init(params), plain.init(flat)
    ours_update, plain_update = jax.jit(ours.update), jax.jit(plain.update)
    rng = np.random.default_rng(0)
    for _ in range(3):
        grads = {k: (0.1 * rng.normal(size=v.shape)).astype(np.float32) for k, v in flat.items()}
        hf_grads = {k: g.T if k in flat and g.ndim == 2 and "norm" not in k and "embed" not in k else g
                    for k, g in grads.items()}
        tree = convert.unflatten({m.path: jnp.asarray(convert.to_leaf(m, [hf_grads[n] for n in m.hf_names]))
                                  for m in maps})
        updates, ours_state = ours_update(tree, ours_state, params)
        params = optax.apply_updates(params, updates)
        updates, plain_state = plain_update(grads, plain_state, flat)
        flat = optax.apply_updates(flat, updates)
    got = to_hf_state_dict(model, params)
    for name, value in flat.items():
        want = np.asarray(value).T if value.ndim == 2 and "norm" not in name and "embed" not in name else value
        # Newton-Schulz in float32 on the same matrices in another layout: summation order only
        np.testing.assert_allclose(got[name], want, rtol=0, atol=TOL, err_msg=name)
