#!/usr/bin/env bash
# Everything a session lent one GPU should run, in one command (the device tool's `run`, timeout_s 600):
#
#     bash benchmarks/gpu_session.sh
#
# 1. the versions the GPU machine has (its JAX may be newer than the one CI tests with);
# 2. benchmarks/gpu_1b.py: ~1B Llama, bf16, seq 2048, jtrain (cuDNN attention) vs HF, under 8 minutes;
# 3. benchmarks/gpu_attention_check.py: each way jtrain calls cuDNN against the reference einsum.
#
# Results go to $OUT (the only folder whose files come back from the device machine): versions.txt,
# RESULTS_GPU.md, gpu_1b.log, attention.md, attention.log. Without $OUT (a run by hand) they go to
# ./gpu_out. GPU_SESSION_SMALL=1 runs both scripts in their small CPU modes (how CI tests this file).
# Afterwards copy RESULTS_GPU.md and attention.md into benchmarks/RESULTS.md and the issue's note.
set -u -o pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_out}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
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

# The benchmark gets most of the time (450 s of the 600), so the attention check still runs and reports.
timeout 450 "$py" benchmarks/gpu_1b.py ${small:+--small} --out "$out/RESULTS_GPU.md" 2>&1 | tee "$out/gpu_1b.log"
echo "gpu_1b.py exit status ${PIPESTATUS[0]} after $((SECONDS - start)) s" | tee -a "$out/gpu_1b.log"

left=$((570 - (SECONDS - start)))
if [ "$left" -gt 20 ]; then
  timeout "$left" "$py" benchmarks/gpu_attention_check.py ${small:+--cpu} --out "$out/attention.md" 2>&1 \
    | tee "$out/attention.log"
  echo "gpu_attention_check.py exit status ${PIPESTATUS[0]}" | tee -a "$out/attention.log"
fi
echo "done after $((SECONDS - start)) s"
