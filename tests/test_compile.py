"""Compilation: planning compiles the train step once (the loop reuses it), recompiles are
counted and warned about, the persistent cache directory is wired, and MFU comes from the
step's model FLOP count."""

from __future__ import annotations

import logging
import os

import jax
import jax.monitoring
import numpy as np
import pytest

from jtrain.args import TrainingArguments
from jtrain.callbacks import TrainerCallback
from jtrain.data.loader import ArrayDataset
from jtrain.flops import step_flops
from jtrain.trainer import Trainer
from tests.tiny import lm_rows, tiny_llama

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, save_strategy="no",
                disable_tqdm=True, logging_steps=100, mesh_shape={"data": 1})
    return TrainingArguments(**{**base, **kw})


class _CountCompilesInLoop(TrainerCallback):
    """Counts XLA compilations between on_train_begin and on_train_end (the loop itself)."""

    def __init__(self):
        self.active, self.compiles = False, 0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, name, duration, **kwargs):
        if self.active and name == _BACKEND_COMPILE:
            self.compiles += 1

    def on_train_begin(self, args, state, control, **kwargs):
        self.active = True

    def on_train_end(self, args, state, control, **kwargs):
        self.active = False


def test_planned_step_is_reused_and_mfu_comes_from_its_flops(tmp_path):
    counter = _CountCompilesInLoop()
    trainer = Trainer(tiny_llama(), _args(tmp_path), train_dataset=ArrayDataset(lm_rows(24, 16)), callbacks=[counter])
    metrics = trainer.train().metrics
    # Planning lowered and compiled the step on abstract inputs; the loop ran that executable.
    assert trainer.steps.compile_log.counts["train"] == 1 and metrics["train_compilations"] == 1
    assert counter.compiles == 0
    # The reported FLOPs are the step's model FLOPs per device, counted on its jaxpr (tests/test_flop_count.py
    # checks that count against the 6·N·T + attention formula).
    loader, _ = trainer._plan()
    batch = trainer.steps.abstract_train_batch(loader.host_batch(0, 0))
    assert metrics["train_flops_per_step"] == step_flops(trainer.steps.train_step, trainer.steps.abstract_state,
                                                         batch) > 0
    # total_flos is HF's estimate (6 x non-embedding params x input tokens) summed over the 3 updates.
    assert metrics["total_flos"] == 3 * trainer.floating_point_ops(loader.host_batch(0, 0)) > 0
    assert 0 < metrics["train_mfu"] <= 1
    fractions = [metrics[f"train_{k}_fraction"] for k in ("data_wait", "device", "host")]
    assert all(0 <= f <= 1 for f in fractions) and sum(fractions) == pytest.approx(1, abs=1e-3)
    assert metrics["train_step_seconds"] > 0 and metrics["train_tokens_per_second"] > 0
    assert not [k for k in metrics if "_mem_" in k]  # skip_memory_metrics=True (the default) adds none


def _varying_length_rows(n: int) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"input_ids": list(rng.integers(1, 60, size=length))} for length in ([6] * (n // 2) + [12] * (n // 2))]


def _pad_to_longest(rows: list[dict]) -> dict:
    length = max(len(r["input_ids"]) for r in rows)
    ids = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        ids[i, :len(r["input_ids"])] = r["input_ids"]
    mask = (ids != 0).astype(np.int32)
    return {"input_ids": ids, "attention_mask": mask, "labels": np.where(mask == 1, ids, -100)}


def test_recompiles_beyond_the_length_buckets_are_warned_and_counted(tmp_path, caplog):
    rows = _varying_length_rows(8)  # first batch all length 6, second all length 12: two shapes
    trainer = Trainer(tiny_llama(), _args(tmp_path, max_steps=2, train_sampling_strategy="sequential"),
                      data_collator=_pad_to_longest, train_dataset=rows)
    with caplog.at_level(logging.WARNING, logger="jtrain.compiled"):
        metrics = trainer.train().metrics
    assert metrics["train_compilations"] == 2
    warnings = [r.getMessage() for r in caplog.records if "compiled 2 times" in r.getMessage()]
    assert len(warnings) == 1 and "more than the 1 expected" in warnings[0] and "(1, 4, 12)" in warnings[0]

    # With two length buckets, two compilations are expected: no warning.
    caplog.clear()
    bucketed = Trainer(tiny_llama(), _args(tmp_path / "b", max_steps=2, train_sampling_strategy="sequential",
                                            length_buckets=[6, 12]),
                       data_collator=_pad_to_longest, train_dataset=rows)
    with caplog.at_level(logging.WARNING, logger="jtrain.compiled"):
        assert bucketed.train().metrics["train_compilations"] == 2
    assert not [r for r in caplog.records if "compiled" in r.getMessage()]


def test_compilation_cache_dir_is_wired_to_jax(tmp_path):
    from jax.experimental.compilation_cache import compilation_cache as cc

    before = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs,
              jax.config.jax_persistent_cache_min_entry_size_bytes)
    cache = tmp_path / "xla_cache"
    try:
        trainer = Trainer(tiny_llama(), _args(tmp_path, max_steps=1, compilation_cache_dir=str(cache)),
                          train_dataset=ArrayDataset(lm_rows(8, 16)))
        trainer.train()
        assert jax.config.jax_compilation_cache_dir == str(cache)
        assert os.listdir(cache), "compiled executables were written to the cache directory"
    finally:
        cc.set_cache_dir(before[0])  # give the rest of the session its own cache back
        cc.reset_cache()
        jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", before[2])
