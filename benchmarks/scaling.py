"""Scaling on paper: per-device FLOPs, memory and collective bytes of the compiled train step for
each mesh preset, as model size, sequence length and device count change. No timing.

    python benchmarks/scaling.py [--small] [--devices 2,4,8]

Everything comes from the compiled step on fake CPU devices (`--xla_force_host_platform_device_count`):
FLOPs and bytes accessed from `jtrain.flops.cost_analysis` (per device, as XLA counts an SPMD
program), memory from `compiled.memory_analysis()`, and collectives by parsing the optimized
HLO (`compiled.as_text()`): each all-reduce / all-gather / reduce-scatter / all-to-all /
collective-permute with the bytes of its result. The derived "wire bytes" estimate what one
device sends per step with ring algorithms: all-reduce 2(n-1)/n x size, all-gather (n-1)/n x
gathered size, reduce-scatter (n-1) x shard size.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]
import bench_common as bc

MAX_DEVICES = 8
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "jax" not in sys.modules:  # this script owns its process: fake devices before the backend starts
    from jtrain.xla_flags import apply_xla_flags

    apply_xla_flags([f"--xla_force_host_platform_device_count={MAX_DEVICES}"])

# preset name -> (HF fsdp shortcut, mesh axis that takes the devices)
MESH_PRESETS = {"data": ("", "data"), "fsdp": ("full_shard", "fsdp"), "shard_grad_op": ("shard_grad_op", "fsdp"),
                "tensor": ("", "tensor")}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1, "f64": 8, "s64": 8}
_SHAPE = re.compile(r"\b(f32|bf16|f16|s32|u32|pred|s8|u8|f64|s64)\[([0-9,]*)\]")
_OP = re.compile(r"=\s*(.*?)\s(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")


def collective_bytes(hlo_text: str) -> dict[str, dict[str, float]]:
    """{op: {"count": n, "bytes": result bytes}} over the optimized HLO of one device's program."""
    out = {op: {"count": 0, "bytes": 0.0} for op in COLLECTIVES}
    for line in hlo_text.splitlines():
        m = _OP.search(line)
        if not m:
            continue
        size = 0
        for dtype, dims in _SHAPE.findall(m.group(1)):
            n = 1
            for d in filter(None, dims.split(",")):
                n *= int(d)
            size += n * _DTYPE_BYTES[dtype]
        out[m.group(2)]["count"] += 1
        out[m.group(2)]["bytes"] += size
    return out


def wire_bytes(coll: dict[str, dict[str, float]], n: int) -> float:
    """Bytes one device sends per step under ring algorithms (see the module docstring)."""
    if n <= 1:
        return 0.0
    return (coll["all-reduce"]["bytes"] * 2 * (n - 1) / n + coll["all-gather"]["bytes"] * (n - 1) / n
            + coll["reduce-scatter"]["bytes"] * (n - 1) + coll["all-to-all"]["bytes"] * (n - 1) / n
            + coll["collective-permute"]["bytes"])


def model_config(hidden: int, layers: int, heads: int) -> dict:
    return {"vocab_size": 1024, "hidden_size": hidden, "intermediate_size": hidden * 2, "num_hidden_layers": layers,
                "num_attention_heads": heads, "num_key_value_heads": heads, "max_position_embeddings": 1024,
                "tie_word_embeddings": False}


def compile_step(preset: str, devices: int, hidden: int, layers: int, seq: int, batch: int) -> dict:
    """Compile the train step for one point and read its costs (no step is run)."""
    import jax
    import numpy as np
    import optax

    from jtrain.compiled import build_compiled_steps
    from jtrain.flops import cost_analysis
    from jtrain.losses import causal_lm_loss
    from jtrain.models import create_model
    from jtrain.models.base import param_count
    from jtrain.sharding import make_mesh, resolve_mesh_shape, sharding_rules

    fsdp, axis = MESH_PRESETS[preset]
    mesh = make_mesh(resolve_mesh_shape({axis: devices}, fsdp, devices), jax.devices()[:devices])
    model = create_model("llama", model_config(hidden, layers, heads=8))
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=0.01))
    steps = build_compiled_steps(model, mesh, tx, 1e-3, causal_lm_loss, seed=0, rules=sharding_rules(fsdp))
    state = jax.eval_shape(steps.init_state)
    state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state,
                         steps.state_sharding)
    ids = np.zeros((1, batch, seq), np.int32)
    batch_arr = steps.place_train_batch({"input_ids": ids, "attention_mask": ids + 1, "labels": ids})
    compiled = steps.train_step.lower(state, batch_arr).compile()
    cost = cost_analysis(compiled)
    mem = compiled.memory_analysis()
    coll = collective_bytes(compiled.as_text())
    n_params = param_count(model.abstract_params())
    return {
        "preset": preset, "devices": devices, "hidden": hidden, "layers": layers, "seq": seq, "batch": batch,
        "params": n_params, "flops": cost.get("flops"), "bytes_accessed": cost.get("bytes accessed"),
        "arg_mb": getattr(mem, "argument_size_in_bytes", 0) / 2**20,
        "temp_mb": getattr(mem, "temp_size_in_bytes", 0) / 2**20,
        "collectives": {k: v["count"] for k, v in coll.items() if v["count"]},
        "wire_mb": wire_bytes(coll, devices) / 2**20,
    }


def sweep(small: bool, device_counts: list[int], presets: list[str]) -> list[dict]:
    """The base point, then one change at a time: devices, hidden x2, layers x2, sequence x2."""
    hidden, layers, seq, batch = (64, 2, 64, 8) if small else (128, 2, 128, 8)
    points = []
    for preset in presets:
        for n in device_counts:
            points.append((preset, n, hidden, layers, seq, batch))
        n = max(device_counts)
        points += [(preset, n, hidden * 2, layers, seq, batch), (preset, n, hidden, layers * 2, seq, batch),
                   (preset, n, hidden, layers, seq * 2, batch)]
    return [compile_step(*p) for p in points]


def predict(r: dict) -> tuple[float, float]:
    """(state MiB per device, wire MiB per device) that the preset should give, from first principles.

    State = float32 params + two AdamW moments (12 bytes per parameter): replicated for data,
    split n ways for fsdp and tensor, params whole but moments split for shard_grad_op. Wire:
    data all-reduces the gradients (2(n-1)/n x 4N); shard_grad_op reduce-scatters them and
    all-gathers the updated params (the same bytes); fsdp gathers the weights for the forward
    and again for the backward and reduce-scatters the gradients (3(n-1)/n x 4N); tensor
    all-reduces activations [B, L, D] twice per layer forward and twice backward
    (4 x layers x 2(n-1)/n x 4BLD), independent of the parameter count.
    """
    n, p4 = r["devices"], 4.0 * r["params"]
    if r["preset"] == "data":
        state, wire = 3 * p4, 2 * (n - 1) / n * p4
    elif r["preset"] == "shard_grad_op":
        state, wire = p4 + 2 * p4 / n, 2 * (n - 1) / n * p4
    elif r["preset"] == "fsdp":
        state, wire = 3 * p4 / n, 3 * (n - 1) / n * p4
    else:
        act = 4.0 * r["batch"] * r["seq"] * r["hidden"]
        state, wire = 3 * p4 / n, 4 * r["layers"] * 2 * (n - 1) / n * act
    return state / 2**20, wire / 2**20


def table(rows: list[dict]) -> str:
    header = ["preset", "devices", "hidden", "layers", "seq", "params", "GFLOP/device", "GB accessed/device",
              "args MiB/device (predicted state)", "temp MiB/device", "collectives (count)",
              "wire MiB/device (predicted)"]
    body = [[r["preset"], r["devices"], r["hidden"], r["layers"], r["seq"], r["params"],
             round((r["flops"] or 0) / 1e9, 3), round((r["bytes_accessed"] or 0) / 1e9, 3),
             f"{r['arg_mb']:.2f} ({predict(r)[0]:.2f})", round(r["temp_mb"], 2),
             ", ".join(f"{k} {v}" for k, v in r["collectives"].items()) or "none",
             f"{r['wire_mb']:.2f} ({predict(r)[1]:.2f})"] for r in rows]
    return bc.markdown_table(header, body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="a smaller model and sweep, for tests")
    ap.add_argument("--devices", default="2,4,8", help="device counts (at most 8 fake CPU devices)")
    ap.add_argument("--presets", default=",".join(MESH_PRESETS))
    a = ap.parse_args()
    counts = [int(x) for x in a.devices.split(",")]
    if max(counts) > MAX_DEVICES:
        raise SystemExit(f"--devices: at most {MAX_DEVICES} fake devices")
    for name in a.presets.split(","):
        if name not in MESH_PRESETS:
            raise SystemExit(f"unknown preset {name!r}; choose from {', '.join(MESH_PRESETS)}")
    rows = sweep(a.small, counts, a.presets.split(","))
    text = (f"Compiled train step per device on {max(counts)} fake CPU devices (command: `{bc.this_command()}`); "
            "batch rows are global, so data/fsdp devices each see batch/n rows.\n\n" + table(rows))
    print(text)
    bc.emit({"rows": rows, "markdown": text})


if __name__ == "__main__":
    main()
