"""jtrain's `Trainer` vs HF's `transformers.Trainer` (PyTorch) on the same Llama model, side by side.

    python benchmarks/vs_hf.py --presets tiny --precisions fp32 [--steps 20] [--repeats 3] [--out FILE]
    python benchmarks/vs_hf.py --bf16          # shorthand for --precisions bf16
    python benchmarks/vs_hf.py --sides jtrain,hf,jax   # also a plain JAX program (benchmarks/plain_jax.py)

Both sides train the same architecture (same parameter count, vocabulary, sequence length and
batch) on the same random tokens in the same (sequential) order, with AdamW (weight decay 0.01,
clipping at 1.0, linear schedule), no evaluation, no checkpoints, HF's default logging interval
(500) and no progress bar. Each run is a fresh child process (its own peak RSS and thread pool);
runs alternate jtrain, HF, jtrain, HF ... so that machine noise hits both. Step times come from
`on_step_end` wall times on both sides, the first `--warmup` steps dropped (their sum is the
warm-up time, which holds jtrain's compilation). MFU is the jtrain step's model FLOP count
(`jtrain.flop_count`, on its jaxpr; the same model work on both sides) over a matmul peak
measured in the same child, in the same precision and framework (JAX matmul for jtrain, torch
matmul for HF). A peak is the best the kernel reaches, so each child times it before and after its
training window and keeps the faster, and the summary keeps the best over a side's runs: one sample
taken in a slow minute of a shared host once read 189 against 319 GFLOP/s and put an MFU above 100%.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # bench_common, and jtrain without an install
import bench_common as bc

LEARNING_RATE, WEIGHT_DECAY, MAX_GRAD_NORM, SEED = 3e-4, 0.01, 1.0, 42


@dataclass(frozen=True)
class Preset:
    vocab: int
    hidden: int
    layers: int
    heads: int
    intermediate: int
    seq: int
    batch: int
    steps: int  # default measured steps (after warm-up) per run
    kv_heads: int | None = None  # grouped-query attention; None = one KV head per query head

    def hf_config(self) -> dict[str, Any]:
        return {"vocab_size": self.vocab, "hidden_size": self.hidden, "num_hidden_layers": self.layers,
                    "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads or self.heads,
                    "intermediate_size": self.intermediate, "max_position_embeddings": self.seq,
                    "tie_word_embeddings": False, "rms_norm_eps": 1e-6, "rope_theta": 10000.0}

    def param_count(self) -> int:
        d, f, v, n = self.hidden, self.intermediate, self.vocab, self.layers
        kv = (self.kv_heads or self.heads) * (d // self.heads)
        return 2 * v * d + n * (2 * d * d + 2 * d * kv + 3 * d * f + 2 * d) + d

    def formula_flops(self) -> float:
        """6 * N * tokens (N without the embedding lookup) + attention scores, fwd + bwd (PaLM's count)."""
        tokens = self.batch * self.seq
        n = self.param_count() - self.vocab * self.hidden
        return 6.0 * n * tokens + self.attention_flops()

    def attention_flops(self) -> float:
        """Scores and values over the full query x key grid, forward and backward."""
        return 12.0 * self.layers * self.hidden * self.seq * self.batch * self.seq


PRESETS = {
    "tiny": Preset(vocab=8192, hidden=256, layers=4, heads=4, intermediate=688, seq=256, batch=8, steps=30),
    # 58M parameters (half of them the untied embedding and head, as in small Llamas).
    "large": Preset(vocab=32000, hidden=512, layers=8, heads=8, intermediate=1376, seq=256, batch=8, steps=12),
    # For tests and smoke runs only: seconds per side.
    "smoke": Preset(vocab=512, hidden=64, layers=2, heads=4, intermediate=128, seq=32, batch=4, steps=4),
}


def token_rows(p: Preset, rows: int) -> dict[str, Any]:
    import numpy as np

    ids = np.random.default_rng(SEED).integers(0, p.vocab, size=(rows, p.seq)).astype(np.int32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids.copy()}


class _Times:
    """Per-step samples from on_step_end and the on_train_end time (one code for both frameworks).

    A sample is (wall s, process CPU s over all threads, minor page faults, kernel CPU s): CPU
    time is robust to a busy machine; faults and kernel time show the fresh memory a step touches.
    """

    def __init__(self) -> None:
        self.marks: list[tuple[float, float, int, float]] = []  # begin(), then one per step
        self.train_end = 0.0

    @staticmethod
    def _sample() -> tuple[float, float, int, float]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return time.perf_counter(), time.process_time(), usage.ru_minflt, usage.ru_stime

    def begin(self) -> None:
        self.marks = [self._sample()]

    def step_end(self) -> None:
        self.marks.append(self._sample())

    def summary(self, warmup: int, tokens_per_step: int) -> dict[str, Any]:
        deltas = [tuple(b_i - a_i for a_i, b_i in zip(a, b)) for a, b in itertools.pairwise(self.marks)]
        steps, cpu, faults, kernel = ([d[i] for d in deltas] for i in range(4))
        timed = steps[warmup:]
        window = self.train_end - self.marks[warmup][0]
        return {"warmup_s": sum(steps[:warmup]), "step_times": timed,
                "median_step_s": bc.median(timed), "median_step_cpu_s": bc.median(cpu[warmup:]),
                "median_step_page_faults": bc.median(faults[warmup:]),
                "median_step_kernel_s": bc.median(kernel[warmup:]),
                "window_tokens_per_s": tokens_per_step * len(timed) / window}


def _common_result(p: Preset, times: _Times, warmup: int, peak: float, loss: float) -> dict[str, Any]:
    tokens = p.batch * p.seq
    out = times.summary(warmup, tokens)
    out.update(tokens_per_step=tokens, tokens_per_s=tokens / out["median_step_s"], peak_flops=peak,
               peak_rss_mb=bc.peak_rss_mb(), train_loss=loss)
    return out


# ---- jtrain side ---------------------------------------------------------------------------------
def _profile_window(a: argparse.Namespace, total: int) -> dict[str, Any]:
    """TrainingArguments that trace the last two updates into `a.profile_dir` (none without one):
    two of the measured steps carry the tracer, which a median over many steps absorbs."""
    if not getattr(a, "profile_dir", ""):
        return {}
    return {"logging_dir": a.profile_dir, "profile_start_step": max(1, total - 1), "profile_num_steps": 2}


def jtrain_worker(a: argparse.Namespace, p: Preset) -> dict[str, Any]:
    """One jtrain run; `a.device` "cpu" pins JAX to the CPU, `a.peak` "matmul" measures the peak here."""
    if getattr(a, "device", "cpu") == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if a.xla_flags:
        from jtrain.xla_flags import apply_xla_flags

        apply_xla_flags(a.xla_flags.split(","))
    import jax

    from jtrain import Trainer, TrainerCallback, TrainingArguments, create_model
    from jtrain.data.loader import ArrayDataset
    from jtrain.flops import device_peak_flops, measure_matmul_peak, step_flops
    from jtrain.models.base import param_count

    times, dtype = _Times(), "bfloat16" if a.bf16 else "float32"
    total = a.steps + a.warmup

    class StepTimes(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            times.step_end()

        def on_train_end(self, args, state, control, **kw):
            times.train_end = time.perf_counter()

    options = {"dtype": "bfloat16" if a.bf16 else "float32", **json.loads(a.model_options or "{}")}
    model = create_model("llama", p.hf_config(), **options)
    with tempfile.TemporaryDirectory() as out:
        # Data parallel over every JAX device the flags made (one unless a variant asks for more):
        # the global batch stays p.batch, as HF's per-device batch times the device count.
        n_dev = len(jax.devices())
        if p.batch % n_dev:
            raise SystemExit(f"batch {p.batch} does not split over {n_dev} devices")
        args = TrainingArguments(
            output_dir=out, max_steps=total, per_device_train_batch_size=p.batch // n_dev,
            learning_rate=LEARNING_RATE,
            weight_decay=WEIGHT_DECAY, max_grad_norm=MAX_GRAD_NORM, bf16=a.bf16, save_strategy="no",
            report_to=["none"], disable_tqdm=True, mesh_shape={"data": n_dev}, seed=SEED,
            train_sampling_strategy="sequential", **_profile_window(a, total))
        rows = token_rows(p, total * p.batch)
        if getattr(a, "drop_attention_mask", False):  # no padding: lets a model take a causal-only attention path
            rows.pop("attention_mask")
        trainer = Trainer(model, args, train_dataset=ArrayDataset(rows), callbacks=[StepTimes()])
        device_peak_flops(dtype)  # the Trainer's MFU log measures a CPU peak once: cache it outside the window
        measured = not a.quick and getattr(a, "peak", "matmul") == "matmul"
        peak_before = measure_matmul_peak(dtype) if measured else 0.0
        times.begin()
        result = trainer.train()
        flops = result.metrics.get("train_flops_per_step")  # the Trainer's own count, when it reports one
        if not a.quick and not flops:
            batch = trainer.steps.place_train_batch({k: v[None, :p.batch] for k, v in token_rows(p, p.batch).items()})
            flops = step_flops(trainer.steps.train_step, trainer.train_state, batch, devices=n_dev)
        n_params = param_count(trainer.params)
        compiles = dict(trainer.steps.compile_log.counts)
    if a.quick:
        peak = None
    elif measured:
        peak = max(peak_before, measure_matmul_peak(dtype))
    else:
        peak = device_peak_flops(dtype)[0]
    out = _common_result(p, times, a.warmup, peak, result.training_loss)
    out.update(side="jtrain", params=n_params, step_flops=flops, compiles=compiles, device=str(jax.devices()[0]))
    stats = jax.devices()[0].memory_stats() or {}  # accelerators only; a CPU reports RSS above
    if "peak_bytes_in_use" in stats:
        out["peak_memory_mb"] = stats["peak_bytes_in_use"] / 2**20
    return out


# ---- HF side -------------------------------------------------------------------------------------
def torch_matmul_peak(dtype: Any, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the best of `repeats` n x n torch matmuls: the torch side's peak."""
    import torch

    x, y = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.matmul(x, y)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(x, y)
        best = min(best, time.perf_counter() - start)
    return 2.0 * n ** 3 / best


def hf_worker(a: argparse.Namespace, p: Preset) -> dict[str, Any]:
    """One HF run; on `a.device` "gpu" it needs torch with CUDA and transformers (else it reports
    itself skipped, so that a GPU machine without PyTorch still gets the jtrain numbers)."""
    gpu = getattr(a, "device", "cpu") == "gpu"
    try:
        import torch
        import transformers
    except ImportError as err:
        if not gpu:
            raise
        return {"side": "hf", "skipped": f"no PyTorch HF stack here ({err})"}
    if gpu and not torch.cuda.is_available():
        return {"side": "hf", "skipped": f"torch {torch.__version__} has no CUDA device here"}
    torch.set_num_threads(bc.cores())
    times = _Times()
    total = a.steps + a.warmup
    rows = token_rows(p, total * p.batch)

    class Rows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(rows["input_ids"])

        def __getitem__(self, i: int) -> dict:
            return {k: torch.from_numpy(v[i]).long() for k, v in rows.items()}

    class StepTimes(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            times.step_end()

        def on_train_end(self, args, state, control, **kw):
            times.train_end = time.perf_counter()

    transformers.set_seed(SEED)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**p.hf_config(), attn_implementation="sdpa"))
    with tempfile.TemporaryDirectory() as out:
        kwargs = dict(
            output_dir=out, max_steps=total, per_device_train_batch_size=p.batch, learning_rate=LEARNING_RATE,
            weight_decay=WEIGHT_DECAY, max_grad_norm=MAX_GRAD_NORM, bf16=a.bf16, save_strategy="no",
            eval_strategy="no", report_to="none", disable_tqdm=True, use_cpu=not gpu, seed=SEED,
            train_sampling_strategy="sequential", dataloader_num_workers=0)
        # A transformers from before the sampler unification (a GPU machine's may be older than ours)
        # lacks train_sampling_strategy; its random order costs the same on random tokens.
        known = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
        args = transformers.TrainingArguments(**{k: v for k, v in kwargs.items() if k in known})
        trainer = transformers.Trainer(model=model, args=args, train_dataset=Rows(), callbacks=[StepTimes()])
        peak_dtype = torch.bfloat16 if a.bf16 else torch.float32
        peak_before = 0.0 if gpu else torch_matmul_peak(peak_dtype)
        times.begin()
        result = trainer.train()
    if gpu:
        from jtrain.flops import PEAK_FLOPS

        name = torch.cuda.get_device_name()
        peak = next((v["bfloat16" if a.bf16 else "float32"] for k, v in PEAK_FLOPS.items() if name.startswith(k)), None)
        out_extra = {"device": name, "peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20}
    else:
        peak = max(peak_before, torch_matmul_peak(peak_dtype))
        out_extra = {}
    out = _common_result(p, times, a.warmup, peak, result.training_loss)
    out.update(side="hf", params=sum(t.numel() for t in model.parameters()), optim=args.optim,
               torch_threads=torch.get_num_threads(), **out_extra)
    return out


# ---- the parent: alternate, summarise, write ---------------------------------------------------------
SIDES = ("jtrain", "hf")  # the comparison the targets are about
ALL_SIDES = SIDES + ("jax",)  # "jax": the same model as a plain JAX program (plain_jax.py), on request


def _worker_for(side: str) -> Any:
    if side == "jax":
        import plain_jax

        return plain_jax.worker
    return jtrain_worker if side == "jtrain" else hf_worker


def run_pair(preset: str, bf16: bool, steps: int, warmup: int, repeats: int, xla_flags: str = "",
             model_options: str = "", sides: tuple[str, ...] = SIDES) -> dict[str, list]:
    runs: dict[str, list] = {s: [] for s in sides}
    for r in range(repeats):
        for side in sides:
            argv = [os.path.abspath(__file__), "--worker", side, "--presets", preset, "--steps", str(steps),
                    "--warmup", str(warmup)] + (["--bf16"] if bf16 else [])
            if side == "jtrain" and xla_flags:
                argv += [f"--xla-flags={xla_flags}"]
            if side == "jtrain" and model_options:
                argv += ["--model-options", model_options]
            res = bc.run_child(argv)
            runs[side].append(res)
            print(f"  [{preset} {'bf16' if bf16 else 'fp32'} run {r + 1}/{repeats}] {side:6s} "
                  f"median step {res['median_step_s'] * 1e3:8.1f} ms  {res['tokens_per_s']:10,.0f} tokens/s",
                  flush=True)
    return runs


def summarise(preset: str, bf16: bool, runs: dict[str, list]) -> dict[str, Any]:
    p = PRESETS[preset]
    flops = bc.median(r["step_flops"] for r in runs["jtrain"])
    row: dict[str, Any] = {"preset": preset, "precision": "bf16" if bf16 else "fp32", "step_flops": flops,
                           "formula_flops": p.formula_flops()}
    for side, rs in runs.items():
        step = bc.median(r["median_step_s"] for r in rs)
        peaks = [r["peak_flops"] for r in rs if r.get("peak_flops")]
        peak = max(peaks) if peaks else None  # the best the kernel reached in any run (see the docstring)
        row[side] = {
            "params": rs[0]["params"], "warmup_s": bc.median(r["warmup_s"] for r in rs), "median_step_s": step,
            "tokens_per_s": bc.median(r["tokens_per_s"] for r in rs),
            "window_tokens_per_s": bc.median(r["window_tokens_per_s"] for r in rs),
            "peak_flops": peak, "mfu": (flops / step / peak) if (flops and step and peak) else None,
            "peak_rss_mb": bc.median(r["peak_rss_mb"] for r in rs),
            "train_loss": bc.median(r["train_loss"] for r in rs),
            "runs_tokens_per_s": [round(r["tokens_per_s"]) for r in rs],
            "median_step_page_faults": bc.median(r["median_step_page_faults"] for r in rs),
            "median_step_kernel_s": bc.median(r["median_step_kernel_s"] for r in rs),
        }
    row["ratio"] = row["jtrain"]["tokens_per_s"] / row["hf"]["tokens_per_s"]
    row["fair"] = all(row[side]["params"] == p.param_count() for side in runs)
    if "jax" in runs:
        row["ratio_jax"] = row["jtrain"]["tokens_per_s"] / row["jax"]["tokens_per_s"]
    return row


TARGETS = {"fp32": 1.25, "bf16": 1.0}


def ratios_text(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        target = TARGETS[r["precision"]]
        verdict = "meets" if r["ratio"] >= target else "below"
        lines.append(f"- {r['preset']} {r['precision']}: jtrain / HF tokens/s = **{r['ratio']:.3f}** "
                     f"({verdict} the target {target}); MFU jtrain {bc.fmt(r['jtrain']['mfu'], '.1%')} vs HF "
                     f"{bc.fmt(r['hf']['mfu'], '.1%')}")
        if "ratio_jax" in r:
            lines[-1] += (f"; jtrain / plain JAX = **{r['ratio_jax']:.3f}**, plain JAX / HF = "
                          f"{r['jax']['tokens_per_s'] / r['hf']['tokens_per_s']:.3f}")
    return "\n".join(lines)


def table_text(rows: list[dict]) -> str:
    header = ["preset", "precision", "side", "params", "warm-up s", "median step ms", "tokens/s",
              "tokens/s (window)", "MFU", "matmul peak GFLOP/s", "peak RSS MiB", "page faults / step",
              "kernel ms / step", "train loss", "runs tokens/s"]
    body = []
    for r in rows:
        for side in (side for side in ALL_SIDES if side in r):
            s = r[side]
            body.append([r["preset"], r["precision"], side, s["params"], round(s["warmup_s"], 2),
                         round(s["median_step_s"] * 1e3, 1), round(s["tokens_per_s"]),
                         round(s["window_tokens_per_s"]), bc.fmt(s["mfu"], ".1%"), round(s["peak_flops"] / 1e9, 1),
                         round(s["peak_rss_mb"]), round(s["median_step_page_faults"]),
                         round(s["median_step_kernel_s"] * 1e3),
                         round(s["train_loss"], 4), s["runs_tokens_per_s"]])
    flops = ["", "FLOPs per step, jtrain step's model FLOPs vs 6·N·tokens + 12·layers·hidden·seq·tokens:"]
    for r in rows:
        c, f = r["step_flops"], r["formula_flops"]
        flops.append(f"- {r['preset']} {r['precision']}: counted {bc.fmt(c, '.4g')}, formula {f:.4g}, "
                     f"ratio {bc.fmt(c / f if c else None, '.3f')}; parameter counts equal on every side and "
                     f"to the formula: {r['fair']}")
    return bc.markdown_table(header, body) + "\n" + "\n".join(flops)


def print_rows(rows: list[dict]) -> None:
    print("\n== ratios (jtrain / HF tokens per second) ==")
    print(ratios_text(rows))
    print("\n== per side ==")
    print(table_text(rows))


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="tiny", help=f"comma-separated: {', '.join(PRESETS)}")
    ap.add_argument("--precisions", default="fp32", help="comma-separated: fp32, bf16")
    ap.add_argument("--bf16", action="store_true", help="bf16=True on both sides (same as --precisions bf16)")
    ap.add_argument("--steps", type=int, default=None, help="measured steps per run (default: the preset's)")
    ap.add_argument("--warmup", type=int, default=3, help="steps dropped at the start of each run")
    ap.add_argument("--repeats", type=int, default=3, help="runs per side, alternating")
    ap.add_argument("--xla-flags", default="", help="comma-separated XLA flags for the jtrain side")
    ap.add_argument("--model-options", default="", help='jtrain model options as JSON, e.g. {"scan_layers": true}')
    ap.add_argument("--out", default=None, help="write RESULTS markdown here (e.g. benchmarks/RESULTS.md)")
    ap.add_argument("--overhead", action="store_true", help="also run trainer_overhead.py and include it")
    ap.add_argument("--overhead-args", default="", help="extra arguments for trainer_overhead.py")
    ap.add_argument("--scaling", action="store_true", help="also run scaling.py and include its table")
    ap.add_argument("--scaling-args", default="", help="extra arguments for scaling.py")
    ap.add_argument("--sides", default=",".join(SIDES),
                    help="comma-separated, alternating in this order: jtrain, hf (both required), jax (a plain "
                         "JAX program of the same model, benchmarks/plain_jax.py)")
    ap.add_argument("--worker", choices=ALL_SIDES, help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.bf16 and not a.worker:
        a.precisions = "bf16"
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse(argv)
    if a.worker:
        a.preset = a.presets
        a.steps = a.steps if a.steps is not None else PRESETS[a.preset].steps
        bc.emit(_worker_for(a.worker)(a, PRESETS[a.preset]))
        return
    sides = tuple(a.sides.split(","))
    if not set(SIDES) <= set(sides) <= set(ALL_SIDES):
        raise SystemExit(f"--sides {a.sides!r}: jtrain and hf are required, and only {', '.join(ALL_SIDES)} exist")
    command = bc.this_command()
    head = bc.machine_section(command)
    rows = []
    for preset in a.presets.split(","):
        if preset not in PRESETS:
            raise SystemExit(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
        for precision in a.precisions.split(","):
            if precision not in TARGETS:
                raise SystemExit(f"unknown precision {precision!r}; choose fp32 or bf16")
            steps = a.steps if a.steps is not None else PRESETS[preset].steps
            runs = run_pair(preset, precision == "bf16", steps, a.warmup, a.repeats, a.xla_flags, a.model_options,
                            sides)
            rows.append(summarise(preset, precision == "bf16", runs))
    print_rows(rows)
    extra = []
    if a.overhead:
        extra.append(("Trainer.train() overhead (issue #4)", _side_script("trainer_overhead.py", a.overhead_args)))
    if a.scaling:
        extra.append(("Scaling: the compiled steps on 8 fake CPU devices", _side_script("scaling.py", a.scaling_args)))
    if a.out:
        write_results(a.out, head, rows, extra)
        print(f"\nwrote {a.out}")


def _side_script(name: str, extra_args: str) -> str:
    """Run another benchmark script; its markdown (after a RESULT line's `markdown`) goes into RESULTS."""
    res = bc.run_child([os.path.join(os.path.dirname(os.path.abspath(__file__)), name), *extra_args.split()])
    print(res["markdown"])
    return res["markdown"]


def write_results(path: str, head: str, rows: list[dict], extra: list[tuple[str, str]]) -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    parts = ["# jtrain benchmarks\n", "Written by `benchmarks/vs_hf.py`; regenerate with the command below.\n",
             "## Run\n", head, "## jtrain / HF Trainer, ratios first\n", ratios_text(rows) + "\n",
             "## Per side (medians over the alternating runs)\n", table_text(rows) + "\n",
             FAIRNESS]
    sections = dict(extra)
    overhead = [t for t in sections if t.startswith("Trainer.train()")]
    for title in overhead:
        parts += [f"## {title}\n", sections.pop(title) + "\n"]
    for name in ("GPU.md", "TRIED.md", "SCALING.md"):  # hand-written notes kept beside the scripts
        notes = os.path.join(here, name)
        if os.path.exists(notes):
            with open(notes) as fh:
                parts.append(fh.read())
    for title, text in sections.items():  # the scaling table, after the notes that explain it
        parts += [f"## {title}\n", text + "\n"]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        fh.write("\n".join(parts))


FAIRNESS = """## How the comparison is kept fair

- Same model: Llama with untied head, RMSNorm eps 1e-6, rope theta 1e4; the parameter counts of both
  sides are compared with each other and with the closed formula (`params` column, and the check above).
- Same work per step: batch x sequence tokens of the same random rows, in the same sequential order,
  one optimizer update per step (no accumulation), every token a label.
- Same optimizer: AdamW lr 3e-4, weight decay 0.01, eps 1e-8, betas (0.9, 0.999), clipping at 1.0,
  linear decay, no warm-up. HF uses its own default implementation (`adamw_torch_fused` in
  transformers 5), the strongest it offers on CPU without extra packages.
- Nothing else in the step: no evaluation, no checkpoint saving (`save_strategy="no"`), HF's default
  logging interval (500) on both, no progress bar, no reporting integrations, one process.
- Threads: torch.set_num_threads(cores) on the HF side; XLA's CPU client sizes its intra-op pool to
  the cores by default. Each run is a fresh process, so neither inherits the other's pools or caches
  (jtrain compiles from scratch every run: the persistent compilation cache is off).
- bf16: `bf16=True` on both sides; HF autocasts matmuls to bf16 with float32 weights, jtrain computes
  in bf16 (`dtype="bfloat16"`) with float32 master weights, norms, softmax and loss in float32.
- Timing: `on_step_end` wall times on both sides with the first steps dropped. jtrain's loop reads step
  N-1's metrics after dispatching step N, so its step marks are one step behind but evenly spaced; the
  window column (`tokens/s (window)`) ends at `on_train_end`, after the device is synchronised.
- MFU: the jtrain step's model FLOPs (`jtrain.flops.step_flops`, counted on its jaxpr) over a 2048x2048 matmul
  measured in the same child process, in the same precision and framework: the best of 5 before the
  training window and 5 after it, and the best over a side's runs.
- Memory: both processes run glibc's malloc with its defaults; on the jtrain side XLA's own blocks of
  32 MiB or more go to jtrain's host buffer cache (`jtrain.host_buffers`, part of every jtrain CPU
  run), which keeps each step's scratch buffer mapped for the next step, and the plain JAX side runs
  without it. The page-fault and kernel-time columns (medians per step, from `getrusage`) show the
  fresh memory each step touches (torch's large tensors on the HF side), and peak RSS what it costs.
"""


if __name__ == "__main__":
    main()
