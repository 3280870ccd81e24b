"""Which weights GaLore/APOLLO project: HF's `optim_target_modules` matching, and each weight's matrix.

HF matches `optim_target_modules` against torch module names (`model.layers.0.mlp.up_proj`) and
projects only `nn.Linear` weights, each as its (out, in) matrix. jtrain kernels are (in..., out...)
and may be head-shaped (`DenseGeneral`, [embed, heads, head_dim] or [heads, head_dim, embed]) or
stacked over scanned layers, so a projected kernel carries a `MatrixView`: how many leading axes
index separate matrices (one per scanned layer) and how many of the rest are inputs.

With a `layout` (the Trainer builds one from the model's HF conversion maps, `kernel_layout`) the
rule is HF's exactly: module names are HF's, and only weights that are `nn.Linear` in HF qualify
(not GPT-2's `Conv1D`, not Mixtral's stacked experts). Without one (`make_optimizer` on a bare
tree) a leaf qualifies when it is a 2-D `kernel`, matched on its Flax dotted module path.
"""
from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import jax

from jtrain.errors import ConfigError
from jtrain.optim.paths import map_with_names

LOW_RANK = "low_rank"
FULL = "full"
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MatrixView:
    """A kernel as HF's Linear weight(s): `lead` leading axes index matrices, the next `n_in` are inputs."""

    lead: int = 0
    n_in: int = 1

    def shape(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], int, int]:
        """(matrix batch shape, inputs a, outputs b) of a leaf of `shape`."""
        batch, rest = shape[:self.lead], shape[self.lead:]
        return tuple(batch), math.prod(rest[:self.n_in]), math.prod(rest[self.n_in:])


PLAIN = MatrixView()


@dataclass(frozen=True)
class HFWeight:
    """One leaf as HF's tensor(s): its module name(s) (one per scanned layer), how many leading axes index
    HF tensors (scanned layers, experts), one tensor's shape in jtrain's axis order (a kernel: (in, out);
    a multi-head bias: flat), a kernel's input axes, and whether HF holds it in an `nn.Linear` (not
    GPT-2's Conv1D, not a mixture-of-experts block's router or experts)."""

    modules: tuple[str, ...]
    lead: int
    tensor: tuple[int, ...]
    n_in: int | None  # None: not a kernel (norm scales, biases, embeddings)
    linear: bool

    @property
    def view(self) -> MatrixView | None:
        return None if self.n_in is None else MatrixView(self.lead, self.n_in)


Layout = Mapping[str, HFWeight]  # jtrain dotted leaf name -> HF weight


def kernel_layout(leaf_maps: Iterable[Any]) -> dict[str, HFWeight]:
    """Every leaf of a model as HF's tensors, from its `jtrain.models.convert.LeafMap`s: what the optimizers
    that see a weight's shape (GaLore, APOLLO, Adafactor's factoring, Muon) need to see it as HF does.

    A mixture-of-experts block's weights are never nn.Linear in transformers 5 (the router is a
    `TopKRouter`, the experts 3-D parameters), though checkpoints store the router like one."""
    out = {}
    for m in leaf_maps:
        modules = tuple(n.rpartition(".")[0] for n in m.hf_names)
        lead = int(m.stacked) + int(m.experts > 0)
        if m.kind == "plain":
            out[".".join(m.path)] = HFWeight(modules, lead, tuple(m.hf_shape), None, False)
            continue
        linear = m.kind == "linear" and not m.experts and "block_sparse_moe" not in modules[0]
        tensor = tuple(reversed(m.hf_shape)) if m.kind == "linear" else tuple(m.hf_shape)
        out[".".join(m.path)] = HFWeight(modules, lead, tensor, m.n_in, linear)
    return out


def matrix_view(layout: Layout | None, name: str) -> MatrixView | None:
    """The matrices a kernel holds as HF sees them, or None (not a kernel, or not in the layout)."""
    weight = None if layout is None else layout.get(name)
    return None if weight is None else weight.view


def stacked_axes(layout: Layout | None, name: str) -> int:
    """How many leading axes of a leaf index HF's tensors (scanned layers, experts); 0 where unknown."""
    weight = None if layout is None else layout.get(name)
    return 0 if weight is None else weight.lead


def hf_tensor_shape(layout: Layout | None, name: str, shape: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
    """(the leaf reshaped as HF's tensors: stacked axes then one tensor, how many stacked axes lead); the leaf's
    own shape and 0 where the layout does not know it."""
    weight = None if layout is None else layout.get(name)
    if weight is None or math.prod(shape[weight.lead:]) != math.prod(weight.tensor):
        return tuple(shape), 0  # unknown, or a layout of other params (a wrapper's): the leaf's own shape
    return tuple(shape[:weight.lead]) + weight.tensor, weight.lead


def module_matches(targets: list[str] | str, module: str) -> bool:
    """HF's `check_target_module_exists`: a str is a full-match regex; a list matches by
    equality, substring, or full-match regex of any entry."""
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    if module in targets or any(t in module for t in targets):
        return True
    return any(re.fullmatch(t, module) is not None for t in targets)


def _is_all_linear(targets: list[str] | str) -> bool:
    return isinstance(targets, str) and targets.replace("_", "-") == "all-linear"


def low_rank_labels(params: Any, targets: list[str] | str | None, optimizer: str, layout: Layout | None = None) -> Any:
    """Tree of LOW_RANK / FULL labels; errors like HF when nothing is (or can be) targeted."""
    if targets is None:
        raise ValueError(f"{optimizer} needs optim_target_modules (names, regexes or 'all-linear')")
    if not isinstance(targets, (str, list, tuple)):
        raise TypeError(f"optim_target_modules must be a str or list of str, got {targets!r}")
    targets = targets if isinstance(targets, str) else list(targets)
    every = _is_all_linear(targets)
    skipped: list[str] = []

    def label(name: str, leaf: Any) -> str:
        weight = _weight(name, leaf, layout)
        if weight is None:
            return FULL
        hits = [every or module_matches(targets, m) for m in weight.modules]
        if not any(hits):
            return FULL
        if not weight.linear:
            skipped.append(weight.modules[0])
            return FULL
        if not all(hits):
            raise ConfigError(f"{optimizer}: optim_target_modules {targets!r} selects only some layers of the scanned "
                              f"kernel {name} ({sum(hits)} of {len(hits)}); one stacked kernel is projected whole: "
                              "select every layer, or load the model with scan_layers=False")
        return LOW_RANK

    labels = map_with_names(label, params)
    if skipped:
        _warn_not_linear(optimizer, tuple(skipped), layout is None)
    if LOW_RANK not in set(jax.tree.leaves(labels)):
        rule = "HF nn.Linear weights" if layout is not None else "2-D 'kernel' leaves"
        raise ValueError(f"No target modules found for {optimizer} ({targets!r}); only {rule} qualify"
                         + (f" (selected but not: {', '.join(skipped[:4])})" if skipped else ""))
    return labels


def view_of(layout: Layout | None) -> Any:
    """name -> MatrixView of a projected leaf (the plain 2-D view without a layout)."""
    return (lambda name: PLAIN) if layout is None else (lambda name: layout[name].view or PLAIN)


def _weight(name: str, leaf: Any, layout: Layout | None) -> HFWeight | None:
    """The HF weight a leaf is, or None for biases, norms, embeddings and leaves the layout lacks."""
    if layout is not None:
        weight = layout.get(name)
        return weight if weight is not None and weight.n_in is not None else None
    module, _, leaf_name = name.rpartition(".")
    if leaf_name != "kernel":
        return None
    two_d = getattr(leaf, "ndim", 0) == 2
    return HFWeight((module,), 0, tuple(getattr(leaf, "shape", ())), 1, two_d)


@functools.cache
def _warn_not_linear(optimizer: str, modules: tuple[str, ...], bare_tree: bool) -> None:
    """Once per set (the labels are computed at init and again when the update is traced)."""
    if bare_tree:
        what = ("kernel(s) that are not 2-D, which get plain Adam (pass make_optimizer the model's param_layout, as "
                "the Trainer does, to project head-shaped and scanned kernels as HF's Linear weights)")
    else:
        what = "weight(s) that are not nn.Linear in HF (GPT-2's Conv1D, stacked experts), which get plain Adam as in HF"
    logger.warning("%s: optim_target_modules selects %d %s: %s%s", optimizer, len(modules), what,
                   ", ".join(modules[:4]), ", ..." if len(modules) > 4 else "")
