"""HF's Trainer helpers for scripts (log_metrics, save_metrics, save_state, getters) against HF's own."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
from transformers import trainer_pt_utils as hf

from jtrain import Trainer, TrainerCallback, TrainingArguments
from jtrain.callbacks import TrainerState
from jtrain.data.loader import ArrayDataset
from jtrain.errors import ConfigError
from jtrain.models import param_count
from jtrain.peft import LoraConfig, apply_lora
from tiny import lm_rows, tiny_llama

METRICS = {"train_runtime": 3725.456, "train_mem_cpu_alloc_delta": 5 << 20, "total_flos": 7 << 30,
           "train_loss": 2.3456789, "train_samples": 64, "eval_note": "text", "epoch": 1.0}


def _args(tmp_path, **kw):
    return TrainingArguments(**{"output_dir": str(tmp_path / "out"), "max_steps": 4, "per_device_train_batch_size": 4,
                                "learning_rate": 1e-2, "save_strategy": "no", "disable_tqdm": True,
                                "mesh_shape": {"data": 1}, **kw})


def _data():
    return ArrayDataset(lm_rows(32, 16))


def test_metrics_format_and_log_metrics_print_what_hf_prints(tmp_path, capsys):
    assert Trainer.metrics_format(METRICS) == hf.metrics_format(METRICS)
    hf.log_metrics(types.SimpleNamespace(is_world_process_zero=lambda: True), "train", METRICS)
    theirs = capsys.readouterr().out
    Trainer(tiny_llama(), _args(tmp_path)).log_metrics("train", METRICS)
    assert capsys.readouterr().out == theirs and "***** train metrics *****" in theirs


def test_save_metrics_and_save_state_write_hf_files(tmp_path):
    trainer = Trainer(tiny_llama(), _args(tmp_path), train_dataset=_data())
    theirs = types.SimpleNamespace(is_world_process_zero=lambda: True,
                                   args=types.SimpleNamespace(output_dir=str(tmp_path / "hf")))
    (tmp_path / "hf").mkdir()
    for split, metrics in (("train", {"train_loss": 1.5}), ("eval", {"eval_loss": 2.5, "epoch": 1.0})):
        trainer.save_metrics(split, metrics)
        hf.save_metrics(theirs, split, metrics)
    for name in ("train_results.json", "eval_results.json", "all_results.json"):
        assert json.loads((tmp_path / "out" / name).read_text()) == json.loads((tmp_path / "hf" / name).read_text())
    trainer.save_metrics("test", {"test_loss": 3.0}, combined=False)
    assert "test_loss" not in json.loads((tmp_path / "out" / "all_results.json").read_text())
    trainer.train()
    trainer.save_state()
    saved = TrainerState.load_from_json(str(tmp_path / "out" / "trainer_state.json"))
    assert saved.global_step == 4 and saved.log_history == trainer.state.log_history


def test_trainable_parameters_before_and_after_setup(tmp_path):
    model = tiny_llama()
    assert Trainer(model, _args(tmp_path)).get_num_trainable_parameters() == param_count(model.abstract_params())
    lora = apply_lora(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    trainer = Trainer(lora, _args(tmp_path), train_dataset=_data())
    before = trainer.get_num_trainable_parameters()
    # q_proj of each of the 2 layers: A [32, 2] and B [2, 32] (tiny: hidden 32, 4 heads of 8).
    assert before == 2 * (32 * 2 + 2 * 32)
    trainer.train()
    assert trainer.get_num_trainable_parameters() == before


class _RecordLr(TrainerCallback):
    def __init__(self, trainer_box):
        self.box, self.seen = trainer_box, {}

    def on_step_end(self, args, state, control, **kwargs):
        self.seen[state.global_step] = self.box[0].get_learning_rates()


def test_learning_rates_and_total_batch_size(tmp_path):
    box = []
    record = _RecordLr(box)
    trainer = Trainer(tiny_llama(), _args(tmp_path, gradient_accumulation_steps=2), train_dataset=_data(),
                      callbacks=[record])
    box.append(trainer)
    with pytest.raises(ConfigError, match="once train"):
        trainer.get_learning_rates()
    assert trainer.get_total_train_batch_size(trainer.args) == 8
    trainer.train()
    # Linear decay over 4 updates, no warm-up: the next update's lr after k updates is 1e-2 * (1 - k/4).
    # float32 schedule arithmetic: rtol 1e-6.
    for k, lrs in record.seen.items():
        np.testing.assert_allclose(lrs, [1e-2 * (1 - k / 4)], rtol=1e-6, atol=1e-12)
    assert sorted(record.seen) == [1, 2, 3, 4]
