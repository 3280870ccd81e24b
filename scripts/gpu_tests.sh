#!/usr/bin/env bash
# The single-device part of the test suite on a GPU, for a session lent one (the device tool's `run`):
#
#     bash scripts/gpu_tests.sh            # results in $OUT (or ./gpu_out): tests.log, junit.xml
#
# CI runs the suite on CPU devices only (tests/conftest.py defaults JAX_PLATFORMS to cpu). Here JAX
# takes the GPU, so the same tests exercise what only a GPU runs: cuDNN attention under the default
# `attention_impl: auto` in bf16/fp16 tests, GPU buffers through Orbax save and restore, donation,
# and XLA:GPU's numerics against the torch and float64 references. Float32 matmuls run at full
# precision (JAX_DEFAULT_MATMUL_PRECISION=highest): the references' tolerances are float32 ones, and
# TF32 (JAX's GPU default) would fail them by design, not by a bug. Tests marked `devices(n)` (more
# devices than one GPU) or `cpu_only(reason)` (what only the CPU backend does) are skipped with their
# reason (tests/conftest.py); in CI, on the CPU, none is. The machine has no `datasets` package: files
# that import it are left out, and so is test_trainer_api.py, which imports optuna (for
# hyperparameter_search), also missing there. On an H200 (2026-11-29, benchmarks/GPU.md) 240 passed and every failure was of those kinds,
# before the marks existed.
set -u -o pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_out}"
mkdir -p "$out"
export JAX_PLATFORMS="${GPU_TESTS_PLATFORMS:-cuda}" JAX_DEFAULT_MATMUL_PRECISION=highest
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
files=(test_step test_trainer test_trainer_callbacks test_checkpoint test_precision
       test_losses test_models_parity test_models_grads test_models_invariance test_models_common
       test_optim_adamw_parity test_optim_torch_parity test_optim_train test_optimizers test_lora_run
       test_quant test_qlora test_dora test_neftune test_faults test_attention_masks test_compile
       test_memory test_mixtral_parity test_flop_count)
paths=()
for f in "${files[@]}"; do paths+=("tests/$f.py"); done
py="$(command -v python3 || command -v python)"
per_test=()  # pytest-timeout, where installed (the GPU image has it): a hung test must not eat the lease
"$py" -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout 180)
# shellcheck disable=SC2086  # GPU_TESTS_ARGS is a list of extra pytest arguments
timeout "${GPU_TESTS_TIMEOUT:-400}" "$py" -m pytest -o addopts="" -p no:cacheprovider -n "${GPU_TESTS_WORKERS:-8}" \
  "${per_test[@]}" -v -rfE --tb=line --durations=15 --junitxml="$out/junit.xml" ${GPU_TESTS_ARGS:-} "${paths[@]}" 2>&1 \
  | tee "$out/tests.log"
echo "pytest exit status ${PIPESTATUS[0]}" | tee -a "$out/tests.log"
