"""Does `Trainer.train()` keep the device busy? Tokens/s of the Trainer vs a bare loop over the
same compiled step, on the quickstart model, with logging every step and the progress bar on.

    python benchmarks/trainer_overhead.py [--steps 60] [--repeats 3] [--small]

Both sides are timed from outside over the same window: after `--warmup` updates until the
device is synchronised at the end (the Trainer's `on_train_end`, which follows its last metrics
fetch; the bare loop's `block_until_ready`). The bare loop reuses the Trainer's compiled step,
state and loader, so the only difference is the Trainer's host work (callbacks, one-step-late
metrics fetch, logging every step, the progress bar). Runs alternate (bare, trainer, ...) so
machine noise hits both; the verdict rests on the median of the per-pair ratios (each Trainer
run over the bare run just before it), which cancels drift in the machine's speed between pairs;
the ratio of the medians is printed beside it. Not a test: no wall time is asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]
import bench_common as bc

QUICKSTART_MODEL = {"vocab_size": 2048, "hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 4,
                        "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True}
SMALL_MODEL = {"vocab_size": 256, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True}
TARGET = 0.95


def _data(rows: int, length: int, vocab: int):
    import numpy as np

    from jtrain.data.loader import ArrayDataset

    ids = np.random.default_rng(0).integers(1, vocab, size=(rows, length)).astype(np.int32)
    return ArrayDataset({"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids})


def _trainer(steps: int, out: str, data, config: dict, batch: int, callbacks=()):
    from jtrain import Trainer, TrainingArguments, create_model

    args = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=batch, logging_steps=1,
                             save_strategy="no", learning_rate=1e-3, mesh_shape={"data": 1}, report_to=["none"])
    return Trainer(create_model("llama", config), args, train_dataset=data, callbacks=list(callbacks))


def bare_loop(trainer, steps: int, warmup: int) -> float:
    """Tokens/s of a plain Python loop over the Trainer's own compiled step, state and loader."""
    import jax

    loader, _ = trainer._plan()
    loader.place = trainer.steps.place_train_batch
    state, batches = trainer.train_state, loader.iterate(epoch=1)
    for _ in range(warmup):
        batch = next(batches)
        state, m = trainer.steps.train_step(state, batch)
    jax.block_until_ready(m)
    tokens_per_step = int(batch["input_ids"].size)  # every token is real here (mask all ones)
    start = time.perf_counter()
    for _, batch in zip(range(steps), batches):
        state, m = trainer.steps.train_step(state, batch)
    jax.block_until_ready((state.params, m))
    trainer.train_state = state
    return tokens_per_step * steps / (time.perf_counter() - start)


def trainer_run(steps: int, warmup: int, data, config: dict, batch: int, length: int) -> float:
    """Tokens/s of `Trainer.train()` over the updates after `warmup` (compilation excluded)."""
    from jtrain import TrainerCallback

    marks: dict[str, float] = {}

    class Window(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == warmup:
                marks["start"] = time.perf_counter()

        def on_train_end(self, args, state, control, **kw):
            marks["end"] = time.perf_counter()

    with tempfile.TemporaryDirectory() as out:
        _trainer(steps + warmup, out, data, config, batch, [Window()]).train()
    # on_step_end of update `warmup` fires right after update `warmup` is dispatched and update
    # warmup-1 has finished (the loop fetches the previous update's metrics first), so the window
    # runs updates warmup .. warmup+steps: steps + 1 of them, plus the end-of-training bookkeeping.
    return batch * length * (steps + 1) / (marks["end"] - marks["start"])


def measure(steps: int, repeats: int, warmup: int, small: bool) -> dict:
    config = SMALL_MODEL if small else QUICKSTART_MODEL
    batch, length = (4, 32) if small else (16, 128)
    data = _data(batch * (steps + warmup + 2), length, config["vocab_size"])
    bare, full = [], []
    with tempfile.TemporaryDirectory() as out:
        warm = _trainer(2, out, data, config, batch)
        warm.train()  # compiles; the bare loop then reuses this trainer's compiled step
        for _ in range(repeats):
            bare.append(bare_loop(warm, steps, warmup))
            full.append(trainer_run(steps, warmup, data, config, batch, length))
    b, f = statistics.median(bare), statistics.median(full)
    pairs = [x / y for x, y in zip(full, bare)]
    return {"bare_tokens_per_s": b, "trainer_tokens_per_s": f, "ratio": statistics.median(pairs),
            "ratio_of_medians": f / b, "pair_ratios": pairs, "bare_runs": bare,
            "trainer_runs": full, "model": "small" if small else "quickstart", "steps": steps, "repeats": repeats}


def markdown(r: dict, command: str) -> str:
    verdict = "meets" if r["ratio"] >= TARGET else "below"
    return (f"Trainer / bare loop tokens/s = **{r['ratio']:.3f}** ({verdict} the target {TARGET}), the median "
            f"of the per-pair ratios {[round(x, 3) for x in r['pair_ratios']]} (ratio of the medians "
            f"{r['ratio_of_medians']:.3f}); {r['model']} model, {r['steps']} timed updates, {r['repeats']} "
            "alternating pairs, "
            f"logging every step, progress bar on. Command: `{command}`\n\n"
            + bc.markdown_table(["loop", "tokens/s (median)", "runs"],
                                [["bare loop", round(r["bare_tokens_per_s"]), [round(x) for x in r["bare_runs"]]],
                                 ["Trainer.train()", round(r["trainer_tokens_per_s"]),
                                  [round(x) for x in r["trainer_runs"]]]]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--small", action="store_true", help="a tiny model, for tests")
    a = p.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    r = measure(a.steps, a.repeats, a.warmup, a.small)
    print(f"bare loop  : {r['bare_tokens_per_s']:,.0f} tokens/s  (runs: {[round(x) for x in r['bare_runs']]})")
    print(f"Trainer    : {r['trainer_tokens_per_s']:,.0f} tokens/s  (runs: {[round(x) for x in r['trainer_runs']]})")
    print(f"Trainer / bare = {r['ratio']:.3f} median of pair ratios {[round(x, 3) for x in r['pair_ratios']]}, "
          f"ratio of medians {r['ratio_of_medians']:.3f}  (target >= {TARGET})")
    bc.emit({**r, "markdown": markdown(r, bc.this_command())})


if __name__ == "__main__":
    main()
