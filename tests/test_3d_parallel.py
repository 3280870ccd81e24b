"""configs/3d_parallel.yaml: data x pipeline x tensor parallelism through `jtrain.run` on 8 fake devices.

Shortened (a tiny tokenizer, a few steps, a few files of data), run in-process through
`jtrain.run.main`, the entry point's own code path. The run must train, evaluate, save an HF
checkpoint in the scanned layout, and log the parameter bytes each device holds.
"""

from __future__ import annotations

import json
import logging
import os
import re

from jtrain.run import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT = ["--tokenizer.vocab_size", "256", "--max_files", "20", "--block_size", "32", "--max_eval_rows", "32",
         "--max_steps", "6", "--eval_strategy", "no", "--save_strategy", "no", "--logging_steps", "2",
         "--disable_tqdm", "true", "--report_to", "[]",
         "--model.config", ("{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 4, num_attention_heads: 4, "
                            "num_key_value_heads: 2, max_position_embeddings: 64, tie_word_embeddings: true, "
                            "pipeline_microbatches: 4}")]


def test_3d_parallel_config_trains_on_8_devices_and_reports_param_bytes(tmp_path, caplog, capsys):
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="jtrain.compiled"):
        assert main(["--config", os.path.join(ROOT, "configs", "3d_parallel.yaml"), *SHORT,
                     "--output_dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "'data': 2" in printed and "'stage': 2" in printed and "'tensor': 2" in printed
    assert "bytes per device" in printed  # the run's own output says what each device holds

    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("parameters:"))
    print(line)
    per_device, total = map(int, re.match(r"parameters: (\d+) bytes per device .* of (\d+) in all", line).groups())
    # Every weight of the layer stack is split over stage (2) and all but the norms over tensor
    # (2); the tied embedding splits over tensor only; norm scales are whole. So a device holds
    # between a quarter and a half of the model, and much less than half here (the stack dominates).
    assert total / 4 <= per_device < 0.4 * total

    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    losses = [e["loss"] for e in history if "loss" in e]
    assert len(losses) == 3 and losses[-1] < losses[0]
    results = json.loads((out / "all_results.json").read_text())
    assert results["train_compilations"] == 1 and "eval_loss" in results
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    config = json.loads((out / "config.json").read_text())
    assert "pipeline_microbatches" not in config and "pipeline_stages" not in config  # execution options only
