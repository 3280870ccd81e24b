"""What a GPU session measures after gpu_1b.py, so that the next session (maybe without a GPU) knows
where the 1B step's time goes and what to try.

    python benchmarks/gpu_probe.py --budget 240 --out-dir $OUT     # on the GPU, after gpu_1b.py
    python benchmarks/gpu_probe.py --small --out-dir /tmp/probe     # CPU, seconds, for tests

1. Ceilings, measured (datasheet rates are leads): a bf16 matmul through JAX on random data and a
   device-to-device copy (bytes read plus written), each the median of 5 bursts of 10 calls.
2. Variants of gpu_1b.py's jtrain run, each in its own process, in order of expected value, while
   the time budget lasts: the base again with its last two updates traced (a second sample of the
   base, and the trace), then one change each. Each row gives the median step, tokens/s and MFU
   against both the datasheet and the measured matmul ceiling.
3. The trace summed per GPU kernel (perfetto_trace.json.gz, read with plain json): time by kind
   (matmul, attention, XLA fusion, copy, other), the busy fraction of the traced window, the top
   kernels. The gzipped trace comes back too when it is small enough (under 15 MiB).

Results: probe.md (the tables), probe.json, trace.json.gz under --out-dir.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]
import bench_common as bc
import gpu_1b

# (name, XLA flags, model options, attention): each a question a user of the GPU path would ask.
# Measured on an H200 on 2026-11-29 (benchmarks/GPU.md) and since dropped from this list: no Triton
# GEMMs 213 vs 215 ms (noise); gradient checkpointing `dots_saveable` 231 ms, `full` 268 ms. XLA's own
# attention is not a variant: at batch 8 x 2048 its materialised scores need 148 GiB, and the memory
# plan refuses it before it runs. Open question: `scan_layers` compiles 9x faster but ran 256 vs
# 215 ms; do XLA:GPU's while-loop options (flag names checked against jaxlib 0.10.2's flag table)
# win the difference back? Since then `dots_saveable` also keeps cuDNN's attention forward outputs
# (it recomputed them in the 231 ms run): its variant sits beside plain nn.scan, whose layer body
# compiles in seconds, so the pair measures the policy's cost.
VARIANTS = [
    ("base, traced", "", {}, None),
    ("layers under nn.scan", "", {"scan_layers": True}, None),
    ("nn.scan, remat dots_saveable (keeps cuDNN attention)", "", {"scan_layers": True,
                                                                  "remat_policy": "dots_saveable"}, None),
    ("nn.scan, while-loop double buffering", "--xla_gpu_enable_while_loop_double_buffering=true",
     {"scan_layers": True}, None),
    ("nn.scan, XLA's automatic while-loop unrolling",
     "--xla_gpu_enable_while_loop_unrolling=WHILE_LOOP_UNROLLING_AUTO_UNROLL", {"scan_layers": True}, None),
    ("nn.scan, no CUDA-graph command buffers", "--xla_gpu_enable_command_buffer=", {"scan_layers": True}, None),
]
TRACE_LIMIT_BYTES = 15 * 2**20


def small_plan(variants: list[tuple]) -> list[tuple]:
    """The variants the CPU small mode runs: the first (the traced base) and one process with every
    variant's XLA:GPU flags together (each must still parse in this jaxlib), run with the model options
    of the first flagged variant. On the CPU the flags change nothing and the other model set-ups are
    the worker's model options, which the model tests cover; the small mode tests this script's paths
    (child processes, trace summary, tables), not the variants' effects, and each process is a compile."""
    flagged = [v for v in variants[1:] if v[1]]
    if not flagged:
        return variants[:1]
    _, _, options, attention = flagged[0]
    names = "; ".join(v[0] for v in flagged)
    return [variants[0], (f"the XLA:GPU flags of: {names}", ",".join(v[1] for v in flagged), options, attention)]


KINDS = [  # kernel name patterns, first match wins
    ("attention (cuDNN/flash)", re.compile(r"fmha|sdpa|flash|cudnn", re.I)),
    ("matmul (cuBLAS/cutlass/Triton GEMM)", re.compile(r"gemm|xmma|nvjet|cutlass|matmul|dot|wgmma", re.I)),
    ("copy / memset", re.compile(r"memcpy|memset|copy|transpose", re.I)),
    ("XLA fusion (elementwise, reductions)", re.compile(r"fusion|reduce|loop_|input_|convert|broadcast", re.I)),
]


def ceilings(small: bool) -> dict[str, float]:
    """Measured bf16 matmul FLOP/s and copy bytes/s on the default JAX device."""
    import jax
    import jax.numpy as jnp

    n, elems = (512, 2**22) if small else (8192, 2**30)
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(jnp.bfloat16)
    x = jax.random.normal(jax.random.key(2), (elems,), jnp.float32).astype(jnp.bfloat16)
    mm, cp = jax.jit(lambda p, q: p @ q), jax.jit(lambda v: v + 1)

    def median_seconds(fn, *args) -> float:
        """Per call, from bursts of 10 calls queued back to back, one host sync per burst. A sync per
        call adds its latency to a ~1.5 ms kernel: timed that way the first H200 run put the matmul
        at 588 TFLOP/s, below the 724 that the 1B step's own GEMMs averaged in its trace."""
        for _ in range(3):
            fn(*args).block_until_ready()
        times = []
        for _ in range(5):
            start = time.perf_counter()
            outs = [fn(*args) for _ in range(10)]
            jax.block_until_ready(outs)
            times.append((time.perf_counter() - start) / 10)
        return statistics.median(times)

    return {"device": str(jax.devices()[0].device_kind), "matmul_n": n,
            "matmul_flops": 2.0 * n ** 3 / median_seconds(mm, a, b),
            "copy_bytes": elems * 2 * 2, "copy_bytes_per_s": elems * 2 * 2 / median_seconds(cp, x)}


def kind_of(name: str) -> str:
    return next((kind for kind, pattern in KINDS if pattern.search(name)), "other")


def trace_summary(path: str, top: int = 25) -> dict[str, Any]:
    """Per-kernel totals of a perfetto trace's device events (every event where no device exists)."""
    with gzip.open(path, "rt") as fh:
        data = json.load(fh)
    events = data["traceEvents"] if isinstance(data, dict) else data
    procs = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e["tid"]): e.get("args", {}).get("name", "") for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    device_pids = {pid for pid, name in procs.items() if re.search(r"/device:(GPU|TPU)", name)}
    # A GPU process holds the kernels on its "Stream #N" lines and, beside them, lines that span
    # them again (XLA Modules, XLA Ops, Steps): only the streams are summed, or time counts twice.
    streams = {key for key, name in threads.items() if key[0] in device_pids and name.startswith("Stream")}
    spans = [e for e in events if e.get("ph") == "X" and "dur" in e
             and (not device_pids or e["pid"] in device_pids)
             and (not streams or (e["pid"], e["tid"]) in streams)]
    if not spans:
        return {"source": path, "events": 0}
    per_name: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    per_kind: dict[str, float] = collections.Counter()
    for e in spans:
        entry = per_name[e["name"]]
        entry[0] += 1
        entry[1] += e["dur"]
        per_kind[kind_of(e["name"])] += e["dur"]
    begin = min(e["ts"] for e in spans)
    end = max(e["ts"] + e["dur"] for e in spans)
    busy = _union_length(sorted((e["ts"], e["ts"] + e["dur"]) for e in spans))
    ranked = sorted(per_name.items(), key=lambda kv: -kv[1][1])[:top]
    return {"source": path, "events": len(spans), "device_lines": sorted(threads[k] for k in threads
                                                                          if k[0] in device_pids),
            "window_us": end - begin, "busy_us": busy, "kernel_us": sum(per_kind.values()),
            "by_kind_us": dict(per_kind), "top": [{"name": n, "count": c, "us": us} for n, (c, us) in ranked]}


def _union_length(intervals: list[tuple[float, float]]) -> float:
    total, cur_start, cur_end = 0.0, None, None
    for start, end in intervals:
        if cur_end is None or start > cur_end:
            total += (cur_end - cur_start) if cur_end is not None else 0.0
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    return total + ((cur_end - cur_start) if cur_end is not None else 0.0)


def run_variant(preset: str, steps: int, name: str, flags: str, options: dict, attention: str | None,
                default_attention: str, profile_dir: str, timeout: float) -> dict[str, Any]:
    argv = gpu_1b.worker_argv("jtrain", preset, steps, 3, attention or default_attention, xla_flags=flags,
                              model_options=json.dumps(options), profile_dir=profile_dir)
    start = time.time()
    try:
        r = bc.run_child(argv, timeout=timeout)
    except Exception as err:  # a variant that fails or runs out of time is a finding, not a stop
        return {"variant": name, "failed": f"{type(err).__name__}: {str(err)[-400:]}", "wall_s": time.time() - start}
    return {"variant": name, "wall_s": time.time() - start, **r}


def markdown(ceil: dict[str, Any], rows: list[dict[str, Any]], trace: dict[str, Any] | None) -> str:
    out = [f"Device {ceil['device']}: bf16 matmul {ceil['matmul_n']}³ **{ceil['matmul_flops'] / 1e12:.0f} TFLOP/s** "
           f"measured (median of 5 bursts of 10, random data); copy {ceil['copy_bytes'] / 2**30:.1f} GiB "
           "read+written at "
           f"**{ceil['copy_bytes_per_s'] / 1e12:.2f} TB/s**.", ""]
    table = []
    for r in rows:
        if r.get("failed") or r.get("failed_attention"):
            table.append([r["variant"], "failed: " + r.get("failed", "")[:200], "", "", "", "", round(r["wall_s"])])
            continue
        flops, step = r.get("step_flops"), r["median_step_s"]
        mfu = flops / step / r["peak_flops"] if flops and r.get("peak_flops") else None
        measured = flops / step / ceil["matmul_flops"] if flops else None
        table.append([r["variant"], round(r["warmup_s"], 1), round(step * 1e3, 1), round(r["tokens_per_s"]),
                      bc.fmt(mfu, ".1%"), bc.fmt(measured, ".1%"), round(r["wall_s"])])
    out.append(bc.markdown_table(["variant", "warm-up s", "median step ms", "tokens/s", "MFU (datasheet)",
                                  "of measured matmul", "process s"], table))
    if trace and trace.get("events"):
        w = trace["window_us"]
        out += ["", f"Trace of the last two updates of the traced run: {trace['events']} device events over "
                    f"{w / 1e3:.1f} ms; the device was busy {trace['busy_us'] / w:.1%} of that window.", ""]
        kinds = sorted(trace["by_kind_us"].items(), key=lambda kv: -kv[1])
        out.append(bc.markdown_table(["kernel kind", "ms", "share of kernel time"],
                                     [[k, round(us / 1e3, 2), f"{us / trace['kernel_us']:.1%}"] for k, us in kinds]))
        out += ["", bc.markdown_table(["kernel", "calls", "ms", "kind"],
                                      [[t["name"][:90], t["count"], round(t["us"] / 1e3, 2), kind_of(t["name"])]
                                       for t in trace["top"]])]
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="a tiny model on the CPU (for tests)")
    ap.add_argument("--budget", type=float, default=240.0, help="seconds for the whole probe")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--ceilings", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    start = time.time()
    os.makedirs(a.out_dir, exist_ok=True)
    if a.small:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if a.ceilings:
        bc.emit(ceilings(a.small))
        return
    preset, attention = ("small", "xla") if a.small else ("1b", "auto")
    steps = a.steps or (3 if a.small else 12)
    # In a child: JAX takes most of the GPU's memory when its backend starts, and the variants after
    # this need it.
    ceil = bc.run_child([os.path.abspath(__file__), "--ceilings", "--out-dir", a.out_dir] + (["--small"] * a.small),
                        timeout=120)
    print(f"ceilings: {ceil}", flush=True)
    rows, trace = [], None
    with tempfile.TemporaryDirectory() as tmp:
        variants = small_plan(VARIANTS) if a.small else VARIANTS
        for i, (name, flags, options, attn) in enumerate(variants):
            left = a.budget - (time.time() - start)
            if left < 30:
                print(f"budget spent: {len(variants) - i} variants not run", flush=True)
                break
            profile_dir = os.path.join(tmp, "trace") if i == 0 else ""
            row = run_variant(preset, steps, name, flags, options, attn, attention, profile_dir, left - 5)
            rows.append(row)
            print(f"{name}: " + (row.get("failed") or f"median step {row['median_step_s'] * 1e3:.1f} ms"), flush=True)
            if i == 0:
                found = glob.glob(os.path.join(profile_dir, "**", "perfetto_trace.json.gz"), recursive=True)
                if found:
                    trace = trace_summary(found[0])
                    if os.path.getsize(found[0]) <= TRACE_LIMIT_BYTES:
                        shutil.copy(found[0], os.path.join(a.out_dir, "trace.json.gz"))
    text = markdown(ceil, rows, trace)
    with open(os.path.join(a.out_dir, "probe.md"), "w") as fh:
        fh.write(text)
    with open(os.path.join(a.out_dir, "probe.json"), "w") as fh:
        json.dump({"ceilings": ceil, "variants": rows, "trace": trace}, fh, indent=1, default=str)
    print(text)


if __name__ == "__main__":
    main()
