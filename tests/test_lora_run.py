"""`python -m jtrain.run` with a `peft` section: configs/lora_clm.yaml on a base the quickstart made.

Both runs are shortened (a tiny quickstart base trained for a few steps, then a few LoRA steps)
and run in-process through `jtrain.run.main`, the entry point's own code path.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from jtrain.run import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_BASE = ["--model.config", ("{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, "
                                 "num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 64, "
                                 "tie_word_embeddings: true}"),
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


QLORA = ["--config", os.path.join(ROOT, "configs", "qlora_clm.yaml"), "--quantization.quant_block_size", "8",
         "--per_device_train_batch_size", "8", "--block_size", "32", "--max_eval_samples", "32",
         "--logging_steps", "2", "--disable_tqdm", "true", "--report_to", "[]"]


def _safetensors(path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(path))


def test_qlora_config_trains_adapters_on_an_nf4_base_and_resumes_exactly(base_dir, tmp_path, capsys):
    """configs/qlora_clm.yaml (head_dim 8 here, so block 8): the base's kernels are NF4, the adapters
    train, the merged export is written, and a run resumed from its step-4 checkpoint ends with the
    uninterrupted run's adapters."""
    common = [*QLORA, "--model.model_name_or_path", str(base_dir), "--max_steps", "8", "--save_steps", "4",
              "--save_total_limit", "2", "--eval_steps", "8"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert main([*common, "--output_dir", str(full), "--peft.save_merged", "true"]) == 0
    printed = capsys.readouterr().out
    assert "base kernels stored as nf4 (block 8, double quantisation), frozen" in printed
    assert "LoRA r=8 on 14 modules" in printed
    files = set(os.listdir(full))
    assert {"adapter_config.json", "adapter_model.safetensors", "checkpoint-4", "checkpoint-8"} <= files
    assert "model.safetensors" not in files
    # the merged export: the dequantised base with the adapters folded in, a float HF model
    assert {"config.json", "model.safetensors"} <= set(os.listdir(full / "merged"))
    history = json.loads((full / "trainer_state.json").read_text())["log_history"]
    evals = [e["eval_loss"] for e in history if "eval_loss" in e]
    assert len(evals) == 2 and evals[-1] < evals[0], evals  # eval_on_start scores the quantised base

    # the quantised base is not the float one: the float base's eval loss on the same rows differs
    # (5.32602 float vs 5.32641 NF4 seen), by far less than the 10% bound that would mean a broken base
    plain = tmp_path / "plain"
    assert main(["--config", os.path.join(ROOT, "configs", "lora_clm.yaml"), "--model.model_name_or_path",
                 str(base_dir), "--do_train", "false", "--block_size", "32", "--max_eval_samples", "32",
                 "--disable_tqdm", "true", "--report_to", "[]", "--output_dir", str(plain)]) == 0
    float_loss = json.loads((plain / "eval_results.json").read_text())["eval_loss"]
    print(f"eval loss of the base: float {float_loss:.5f}, NF4 {evals[0]:.5f}")
    assert float_loss != evals[0] and abs(float_loss - evals[0]) < 0.1 * float_loss

    assert main([*common, "--output_dir", str(resumed), "--resume_from_checkpoint", str(full / "checkpoint-4")]) == 0
    a, b = _safetensors(full / "adapter_model.safetensors"), _safetensors(resumed / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) == 28  # lora_A and lora_B of 14 modules
    for name in a:  # same compiled step, same data order: bit-identical after the resume
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.mark.parametrize("overrides, message", [
    ({"load_in_4bit": "true", "load_in_8bit": "true"}, "exactly one of load_in_4bit"),
    ({}, "exactly one of load_in_4bit"),
    ({"load_in_4bit": "true", "bnb_4bit_quant_type": "fp4"}, "fp4 is not implemented"),
    ({"load_in_8bit": "true", "bnb_4bit_use_double_quant": "true"}, "applies to load_in_4bit with nf4 only"),
    ({"load_in_4bit": "true", "quant_block_size": "7"}, "`quant_block_size` must be an even integer"),
    ({"load_in_4bit": "true", "block_size": "8"}, "unknown key `quantization.block_size`"),
])
def test_quantization_section_refuses_bad_values_naming_the_key(overrides, message):
    from jtrain.config import load_config
    from jtrain.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        overrides = {f"quantization.{k}": v for k, v in overrides.items()}
        load_config(None, overrides or {"quantization.target_modules": None})


def test_quantization_that_does_not_fit_the_model_names_the_kernel_and_the_key(base_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([*QLORA, "--model.model_name_or_path", str(base_dir), "--quantization.quant_block_size", "64",
                 "--max_steps", "2", "--output_dir", str(out)]) == 2
    said = capsys.readouterr()
    assert re.search(r"error: the `quantization` section does not fit this model: `model/layers_0/\S+/kernel` "
                     r"of shape .*block_size 64 does not divide.*`quantization.quant_block_size`", said.out + said.err)
    assert not out.exists()  # refused before anything was written


def test_lora_config_with_scan_layers_trains_like_the_unrolled_layers(base_dir, tmp_path, capsys):
    """`model.scan_layers: true` with a `peft` section: the same adapters (stacked), the same PEFT
    file names, and the same losses as the unrolled model. Tolerance: rtol 1e-5 on the logged
    losses (float32 sums reordered by the scan, carried through 4 Adam updates; a wrong layer slice
    or scale moves them by 1e-2 or more)."""
    common = ["--config", os.path.join(ROOT, "configs", "lora_clm.yaml"), "--model.model_name_or_path", str(base_dir),
              "--max_steps", "4", "--per_device_train_batch_size", "8", "--block_size", "32", "--max_eval_samples",
              "32", "--eval_strategy", "no", "--eval_on_start", "false", "--save_strategy", "no", "--logging_steps",
              "1", "--disable_tqdm", "true", "--report_to", "[]"]
    runs = {}
    for scan in ("false", "true"):
        out = tmp_path / f"scan_{scan}"
        assert main([*common, "--model.scan_layers", scan, "--output_dir", str(out)]) == 0
        assert "LoRA r=8 on 14 modules" in capsys.readouterr().out
        history = json.loads((out / "trainer_state.json").read_text())["log_history"]
        runs[scan] = ([e["loss"] for e in history if "loss" in e], _safetensors(out / "adapter_model.safetensors"))
    (flat_losses, flat_adapters), (scan_losses, scan_adapters) = runs["false"], runs["true"]
    print(f"losses unrolled {flat_losses} scanned {scan_losses}")
    assert len(flat_losses) == 4
    np.testing.assert_allclose(scan_losses, flat_losses, rtol=1e-5)
    assert sorted(scan_adapters) == sorted(flat_adapters) and len(flat_adapters) == 28
    # The adapters trained: PEFT starts every lora_B at zero and 4 updates move all of them. (Each
    # logged loss is a different batch's, so the last is not below the first on every platform: on
    # an H200 the quickstart base trained to other weights, the first loss was 5.195 instead of 5.281
    # and the last, 5.275, the highest.)
    b_names = [name for name in flat_adapters if "lora_B" in name]
    assert len(b_names) == 14 and all(np.abs(flat_adapters[name]).max() > 0 for name in b_names)
