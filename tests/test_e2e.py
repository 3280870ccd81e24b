"""End to end: `python -m jtrain.run` in a subprocess on a shortened quickstart config."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHORT = """
model:
  model_type: llama
  config: {hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, num_attention_heads: 4,
           num_key_value_heads: 2, tie_word_embeddings: true}
tokenizer: {vocab_size: 512}
data: {source: stdlib, max_files: 40, block_size: 64, max_eval_rows: 64}
training:
  output_dir: OUT
  do_eval: true
  eval_on_start: true
  max_steps: 100
  per_device_train_batch_size: 16
  learning_rate: 1.0e-2
  warmup_steps: 0.1
  logging_steps: 10
  eval_strategy: steps
  eval_steps: 50
  save_steps: 50
  report_to: [jsonl]
  disable_tqdm: true
  mesh_shape: {data: 1}
"""


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "jtrain.run", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_quickstart_trains_evaluates_and_saves(tmp_path):
    out = tmp_path / "out"
    cfg = tmp_path / "short.yaml"
    cfg.write_text(SHORT.replace("OUT", str(out)))
    proc = _run("--config", str(cfg))
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    evals = [e["eval_loss"] for e in history if "eval_loss" in e]
    assert len(evals) >= 3 and evals[-1] < evals[0] - 0.5, evals  # the model learned something real
    results = json.loads((out / "eval_results.json").read_text())
    assert results["eval_loss"] < results["eval_unigram_baseline_loss"]
    for step in (50, 100):
        ckpt = out / f"checkpoint-{step}"
        assert sorted(os.listdir(ckpt)) == ["config.json", "jtrain_meta.json", "loader_state.json", "model.safetensors",
                                            "state", "tokenizer.json", "tokenizer_config.json", "trainer_state.json",
                                            "training_args.json"]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "train_results.json",
                 "all_results.json"):
        assert (out / name).is_file(), name
    card = (out / "README.md").read_text()  # HF's model card: the final evaluation and the training table
    assert card.startswith("---\nlibrary_name: transformers") and f"- Loss: {results['eval_loss']:.4f}" in card
    end = next(i for i, e in enumerate(history) if "train_runtime" in e)
    during = [e for e in history[:end] if "eval_loss" in e]
    assert card.count("\n| ") == 1 + len(during) >= 3  # header + one row per evaluation during training
    assert "unigram baseline" in proc.stdout and str(out) in proc.stdout

    # The same output_dir again resumes from its last checkpoint instead of overwriting it.
    again = _run("--config", str(cfg))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stdout
