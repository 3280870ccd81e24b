"""`python -m jtrain.run` with a `peft` section: configs/lora_clm.yaml on a base the quickstart made.

Both runs are shortened (a tiny quickstart base trained for a few steps, then a few LoRA steps)
and run in-process through `jtrain.run.main`, the entry point's own code path.
"""

from __future__ import annotations

import json
import os

import pytest

from jtrain.run import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_BASE = ["--model.config", ("{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 4, "
                                 "num_key_value_heads: 2, max_position_embeddings: 64, tie_word_embeddings: true}"),
              "--tokenizer.vocab_size", "256", "--max_files", "20", "--block_size", "32", "--max_eval_rows", "32",
              "--max_steps", "4", "--eval_strategy", "no", "--save_strategy", "no", "--do_eval", "false",
              "--logging_steps", "2", "--disable_tqdm", "true", "--report_to", "[]"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    assert main(["--config", os.path.join(ROOT, "configs", "quickstart.yaml"), *SMALL_BASE,
                 "--output_dir", str(out)]) == 0
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    return out


def test_lora_config_trains_adapters_from_the_quickstart_base(base_dir, tmp_path, capsys):
    out = tmp_path / "lora"
    argv = ["--config", os.path.join(ROOT, "configs", "lora_clm.yaml"), "--model.model_name_or_path", str(base_dir),
            "--output_dir", str(out), "--max_steps", "16", "--per_device_train_batch_size", "8",
            "--block_size", "32", "--max_eval_samples", "32", "--eval_steps", "8", "--save_steps", "8",
            "--save_total_limit", "1", "--logging_steps", "4", "--disable_tqdm", "true", "--peft.save_merged", "true"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "LoRA r=8 on 14 modules" in printed  # 7 projections x 2 layers
    files = set(os.listdir(out))
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "trainer_state.json",
            "all_results.json", "merged"} <= files
    assert "model.safetensors" not in files  # save_model writes only the adapters
    assert {"config.json", "model.safetensors"} <= set(os.listdir(out / "merged"))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16 and config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == os.path.abspath(base_dir)
    ckpt = out / "checkpoint-16"
    assert {"adapter_config.json", "adapter_model.safetensors", "state", "trainer_state.json"} <= set(os.listdir(ckpt))
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    evals = [e["eval_loss"] for e in history if "eval_loss" in e]
    assert len(evals) >= 2 and evals[-1] < evals[0], evals  # eval_on_start scores the base first
