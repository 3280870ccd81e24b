#!/usr/bin/env bash
# Everything a session lent one GPU should run, in one command (the device tool's `run`, timeout_s 600):
#
#     bash benchmarks/gpu_session.sh
#
# 1. the versions the GPU machine has (its JAX may be newer than the one CI tests with);
# 2. benchmarks/gpu_1b.py: ~1B Llama, bf16, seq 2048, jtrain (cuDNN attention) vs HF (at most 400 s);
# 3. benchmarks/gpu_attention_check.py: each way jtrain calls cuDNN against the reference einsum (67 s on
#    an H200; at most 150 s);
# 4. benchmarks/gpu_probe.py, in the time left (the whole script stays under 570 s): measured matmul
#    and copy ceilings, the base step again with a trace summed per kernel, then variants.
#
# Results go to $OUT (the only folder whose files come back from the device machine, at most 8 files):
# versions.txt, session.log (every script's output), RESULTS_GPU.md, attention.md, probe.md, probe.json,
# trace.json.gz. Without
# $OUT (a run by hand) they go to ./gpu_out. GPU_SESSION_SMALL=1 runs every script in its small CPU mode
# (how CI tests this file). Afterwards copy RESULTS_GPU.md, attention.md and probe.md into
# benchmarks/RESULTS.md and the issue's note.
set -u -o pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_out}"
mkdir -p "$out"
log="$out/session.log"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# One persistent compilation cache for every step: the probe's base run (the same program as the
# benchmark's jtrain run) then loads its executable instead of compiling it again. The benchmark runs
# first, on an empty cache, so its warm-up still includes compilation.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$(mktemp -d)}"
py="$(command -v python3 || command -v python)"
small="${GPU_SESSION_SMALL:-}"
start=$SECONDS

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
  "$py" - <<'PY'
import importlib, sys
print("python", sys.version.split()[0])
for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "chex", "numpy", "torch", "transformers",
             "accelerate", "safetensors", "tokenizers", "datasets"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as err:  # a missing package is information here, not a failure
        print(name, "missing:", type(err).__name__)
PY
} 2>&1 | tee "$out/versions.txt"

# The benchmark gets most of the time, so the attention check and the probe still run and report.
# GPU_1B_ARGS: extra arguments for gpu_1b.py (the test asks for cuDNN on the CPU to run its fallback).
# shellcheck disable=SC2086
timeout 400 "$py" benchmarks/gpu_1b.py ${small:+--small} ${GPU_1B_ARGS:-} --out "$out/RESULTS_GPU.md" 2>&1 \
  | tee -a "$log"
echo "gpu_1b.py exit status ${PIPESTATUS[0]} after $((SECONDS - start)) s" | tee -a "$log"

left=$((570 - (SECONDS - start)))
if [ "$left" -gt 20 ]; then
  timeout "$((left < 150 ? left : 150))" "$py" benchmarks/gpu_attention_check.py ${small:+--cpu} --out "$out/attention.md" 2>&1 \
    | tee -a "$log"
  echo "gpu_attention_check.py exit status ${PIPESTATUS[0]} after $((SECONDS - start)) s" | tee -a "$log"
fi
left=$((565 - (SECONDS - start)))
if [ "$left" -gt 40 ]; then
  timeout "$left" "$py" benchmarks/gpu_probe.py ${small:+--small} --budget "$((left - 5))" --out-dir "$out" 2>&1 \
    | tee -a "$log"
  echo "gpu_probe.py exit status ${PIPESTATUS[0]} after $((SECONDS - start)) s" | tee -a "$log"
fi
echo "done after $((SECONDS - start)) s" | tee -a "$log"
