"""A ~1B Llama in bf16 at sequence 2048 on one GPU: jtrain (cuDNN fused attention) vs HF Trainer.

    python benchmarks/gpu_1b.py [--steps 20] [--out benchmarks/RESULTS_GPU.md]   # one H200: < 8 minutes
    python benchmarks/gpu_1b.py --small                                          # CPU, seconds, for tests

The model is TinyLlama-1.1B's shape (hidden 2048, 22 layers, 32 heads, 4 KV heads, intermediate
5632, vocab 32000), batch 8 x 2048 tokens, AdamW with clipping, bf16 compute with float32
master weights on both sides. jtrain uses its default `attention_impl="auto"`, which takes cuDNN's
fused flash kernel on an NVIDIA GPU in bf16 (any warning jtrain logs, such as a fallback to XLA's
attention, is printed with the results); HF uses PyTorch SDPA (its flash kernel). MFU is the
jtrain step's model FLOPs (`jtrain.flop_count`: matmuls and attention over the full query x key
grid, as PaLM's formula counts them) over the datasheet bf16 dense peak
(`jtrain.flops.PEAK_FLOPS`); the HF side uses the same FLOP count (same model and tokens). A
second figure leaves out the masked half of causal attention (work no kernel needs to do). The
HF side is skipped, with the reason printed, when torch has no CUDA. `--small` runs a tiny model
on the CPU (XLA attention, measured matmul peak) so the script is tested where no GPU exists.
Each side runs in its own process, one after the other, so neither holds GPU memory for the other.
If the cuDNN run fails outright (no cuDNN, a kernel the GPU lacks), jtrain runs again with XLA's
attention and the table says why: a GPU session is rare, and it should bring back numbers either way.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]
import bench_common as bc
import vs_hf

PRESETS = {
    "1b": vs_hf.Preset(vocab=32000, hidden=2048, layers=22, heads=32, intermediate=5632, seq=2048, batch=8,
                       steps=20, kv_heads=4),
    "small": vs_hf.Preset(vocab=512, hidden=64, layers=2, heads=4, intermediate=128, seq=64, batch=2, steps=3,
                          kv_heads=2),
}
TARGET_MFU = 0.45


def worker(a: argparse.Namespace) -> dict:
    p = PRESETS[a.preset]
    a.bf16, a.quick = True, False
    if a.worker == "jtrain":
        a.device, a.peak = ("cpu", "matmul") if a.preset == "small" else ("gpu", "table")
        a.model_options = json.dumps({"attention_impl": a.attention, **json.loads(a.model_options or "{}")})
        if a.profile_dir:
            _perfetto_traces_too()
        # Rows have no padding: without an attention_mask the model sees a purely causal batch (HF's
        # SDPA likewise drops an all-ones mask and runs its causal flash kernel).
        a.drop_attention_mask = True
        warned = _capture_jtrain_warnings()
        try:
            return {**vs_hf.jtrain_worker(a, p), "attention": a.attention, "warnings": warned}
        except Exception as err:  # reported to the parent, which retries with XLA's attention
            if a.attention == "xla":
                raise
            return {"side": "jtrain", "attention": a.attention, "failed": f"{type(err).__name__}: {err}"}
    a.device = "cpu" if a.preset == "small" else "gpu"
    return vs_hf.hf_worker(a, p)


def _capture_jtrain_warnings() -> list[str]:
    """A list that fills with every warning jtrain logs in this process: with `attention_impl: auto`,
    a fallback from cuDNN to XLA's attention is one of them, and the summary must say so."""
    import logging

    warned: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            warned.append(record.getMessage())

    logging.getLogger("jtrain").addHandler(Keep(logging.WARNING))
    return warned


def _perfetto_traces_too() -> None:
    """Make the Trainer's profiler window (profile_start_step) also write perfetto_trace.json.gz,
    which plain `json` reads (the .xplane.pb beside it needs XProf): gpu_probe.py sums its kernels."""
    import inspect

    import jax

    if "create_perfetto_trace" in inspect.signature(jax.profiler.start_trace).parameters:
        jax.profiler.start_trace = functools.partial(jax.profiler.start_trace, create_perfetto_trace=True)


def summary(p: vs_hf.Preset, runs: dict[str, dict]) -> str:
    j, h = runs["jtrain"], runs["hf"]
    flops = j.get("step_flops")
    head = (f"Llama with {p.param_count() / 1e6:,.1f}M parameters, bf16, sequence {p.seq}, batch {p.batch}, "
            f"{p.batch * p.seq} tokens per step; model FLOPs per step {bc.fmt(flops, '.4g')} "
            f"(formula 6·N·T + attention: {p.formula_flops():.4g}).")
    lines = [head, ""]
    rows = []
    if j.get("cudnn_failure"):
        lines += [f"The cuDNN run failed ({j['cudnn_failure'][:300]}); jtrain ran again with XLA's attention.", ""]
    lines += [f"jtrain warned: {w[:300]}" for w in j.get("warnings", [])] + [""] * bool(j.get("warnings"))
    for side, r in (("jtrain", j), ("hf", h)):
        if side == "jtrain":
            side = f"jtrain ({r['attention']} attention)"
        if r.get("skipped"):
            rows.append([side, "skipped: " + r["skipped"]] + [""] * 5)
            continue
        mfu = flops / r["median_step_s"] / r["peak_flops"] if (flops and r.get("peak_flops")) else None
        r["mfu"] = mfu
        mem = r.get("peak_memory_mb", r["peak_rss_mb"])
        rows.append([side, r.get("device", "cpu"), round(r["warmup_s"], 1), round(r["median_step_s"] * 1e3, 1),
                     round(r["tokens_per_s"]), bc.fmt(mfu, ".1%"), round(mem)])
    lines.append(bc.markdown_table(["side", "device", "warm-up s", "median step ms", "tokens/s", "MFU",
                                    "peak memory MiB"], rows))
    if not h.get("skipped"):
        lines.append(f"\njtrain / HF tokens/s = **{j['tokens_per_s'] / h['tokens_per_s']:.3f}**")
    if j.get("mfu") is not None:
        verdict = "meets" if j["mfu"] >= TARGET_MFU else "below"
        lines.append(f"\njtrain MFU {j['mfu']:.1%} ({verdict} the target {TARGET_MFU:.0%} on an H200; "
                     "meaningless on a CPU, where the peak is a measured matmul)")
        causal = (p.formula_flops() - p.attention_flops() / 2) / j["median_step_s"] / j["peak_flops"]
        lines.append(f"\njtrain MFU by the formula without the masked half of causal attention: {causal:.1%}")
    return "\n".join(lines)


def worker_argv(side: str, preset: str, steps: int, warmup: int, attention: str, xla_flags: str = "",
                model_options: str = "", profile_dir: str = "") -> list[str]:
    """The command line of one worker child of this script (gpu_probe.py runs jtrain workers too)."""
    argv = [os.path.abspath(__file__), "--worker", side, "--preset", preset, "--steps", str(steps),
            "--warmup", str(warmup), "--attention", attention]
    if side == "jtrain":
        argv += [f"--xla-flags={xla_flags}", f"--model-options={model_options}", f"--profile-dir={profile_dir}"]
    return argv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="a tiny model on the CPU (for tests)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=None, help="write the markdown summary here")
    ap.add_argument("--attention", choices=("auto", "cudnn", "xla"), default=None,
                    help="jtrain's attention_impl (default: auto, jtrain's own default, which picks cuDNN on "
                         "the GPU; xla with --small)")
    ap.add_argument("--xla-flags", default="", help="comma-separated XLA flags for the jtrain side")
    ap.add_argument("--model-options", default="", help="JSON model options for the jtrain side")
    ap.add_argument("--profile-dir", default="",
                    help="jtrain side: trace the last two updates into this folder (jax.profiler + perfetto)")
    ap.add_argument("--worker", choices=vs_hf.SIDES, help=argparse.SUPPRESS)
    ap.add_argument("--preset", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        a.steps = a.steps if a.steps is not None else PRESETS[a.preset].steps
        bc.emit(worker(a))
        return
    name = "small" if a.small else "1b"
    steps = a.steps if a.steps is not None else PRESETS[name].steps
    attention = a.attention or ("xla" if a.small else "auto")
    runs = {}
    for side in vs_hf.SIDES:
        argv = functools.partial(worker_argv, side, name, steps, a.warmup, xla_flags=a.xla_flags,
                                 model_options=a.model_options, profile_dir=a.profile_dir)
        try:
            runs[side] = bc.run_child(argv(attention))
        except RuntimeError as err:
            if side == "jtrain" and attention == "xla":
                raise
            # A jtrain child that died outright (a crash inside a cuDNN kernel) is retried below like one
            # that reported its failure; the jtrain numbers are what a rare GPU session is for, so they
            # are reported whatever the peer did.
            runs[side] = ({"side": side, "failed": str(err)[-600:]} if side == "jtrain" else
                          {"side": side, "skipped": f"the HF run failed: {str(err).splitlines()[-1]}"})
        if runs[side].get("failed"):
            failure = runs[side]["failed"]
            print(f"jtrain with {attention} attention failed: {failure}\nrunning it again with xla attention")
            runs[side] = {**bc.run_child(argv("xla")), "cudnn_failure": failure}
    text = summary(PRESETS[name], runs)
    print(text)
    if a.out:
        with open(a.out, "w") as fh:
            fh.write("# jtrain vs HF Trainer on one GPU, ~1B Llama, bf16\n\n" + bc.machine_section(bc.this_command())
                     + "\n" + text + "\n")
        print(f"\nwrote {a.out}")
    bc.emit({"runs": runs, "markdown": text})


if __name__ == "__main__":
    main()
