"""Model FLOPs of a step, counted on its jaxpr: the numerator of MFU.

Why not XLA's cost analysis of the compiled step: on a GPU most of the work leaves XLA as custom
calls (cuBLAS GEMMs, cuDNN attention) that the analysis counts as zero. The first H200 run of
`benchmarks/gpu_1b.py` reported 1.15e13 FLOPs for a 1.1B-parameter step whose matmuls alone
are 1.0e14, so MFU read 5% instead of about 55%. The jaxpr is the program before any backend
touches it: the same count on every platform, and the count a reader can check by hand.

What counts: every matrix product (`dot_general`, `ragged_dot`, convolutions, the oneDNN / MKL GEMM
of `jtrain.models.cpu_gemm`) at 2 FLOPs per multiply-add, and cuDNN's fused attention at the FLOPs
of the two products it fuses over the full query x key grid (4·B·N·T·S·H forward, twice that
backward), which is what the einsum path computes and what PaLM's 6·N·T + attention formula counts.
(The CPU's blocked attention, and its fused kernel `jtrain.models.cpu_attention`, skip the keys
after each causal query block, so there the count is what they compute: 0.977 of the formula for the
tiny benchmark model.) Elementwise work, reductions and the optimizer's update are left out, as in
every MFU convention. Loops multiply their body (`scan` by its length; a `while` of unknown trip
count is counted once), `cond` counts its most expensive branch. Gradient checkpointing's
recomputation is left out (PaLM's definition: model FLOPs do not depend on how the step is
implemented; counting it would be hardware FLOPs, and turning remat on would leave MFU unchanged
while the step slowed down). JAX marks it: the forward that a `jax.checkpoint` body recomputes in
the backward runs under the name scope "rematted_computation". A loop marked with
`useful_iterations(useful, total)` counts `useful` of its `total` iterations: the pipeline's ticks,
whose bubble ticks compute on zeros that nothing reads (work that runs, but not model FLOPs).

The jaxpr of a jitted step has global shapes, so the count is for the whole step over every
device; `traced_flops(..., devices)` divides by the devices the step runs on (model FLOPs:
work duplicated on several devices is not counted twice). Inside a `shard_map` the shapes are per shard, so its
body is multiplied by the number of shards.
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax

from jtrain.models import cpu_attention
from jtrain.models.cpu_gemm import TARGET as _CPU_GEMM  # an FFI product, counted like a dot

# cuDNN fused attention as jax's `dot_product_attention(implementation="cudnn")` binds it.
_ATTENTION_FORWARD = {"dot_product_attention_fwd", "dot_product_attention_fwd_wrapper",
                      "dot_product_attention_fp8_fwd", "dot_product_attention_fp8_fwd_wrapper"}
_ATTENTION_BACKWARD = {"dot_product_attention_bwd", "dot_product_attention_bwd_wrapper",
                       "dot_product_attention_fp8_bwd", "dot_product_attention_fp8_bwd_wrapper"}
_BNTH = 1  # jax's AttentionLayout.BNTH (batch, heads, length, head_dim); BTNH (0) is the other one
_USEFUL = re.compile(r"jtrain_useful_iterations_(\d+)_of_(\d+)")
_RECOMPUTED = "rematted_computation"  # the scope JAX's remat gives the forward it recomputes


def useful_iterations(useful: int, total: int) -> Any:
    """A scope for a `lax.scan` of `total` iterations of which only `useful` are model work. It is a
    `jax.named_scope`, so the mark rides on the scan's name stack through jit, grad and transpose."""
    return jax.named_scope(f"jtrain_useful_iterations_{int(useful)}_of_{int(total)}")


def jaxpr_flops(jaxpr: Any, marked: bool = False) -> float:
    """Matmul and attention FLOPs of a (Closed)Jaxpr, sub-jaxprs included (see the module doc).
    `marked`: inside a loop already counted by its useful iterations (its body's eqns carry the mark too)."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    return float(sum(_eqn_flops(eqn, marked) for eqn in jaxpr.eqns if not _recomputed(eqn)))


def _recomputed(eqn: Any) -> bool:
    """Whether `eqn` is remat's recomputation of the forward (a sub-jaxpr's eqns do not repeat the
    scopes of the eqn that holds them, so an eqn under the scope is skipped with all it contains)."""
    return _RECOMPUTED in str(eqn.source_info.name_stack).split("/")


def traced_flops(traced: Any, devices: int = 1) -> float:
    """Per-device model FLOPs of a `jax.jit(f).trace(...)` result running on `devices` devices."""
    return jaxpr_flops(traced.jaxpr) / max(int(devices), 1)


def _shape(var: Any) -> tuple[int, ...]:
    return tuple(getattr(var.aval, "shape", ()))


def _eqn_flops(eqn: Any, marked: bool) -> float:
    name, params = eqn.primitive.name, eqn.params
    if name == "dot_general":
        return _dot_general_flops(_shape(eqn.invars[0]), _shape(eqn.invars[1]), params["dimension_numbers"])
    if name in ("ragged_dot", "ragged_dot_general"):  # lhs [M, K], rhs [G, K, N]: each row meets one group
        lhs, rhs = _shape(eqn.invars[0]), _shape(eqn.invars[1])
        return 2.0 * math.prod(lhs) * rhs[-1]
    if name == "conv_general_dilated":
        rhs, out = _shape(eqn.invars[1]), _shape(eqn.outvars[0])
        out_features = rhs[params["dimension_numbers"].rhs_spec[0]]
        return 2.0 * math.prod(out) * math.prod(rhs) / out_features
    if name in _ATTENTION_FORWARD or name in _ATTENTION_BACKWARD:
        return _attention_flops(eqn, backward=name in _ATTENTION_BACKWARD)
    if name == "ffi_call" and params.get("target_name") in (cpu_attention.FORWARD, cpu_attention.BACKWARD):
        return _cpu_attention_flops(eqn, backward=params["target_name"] == cpu_attention.BACKWARD)
    if name == "ffi_call" and params.get("target_name") == _CPU_GEMM:  # jtrain.models.cpu_gemm: op(a) @ op(b)
        lhs, out = _shape(eqn.invars[0]), _shape(eqn.outvars[0])  # [batch,] rows, contracted (or swapped)
        contracted = lhs[-2] if dict(params["attributes"]).get("trans_a") else lhs[-1]
        return 2.0 * math.prod(out) * contracted
    return _nested_flops(eqn, marked)


def _dot_general_flops(lhs: tuple[int, ...], rhs: tuple[int, ...], dimension_numbers: Any) -> float:
    (_, rhs_contract), (_, rhs_batch) = dimension_numbers
    shared = math.prod(rhs[d] for d in (*rhs_contract, *rhs_batch))
    return 2.0 * math.prod(lhs) * (math.prod(rhs) // max(shared, 1))


def _attention_flops(eqn: Any, backward: bool) -> float:
    q, v = _shape(eqn.invars[0]), _shape(eqn.invars[2])
    layout = eqn.params.get("layout")
    layout = getattr(layout, "value", layout)
    keys = v[2] if layout == _BNTH else v[1]
    forward = 4.0 * math.prod(q) * keys  # QK^T and PV: 2 FLOPs per multiply-add each, over B·N·T·S·H
    return 2.0 * forward if backward else forward


def _cpu_attention_flops(eqn: Any, backward: bool) -> float:
    """`jtrain.models.cpu_attention`'s kernel: QK^T and PV over the (query, key) pairs its blocks
    compute; its backward counts the four products of the gradients, not the scores it recomputes
    (recomputation is not model FLOPs), so the count equals the einsum path's."""
    (B, L, N, H), S = _shape(eqn.invars[0]), _shape(eqn.invars[1])[1]
    forward = 4.0 * B * N * H * cpu_attention.scored_pairs(L, S, bool(dict(eqn.params["attributes"])["causal"]))
    return 2.0 * forward if backward else forward


def _nested_flops(eqn: Any, marked: bool) -> float:
    """FLOPs of the jaxprs an eqn carries (jit, scan, cond, while, remat, custom_vjp, shard_map...)."""
    name, params = eqn.primitive.name, eqn.params
    if name == "cond":
        return max((jaxpr_flops(branch, marked) for branch in params["branches"]), default=0.0)
    if name == "while":
        return jaxpr_flops(params["body_jaxpr"], marked) + jaxpr_flops(params["cond_jaxpr"], marked)
    mark = _USEFUL.search(str(eqn.source_info.name_stack)) if name == "scan" and not marked else None
    if mark and int(mark.group(2)) == params["length"]:
        return int(mark.group(1)) * sum(jaxpr_flops(sub, True) for sub in _sub_jaxprs(params))
    total = sum(jaxpr_flops(sub, marked) for sub in _sub_jaxprs(params))
    if name == "scan":
        total *= params["length"]
    elif name == "shard_map":  # the body runs once per shard of the axes it makes manual
        mesh = params["mesh"]
        manual = params.get("newly_manual_axes", params.get("manual_axes", tuple(mesh.shape)))
        total *= math.prod(mesh.shape[axis] for axis in manual)
    return total


def _sub_jaxprs(params: dict) -> list[Any]:
    found = []
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if hasattr(item, "eqns") or hasattr(getattr(item, "jaxpr", None), "eqns"):
                found.append(item)
    return found
