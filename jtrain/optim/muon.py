"""Muon (Jordan et al., 2024) for hidden 2-D kernels, AdamW for everything else.

optax's default sends every 2-D leaf to Muon, embeddings and the LM head included; the
Muon recipe (and Moonshot's "Muon is scalable") keep those on AdamW because they are
lookup tables / output maps, not hidden linear maps. Here Muon gets a leaf when it is a weight
matrix and its path mentions neither `embed` (embed_tokens, wte/wpe's `embedding`) nor `lm_head`.
With the model's layout (`targets.kernel_layout`, from the Trainer) every kernel is one: a head-shaped
attention kernel is orthogonalised as HF's (embed, heads x head_dim) matrix, a scanned stack or an
experts stack matrix by matrix; without it, 2-D leaves only.

`consistent_rms=0.2` (default) rescales Muon's orthogonalised update to AdamW's typical
RMS, so the one learning rate of HF's Trainer suits both parameter groups.
Decay is decoupled `p -= lr * wd * p`, masked by `decay_mask`, for both groups.
"""
from __future__ import annotations

from typing import Any

import optax
from optax.contrib import MuonDimensionNumbers

from jtrain.optim.decay_mask import decay_mask
from jtrain.optim.paths import map_with_names
from jtrain.optim.targets import PLAIN, Layout, matrix_view
from jtrain.optim.transforms import decoupled_weight_decay


def uses_muon(name: str, leaf: Any, layout: Layout | None = None) -> bool:
    """True for hidden weight matrices (not embeddings, not the LM head)."""
    lowered = name.lower()
    if "embed" in lowered or "lm_head" in lowered:
        return False
    return matrix_view(layout, name) is not None if layout is not None else getattr(leaf, "ndim", 0) == 2


def muon_dimension_numbers(params: Any, layout: Layout | None = None) -> Any:
    """Per-leaf MuonDimensionNumbers (flax kernels are (in..., out...); leading stacked axes are batch) or
    None for AdamW leaves."""

    def numbers(name: str, x: Any) -> MuonDimensionNumbers | None:
        if not uses_muon(name, x, layout):
            return None
        view = matrix_view(layout, name) or PLAIN
        inputs = tuple(range(view.lead, view.lead + view.n_in))
        return MuonDimensionNumbers(inputs, tuple(range(inputs[-1] + 1, x.ndim)))

    return map_with_names(numbers, params)


def muon_adamw(
    learning_rate: float | optax.Schedule,
    *,
    b1: float,
    b2: float,
    eps: float,
    weight_decay: float,
    beta: float = 0.95,
    ns_steps: int = 5,
    nesterov: bool = True,
    consistent_rms: float | None = 0.2,
    layout: Layout | None = None,
) -> optax.GradientTransformation:
    """optax.contrib.muon with HF-style masked decoupled weight decay appended."""
    core = optax.contrib.muon(
        learning_rate,
        ns_steps=ns_steps,
        beta=beta,
        eps=eps,
        weight_decay=0.0,
        nesterov=nesterov,
        adam_b1=b1,
        adam_b2=b2,
        adam_weight_decay=0.0,
        muon_weight_dimension_numbers=lambda params: muon_dimension_numbers(params, layout),
        consistent_rms=consistent_rms,
    )
    return optax.chain(core, decoupled_weight_decay(learning_rate, weight_decay, decay_mask))
