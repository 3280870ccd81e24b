"""Exact resume after the process dies: `python -m jtrain.run` killed with SIGKILL twice (once
after a checkpoint completed, once while one was being written), stopped with SIGTERM once, and
restarted each time, must end with the same params and the same logged losses as an
uninterrupted run. Same program, same inputs, same CPU: bitwise, no tolerance.

All runs share a persistent compilation cache, so only the first one compiles.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from jtrain.signals import EXIT_PREEMPTED

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_STEPS = 30
CONFIG = """
model:
  model_type: llama
  config: {hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 4,
           num_key_value_heads: 2, tie_word_embeddings: true}
tokenizer: {vocab_size: 300}
data: {source: stdlib, max_files: 5, block_size: 32}
training:
  output_dir: OUT
  do_eval: false
  max_steps: 30
  per_device_train_batch_size: 8
  learning_rate: 3.0e-3
  logging_steps: 1
  save_steps: 5
  disable_tqdm: true
  mesh_shape: {data: 1}
  compilation_cache_dir: CACHE
"""


def _start(tmp_path, out) -> subprocess.Popen:
    cfg = tmp_path / f"{out.name}.yaml"
    cfg.write_text(CONFIG.replace("OUT", str(out)).replace("CACHE", str(tmp_path / "xla-cache")))
    log = open(tmp_path / f"{out.name}-{time.monotonic_ns()}.log", "w")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "jtrain.run", "--config", str(cfg)], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    proc.log_path = log.name
    return proc


def _log(proc) -> str:
    with open(proc.log_path) as fh:
        return fh.read()[-3000:]


def _wait_for(proc, path, timeout=300.0) -> None:
    """Poll every 2 ms until `path` exists; the run must still be alive."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, f"run ended (rc {proc.returncode}) before {path} appeared:\n{_log(proc)}"
        assert time.monotonic() < deadline, f"{path} did not appear:\n{_log(proc)}"
        time.sleep(0.002)


def _finish(proc, timeout=300) -> int:
    return proc.wait(timeout=timeout)


def _history(out) -> dict[int, tuple]:
    state = json.loads((out / "trainer_state.json").read_text())
    return {e["step"]: (e["loss"], e["grad_norm"], e["learning_rate"]) for e in state["log_history"] if "loss" in e}


def _complete_steps(out) -> list[int]:
    return sorted(int(d.split("-")[1]) for d in os.listdir(out)
                  if d.startswith("checkpoint-") and (out / d / "trainer_state.json").exists())


@pytest.mark.slow
def test_killed_and_preempted_runs_resume_exactly(tmp_path):
    whole = tmp_path / "whole"
    proc = _start(tmp_path, whole)
    assert _finish(proc) == 0, _log(proc)

    out = tmp_path / "chain"
    # 1. SIGKILL right after checkpoint-10 completed (the run is already in step 11 or 12).
    proc = _start(tmp_path, out)
    _wait_for(proc, out / "checkpoint-10" / "trainer_state.json")
    proc.kill()
    _finish(proc)

    # 2. Restart; SIGKILL as soon as checkpoint-20's directory appears, i.e. while orbax writes it
    #    (SIGSTOP first, so the state we look at is the state it dies in).
    proc = _start(tmp_path, out)
    _wait_for(proc, out / "checkpoint-20")
    proc.send_signal(signal.SIGSTOP)
    killed_in_flight = not (out / "checkpoint-20" / "trainer_state.json").exists()
    proc.kill()
    _finish(proc)
    assert "resuming from" in _log(proc)
    if killed_in_flight:
        assert 20 not in _complete_steps(out)  # the partial checkpoint is not taken for a complete one

    # 3. Restart; SIGTERM while checkpoint-25 is being written: the run finishes the update in
    #    flight (26), waits for checkpoint-25, writes checkpoint-26 and exits with 143. The bound
    #    allows two more updates for this test's polling delay on a loaded machine.
    proc = _start(tmp_path, out)
    _wait_for(proc, out / "checkpoint-25")
    proc.send_signal(signal.SIGTERM)
    assert _finish(proc) == EXIT_PREEMPTED, _log(proc)
    stopped_at = _complete_steps(out)[-1]
    assert 26 <= stopped_at <= 28, _complete_steps(out)
    assert 25 in _complete_steps(out)  # the checkpoint in flight was completed, not abandoned
    assert f"stopped by SIGTERM after step {stopped_at}" in _log(proc)

    # 4. Restart and finish.
    proc = _start(tmp_path, out)
    assert _finish(proc) == 0, _log(proc)
    assert f"checkpoint-{stopped_at}" in _log(proc)
    results = json.loads((out / "train_results.json").read_text())
    assert results["resume_seconds"] >= 0

    want, got = load_file(str(whole / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert sorted(want) == sorted(got)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert _history(out) == _history(whole)  # every step's loss, grad norm and lr, across 4 processes
    assert sorted(_history(out)) == list(range(1, MAX_STEPS + 1))
    print(f"checkpoint-20 killed in flight: {killed_in_flight}; SIGTERM checkpoint: {stopped_at}")
