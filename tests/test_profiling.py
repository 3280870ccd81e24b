"""`profile_start_step` / `profile_num_steps`: a JAX profiler trace of exactly the chosen updates,
where TensorBoard's profile plugin looks, and the refusals and warnings around it."""

from __future__ import annotations

import glob
import logging

import jax
import pytest
from tiny import lm_rows, tiny_llama

from jtrain import Trainer, TrainingArguments
from jtrain.data.loader import ArrayDataset
from jtrain.errors import ConfigError


def _trainer(tmp_path, **kw):
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4,
                             learning_rate=1e-2, save_strategy="no", disable_tqdm=True, mesh_shape={"data": 1},
                             report_to=[], **kw)
    return Trainer(tiny_llama(), args, train_dataset=ArrayDataset(lm_rows(32, 16)))


def _traced_steps(path: str) -> list[int]:
    """The step numbers of the `train` step annotations in one xplane file."""
    data = jax.profiler.ProfileData.from_file(path)
    steps = []
    for plane in data.planes:
        for line in plane.lines:
            for event in line.events:
                if event.name == "train":
                    steps += [int(v) for k, v in event.stats if k == "step_num"]
    return sorted(steps)


def test_trace_holds_exactly_the_chosen_updates(tmp_path):
    _trainer(tmp_path, profile_start_step=2, profile_num_steps=2).train()
    files = glob.glob(str(tmp_path / "out" / "runs" / "plugins" / "profile" / "*" / "*.xplane.pb"))
    assert len(files) == 1  # where `tensorboard --logdir out/runs` finds it, beside the scalars
    assert _traced_steps(files[0]) == [2, 3]


def test_no_trace_without_a_window_and_a_warning_when_the_window_is_never_reached(tmp_path, caplog):
    _trainer(tmp_path / "a").train()
    assert not glob.glob(str(tmp_path / "a" / "**" / "*.xplane.pb"), recursive=True)
    with caplog.at_level(logging.WARNING, logger="jtrain.profiling"):
        _trainer(tmp_path / "b", profile_start_step=9).train()
    assert "profile_start_step=9 is outside this run's updates 1-4" in caplog.text
    assert not glob.glob(str(tmp_path / "b" / "**" / "*.xplane.pb"), recursive=True)


def test_bad_windows_and_a_running_trace_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="profile_start_step.*>= 1"):
        _trainer(tmp_path, profile_start_step=0)
    with pytest.raises(ConfigError, match="profile_num_steps"):
        _trainer(tmp_path, profile_start_step=1, profile_num_steps=0)
    trainer = _trainer(tmp_path, profile_start_step=1)
    jax.profiler.start_trace(str(tmp_path / "outer"))
    try:
        with pytest.raises(ConfigError, match="could not start a JAX profiler trace"):
            trainer.train()
    finally:
        jax.profiler.stop_trace()
