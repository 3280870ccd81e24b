"""The benchmark scripts run end to end in their small modes (no wall time is asserted).

They are scripts, not library code, so each is run as a subprocess the way a user runs it; the
checks are on what they print and write: every field of the comparison, and RESULTS markdown
at the path given. The scaling script's HLO parsing and per-device memory are checked against
what sharding must give on the fake devices.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jtrain.errors import ConfigError
from jtrain.xla_flags import apply_xla_flags, merge_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCH)
import gpu_1b  # noqa: E402  (scripts beside the benchmarks, importable once BENCH is on the path)
import gpu_probe  # noqa: E402


def _run(script: str, *args: str, tmp_path) -> tuple[str, dict]:
    env = {**os.environ, "JTRAIN_PEAK_CACHE": str(tmp_path / "peak_cache")}
    proc = subprocess.run([sys.executable, os.path.join(BENCH, script), *args], capture_output=True, text=True,
                          check=False, env=env, cwd=str(tmp_path), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    return proc.stdout, (json.loads(result[-1][len("RESULT "):]) if result else {})


def test_vs_hf_smoke_prints_every_field_and_writes_results(tmp_path):
    out = tmp_path / "bench" / "RESULTS.md"
    stdout, _ = _run("vs_hf.py", "--presets", "smoke", "--steps", "2", "--warmup", "1", "--repeats", "1",
                     "--sides", "jtrain,hf,jax", "--out", str(out), tmp_path=tmp_path)
    ratios = stdout.index("== ratios")
    assert ratios < stdout.index("== per side")  # ratios first
    assert "smoke fp32: jtrain / HF tokens/s = **" in stdout and "; jtrain / plain JAX = **" in stdout
    assert "| smoke | fp32 | jax |" in stdout  # the plain JAX side's row
    for column in ("warm-up s", "median step ms", "tokens/s", "MFU", "matmul peak GFLOP/s", "peak RSS MiB"):
        assert column in stdout
    # Same model on both sides: the parameter counts agree with each other and with the formula.
    assert "equal on every side and to the formula: True" in stdout
    text = out.read_text()
    for heading in ("## Run", "## jtrain / HF Trainer, ratios first", "## Per side", "## How the comparison"):
        assert heading in text
    assert "vs_hf.py --presets smoke" in text and "model name" not in text and "jax " in text
    assert "- CPU matmul features: " in text  # AMX or not decides the bf16 ratio (TRIED.md)


def test_vs_hf_summary_takes_the_best_peak_over_runs():
    """A peak is the best the kernel reaches: one run timed in a slow minute must not pull it down (a median
    of the runs' peaks once read 189 against a best of 319 GFLOP/s and gave an MFU above 100%)."""
    import vs_hf

    def run(step: float, peak: float) -> dict:
        return {"median_step_s": step, "tokens_per_s": 2048 / step, "window_tokens_per_s": 2048 / step,
                "warmup_s": 1.0, "peak_flops": peak, "peak_rss_mb": 1.0, "train_loss": 1.0, "params": 1,
                "median_step_page_faults": 0, "median_step_kernel_s": 0.0, "step_flops": 4e11}

    row = vs_hf.summarise("tiny", False, {"jtrain": [run(2.0, 1.9e11), run(2.0, 3.0e11), run(2.0, 2.0e11)],
                                          "hf": [run(2.5, 3.2e11), run(2.5, 2.5e11), run(2.5, 2.4e11)]})
    assert row["jtrain"]["peak_flops"] == 3.0e11 and row["hf"]["peak_flops"] == 3.2e11
    assert row["jtrain"]["mfu"] == pytest.approx(4e11 / 2.0 / 3.0e11)  # exact arithmetic; approx for rounding
    assert row["ratio"] == pytest.approx(1.25)


def test_plain_jax_side_is_the_same_model_as_hf_llama():
    """benchmarks/plain_jax.py must be the model the two Trainers train, or its ratio means nothing:
    HF's LlamaForCausalLM with the plain side's weights (Linear weights are [out, in]: transposed)
    gives the same logits. Tolerance: float32 on both sides, summed in different orders over 2
    layers: the logits (up to 0.36) agree to 7e-8; the rotary halves swapped moved 87% of them by
    up to 1.3e-3, far outside atol 1e-5."""
    import jax
    import torch
    import transformers

    import plain_jax
    import vs_hf

    p = vs_hf.Preset(vocab=64, hidden=32, layers=2, heads=4, intermediate=48, seq=12, batch=2, steps=1, kv_heads=2)
    params = plain_jax.init_params(p, seed=3)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**p.hf_config(), attn_implementation="eager"))
    c = lambda w: torch.from_numpy(np.array(w))  # a writable copy of the JAX array
    t = lambda w: torch.from_numpy(np.array(w).T.copy())
    state = {"model.embed_tokens.weight": c(params["embed"]), "model.norm.weight": c(params["final_norm"]),
             "lm_head.weight": t(params["lm_head"])}
    names = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
             "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj", "w_down": "mlp.down_proj"}
    for i, layer in enumerate(params["layers"]):
        state.update({f"model.layers.{i}.{names[k]}.weight": t(w) for k, w in layer.items() if k in names})
        state[f"model.layers.{i}.input_layernorm.weight"] = c(layer["attn_norm"])
        state[f"model.layers.{i}.post_attention_layernorm.weight"] = c(layer["mlp_norm"])
    assert not model.load_state_dict(state, strict=True).missing_keys
    ids = np.random.default_rng(0).integers(0, p.vocab, size=(p.batch, p.seq)).astype(np.int32)
    with torch.no_grad():
        want = model(torch.from_numpy(ids).long()).logits.numpy()
    got = np.asarray(jax.jit(lambda w, x: plain_jax.forward(w, x, p))(params, ids))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert sum(int(np.prod(w.shape)) for w in jax.tree.leaves(params)) == p.param_count()


def test_gpu_1b_reports_every_warning_jtrain_logs_during_its_run():
    """With attention_impl 'auto' a fallback from cuDNN to XLA's attention is only a logged warning: the
    GPU summary must show it, or a slower kernel would pass for the default one."""
    import logging

    warned = gpu_1b._capture_jtrain_warnings()
    logging.getLogger("jtrain.models.attention").warning("attention_impl 'auto': cuDNN is not available here")
    logging.getLogger("jtrain.models.attention").info("not a warning")
    logging.getLogger("elsewhere").warning("not jtrain's")
    assert warned == ["attention_impl 'auto': cuDNN is not available here"]
    run = {"median_step_s": 1.0, "tokens_per_s": 10.0, "warmup_s": 1.0, "peak_rss_mb": 1.0, "step_flops": None}
    text = gpu_1b.summary(gpu_1b.PRESETS["small"], {"jtrain": {**run, "attention": "auto", "warnings": warned},
                                                     "hf": {"skipped": "no CUDA"}})
    assert "jtrain warned: attention_impl 'auto': cuDNN is not available here" in text


def test_gpu_session_script_runs_every_check_and_leaves_its_files_in_out(tmp_path):
    """benchmarks/gpu_session.sh is the one command a session lent a GPU runs; here in its small CPU mode.
    What it leaves in $OUT is what comes back from the device machine. Its gpu_1b.py run asks for cuDNN,
    so the GPU script's fallback runs too: on the CPU the cuDNN run fails (JAX finds no cuDNN), jtrain
    runs again with XLA's attention, and the summary says why."""
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "GPU_SESSION_SMALL": "1", "JTRAIN_PEAK_CACHE": str(tmp_path / "peak"),
           "GPU_1B_ARGS": "--attention cudnn --steps 2 --warmup 1"}
    proc = subprocess.run(["bash", os.path.join(BENCH, "gpu_session.sh")], capture_output=True, text=True,
                          check=False, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the device tool brings back at most 8 files
    assert sorted(os.listdir(out)) == ["RESULTS_GPU.md", "attention.md", "probe.json", "probe.md", "session.log",
                                       "trace.json.gz", "versions.txt"]
    assert "jax " in (out / "versions.txt").read_text()
    log = (out / "session.log").read_text()
    for script in ("gpu_1b.py", "gpu_attention_check.py", "gpu_probe.py"):
        assert f"{script} exit status 0" in log

    result = json.loads([ln for ln in log.splitlines() if ln.startswith("RESULT {")][0][len("RESULT "):])
    jtrain, hf = result["runs"]["jtrain"], result["runs"]["hf"]
    assert jtrain["attention"] == "xla" and "cuDNN is not detected" in jtrain["cudnn_failure"]
    assert "The cuDNN run failed (RuntimeError: cuDNN is not detected.)" in log
    assert jtrain["step_flops"] > 0 and jtrain["tokens_per_s"] > 0
    assert "skipped" not in hf and hf["tokens_per_s"] > 0  # --small runs the HF side on CPU: never skipped
    assert jtrain["params"] == hf["params"]
    summary = (out / "RESULTS_GPU.md").read_text()
    assert summary.startswith("# jtrain vs HF Trainer on one GPU")
    assert "| jtrain (xla attention) |" in summary and "MFU" in summary and "jtrain / HF tokens/s" in summary

    rows = [line for line in (out / "attention.md").read_text().splitlines() if line.startswith("| ") and
            not line.startswith("| case")]
    assert len(rows) == 5 and all(row.endswith("| yes |") for row in rows)
    probe = json.loads((out / "probe.json").read_text())
    # the traced base and, in one more process, every XLA:GPU flag (inert on the CPU) each measured a step
    # (gpu_probe.small_plan)
    plan = gpu_probe.small_plan(gpu_probe.VARIANTS)
    assert [r["variant"] for r in probe["variants"]] == [v[0] for v in plan]
    assert all(not r.get("failed") and r["median_step_s"] > 0 for r in probe["variants"])
    assert probe["trace"]["events"] > 0 and "Trace of the last two updates" in (out / "probe.md").read_text()


def test_the_probes_small_plan_runs_the_traced_base_and_every_flag():
    """The small mode runs two processes: the traced base (the trace summary's path) and one with every
    variant's flags, so that a flag this jaxlib no longer parses fails here rather than on the GPU. The other
    model set-ups are model options the model tests cover (remat policies: test_memory, test_flop_count)."""
    plan = gpu_probe.small_plan(gpu_probe.VARIANTS)
    flags = lambda variants: {f for _, fl, _, _ in variants for f in fl.split(",") if f}
    assert len(plan) == 2 and plan[0] == gpu_probe.VARIANTS[0] and flags(plan) == flags(gpu_probe.VARIANTS)
    assert all(name in plan[1][0] for name, fl, _, _ in gpu_probe.VARIANTS if fl)


def test_probe_sums_only_the_gpu_stream_lines_of_a_trace(tmp_path):
    """A GPU process in a perfetto trace also has lines (XLA Ops, XLA Modules) that span the kernels
    again: only its "Stream" lines count, host lines never, and overlapping kernels are busy once."""
    meta = [("process_name", 1, None, "/device:GPU:0"), ("process_name", 2, None, "/host:CPU"),
            ("thread_name", 1, 10, "Stream #13(Compute)"), ("thread_name", 1, 11, "XLA Ops"),
            ("thread_name", 1, 12, "Stream #14(MemcpyD2D)")]
    events = [{"ph": "M", "name": kind, "pid": pid, "tid": tid or 0, "args": {"name": name}}
              for kind, pid, tid, name in meta]
    spans = [(1, 10, 0, 5, "sm90_xmma_gemm_bf16bf16"), (1, 10, 10, 5, "cudnn_generated_fort_native_sdpa"),
             (1, 12, 12, 6, "memcpy"), (1, 11, 0, 15, "fusion.1"), (2, 1, 0, 100, "python")]
    events += [{"ph": "X", "pid": p, "tid": t, "ts": ts, "dur": d, "name": n} for p, t, ts, d, n in spans]
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as fh:
        json.dump({"traceEvents": events}, fh)
    t = gpu_probe.trace_summary(str(path))
    assert t["events"] == 3 and t["window_us"] == 18 and t["busy_us"] == 13 and t["kernel_us"] == 16
    assert t["by_kind_us"] == {"matmul (cuBLAS/cutlass/Triton GEMM)": 5, "attention (cuDNN/flash)": 5,
                               "copy / memset": 6}


def test_gpu_attention_check_refuses_to_pass_for_a_gpu_check_without_a_gpu():
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "gpu_attention_check.py")], capture_output=True,
                          text=True, check=False, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode != 0 and "pass --cpu for the CPU mode" in proc.stderr


def test_trainer_overhead_small_reports_paired_ratios(tmp_path):
    """The issue #4 overhead script in its small mode: both loops run, alternating; the ratio it
    reports is that of the median update times it measured, and the window ratios come from the
    per-run tokens/s."""
    import statistics

    _, r = _run("trainer_overhead.py", "--small", "--steps", "3", "--warmup", "1", "--repeats", "2",
                tmp_path=tmp_path)
    assert len(r["bare_runs"]) == len(r["trainer_runs"]) == len(r["pair_ratios"]) == 2
    assert min(r["bare_runs"] + r["trainer_runs"]) > 0
    expected = [t / b for t, b in zip(r["trainer_runs"], r["bare_runs"])]
    assert r["pair_ratios"] == pytest.approx(expected)
    assert r["window_ratio"] == pytest.approx(statistics.median(expected))
    assert r["intervals"] == [2 * 1, 2 * 2]  # bare: 3 updates -> 2 reads -> 1 interval; Trainer: steps + 1 marks
    assert r["ratio"] == pytest.approx(r["bare_median_step_s"] / r["trainer_median_step_s"])
    assert "Trainer / bare loop tokens/s = **" in r["markdown"] and "| Trainer.train() |" in r["markdown"]


def test_collective_parsing_counts_result_bytes():
    import scaling

    hlo = ("  %all-reduce.3 = (f32[4,8]{1,0}, bf16[16]{0}) all-reduce(f32[4,8]{1,0} %a, bf16[16]{0} %b)\n"
           "  %ag = f32[64]{0} all-gather(f32[8]{0} %p), dimensions={0}\n"
           "  %rs = f32[8]{0} reduce-scatter(f32[64]{0} %g), dimensions={0}\n"
           "  %add = f32[8]{0} add(f32[8]{0} %x, f32[8]{0} %y)\n")
    coll = scaling.collective_bytes(hlo)
    assert coll["all-reduce"] == {"count": 1, "bytes": 4 * 8 * 4 + 16 * 2}
    assert coll["all-gather"] == {"count": 1, "bytes": 64 * 4}
    assert coll["reduce-scatter"] == {"count": 1, "bytes": 8 * 4}
    # Ring all-reduce of S bytes over n devices sends 2(n-1)/n S; all-gather (n-1)/n of the result.
    n = 8
    assert scaling.wire_bytes(coll, n) == pytest.approx(160 * 2 * 7 / 8 + 256 * 7 / 8 + 32 * 7)


def test_fsdp_step_shards_state_and_gathers_weights():
    import scaling

    row = scaling.compile_step("fsdp", devices=4, hidden=32, layers=1, seq=16, batch=4)
    # Params + two AdamW moments, split 4 ways; the replicated scalars and the batch add a little.
    state_mb = 3 * row["params"] * 4 / 2**20
    assert state_mb / 4 <= row["arg_mb"] <= state_mb / 4 * 1.2
    assert row["collectives"].get("all-gather", 0) > 0  # FSDP gathers weights for compute


def test_xla_flags_merge_and_refuse_after_backend_start():
    assert merge_flags("--a=1 --b", ["--a=2", "--c=x"]) == "--a=2 --b --c=x"
    with pytest.raises(ConfigError, match="malformed"):
        merge_flags("", ["xla_cpu_use_onednn=true"])
    env = {"XLA_FLAGS": "--xla_backend_optimization_level=0"}
    assert apply_xla_flags(["--xla_cpu_use_onednn=false"], env=env).endswith("--xla_cpu_use_onednn=false")
    import jax

    jax.devices()  # the test backend is running: flags can no longer take effect
    with pytest.raises(ConfigError, match="before the JAX backend starts"):
        apply_xla_flags(["--xla_cpu_use_onednn=false"])
