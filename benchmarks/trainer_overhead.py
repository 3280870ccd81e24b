"""Does `Trainer.train()` keep the device busy? Tokens/s of the Trainer vs a bare loop over the
same compiled step, on the quickstart model, with logging every step and the progress bar on.

    python benchmarks/trainer_overhead.py [--steps 60] [--repeats 3]

Runs alternate (bare, trainer, bare, trainer, ...) so that machine noise hits both; the ratio of
medians is printed. Not a test: a test never asserts a wall time.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import jax
import numpy as np

from jtrain import Trainer, TrainingArguments, create_model
from jtrain.data.loader import ArrayDataset

QUICKSTART_MODEL = dict(vocab_size=2048, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)


def _data(rows: int, length: int) -> ArrayDataset:
    ids = np.random.default_rng(0).integers(1, 2048, size=(rows, length)).astype(np.int32)
    return ArrayDataset({"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids})


def _trainer(steps: int, out: str, data: ArrayDataset) -> Trainer:
    args = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=16, logging_steps=1,
                             save_strategy="no", learning_rate=1e-3, mesh_shape={"data": 1}, report_to=["none"])
    return Trainer(create_model("llama", QUICKSTART_MODEL), args, train_dataset=data)


def bare_loop(trainer: Trainer, steps: int) -> float:
    """Tokens/s of a plain Python loop over the Trainer's own compiled step and loader."""
    loader, _ = trainer._plan()
    loader.place = trainer.steps.place_train_batch
    state, tokens = trainer.train_state, 0
    batches = loader.iterate(epoch=1)
    state, m = trainer.steps.train_step(state, next(batches))  # compiled already; one warm step
    jax.block_until_ready(m)
    start = time.perf_counter()
    for _, batch in zip(range(steps), batches):
        state, m = trainer.steps.train_step(state, batch)
        tokens += int(batch["attention_mask"].sum())
    jax.block_until_ready(state.params)
    trainer.train_state = state
    return tokens / (time.perf_counter() - start)


def trainer_run(steps: int, data: ArrayDataset) -> float:
    with tempfile.TemporaryDirectory() as out:
        t = _trainer(steps + 1, out, data)
        t.train()  # includes compilation: measure a second train() call? No: use the logged window rates.
        rates = [e["tokens_per_second"] for e in t.state.log_history if "tokens_per_second" in e][2:]
        return statistics.median(rates)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    data = _data(16 * (a.steps + 4), 128)
    with tempfile.TemporaryDirectory() as out:
        warm = _trainer(2, out, data)
        warm.train()
        bare, full = [], []
        for _ in range(a.repeats):
            bare.append(bare_loop(warm, a.steps))
            full.append(trainer_run(a.steps, data))
    b, f = statistics.median(bare), statistics.median(full)
    print(f"bare loop  : {b:,.0f} tokens/s  (runs: {[round(x) for x in bare]})")
    print(f"Trainer    : {f:,.0f} tokens/s  (runs: {[round(x) for x in full]})")
    print(f"Trainer / bare = {f / b:.3f}  (target >= 0.95)")


if __name__ == "__main__":
    main()
