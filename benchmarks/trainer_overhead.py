"""Does `Trainer.train()` keep the device busy? Tokens/s of the Trainer vs a bare loop over the
same compiled step, on the quickstart model, with logging every step and the progress bar on.

    python benchmarks/trainer_overhead.py [--steps 60] [--repeats 3] [--small]

Both sides are timed from outside over the same window: after `--warmup` updates until the
device is synchronised at the end (the Trainer's `on_train_end`, which follows its last metrics
fetch; the bare loop's `block_until_ready`). The bare loop reuses the Trainer's compiled step,
state and loader, so the only difference is the Trainer's host work (callbacks, one-step-late
metrics fetch, logging every step, the progress bar). Runs alternate (bare, trainer, ...) so
machine noise hits both.

The verdict is the ratio of the median time per update, pooled over all runs of each loop: on
the shared 2-core machine whole 15-second runs swing by +-10% from one to the next (a
neighbour's burst slows every step in a run), which a median over hundreds of updates shrugs off
while a ratio of run totals does not. Both loops read update N-1's metrics after dispatching
update N and an interval is the time between two reads, so they measure the same thing. The
whole-run window ratios (median of per-pair ratios, ratio of medians) are printed beside it.
Not a test: no wall time is asserted.
"""

from __future__ import annotations

import argparse
import os
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


def bare_loop(trainer, steps: int, warmup: int) -> tuple[float, list[float]]:
    """(tokens/s, per-update intervals) of a plain Python loop over the Trainer's own compiled step,
    state and loader. Like any loop that prints its loss, it reads update N-1's metrics after
    dispatching update N; an interval is the time between two such reads."""
    import jax

    loader, _ = trainer._plan()
    loader.place = trainer.steps.place_train_batch
    state, batches = trainer.train_state, loader.iterate(epoch=1)
    for _ in range(warmup):
        batch = next(batches)
        state, m = trainer.steps.train_step(state, batch)
    jax.block_until_ready(m)
    tokens_per_step = int(batch["input_ids"].size)  # every token is real here (mask all ones)
    start, previous, marks = time.perf_counter(), None, []
    for _, batch in zip(range(steps), batches):
        state, m = trainer.steps.train_step(state, batch)
        if previous is not None:
            jax.device_get(previous)
            marks.append(time.perf_counter())
        previous = m
    jax.block_until_ready((state.params, m))
    trainer.train_state = state
    return tokens_per_step * steps / (time.perf_counter() - start), _intervals(marks)


def _intervals(marks: list[float]) -> list[float]:
    return [b - a for a, b in zip(marks, marks[1:])]


def trainer_run(steps: int, warmup: int, data, config: dict, batch: int, length: int) -> tuple[float, list[float]]:
    """(tokens/s, per-update intervals) of `Trainer.train()` after `warmup` updates (compilation
    excluded). `on_step_end` of update N follows the read of update N-1's metrics, the same event
    the bare loop's intervals are taken between."""
    from jtrain import TrainerCallback

    marks: dict[str, float] = {}
    step_marks: list[float] = []

    class Window(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == warmup:
                marks["start"] = time.perf_counter()
            if state.global_step > warmup:
                step_marks.append(time.perf_counter())

        def on_train_end(self, args, state, control, **kw):
            marks["end"] = time.perf_counter()

    with tempfile.TemporaryDirectory() as out:
        _trainer(steps + warmup, out, data, config, batch, [Window()]).train()
    # on_step_end of update `warmup` fires right after update `warmup` is dispatched and update
    # warmup-1 has finished (the loop fetches the previous update's metrics first), so the window
    # runs updates warmup .. warmup+steps: steps + 1 of them, plus the end-of-training bookkeeping.
    return batch * length * (steps + 1) / (marks["end"] - marks["start"]), _intervals(step_marks)


def measure(steps: int, repeats: int, warmup: int, small: bool) -> dict:
    config = SMALL_MODEL if small else QUICKSTART_MODEL
    batch, length = (4, 32) if small else (16, 128)
    data = _data(batch * (steps + warmup + 2), length, config["vocab_size"])
    bare, full, bare_steps, full_steps = [], [], [], []
    with tempfile.TemporaryDirectory() as out:
        warm = _trainer(2, out, data, config, batch)
        warm.train()  # compiles; the bare loop then reuses this trainer's compiled step
        for _ in range(repeats):
            rate, intervals = bare_loop(warm, steps, warmup)
            bare.append(rate)
            bare_steps += intervals
            rate, intervals = trainer_run(steps, warmup, data, config, batch, length)
            full.append(rate)
            full_steps += intervals
    b, f = bc.median(bare), bc.median(full)
    pairs = [x / y for x, y in zip(full, bare)]
    step_b, step_f = bc.median(bare_steps), bc.median(full_steps)
    return {"ratio": step_b / step_f, "bare_median_step_s": step_b, "trainer_median_step_s": step_f,
            "intervals": [len(bare_steps), len(full_steps)], "window_ratio": bc.median(pairs),
            "pair_ratios": pairs, "ratio_of_medians": f / b, "bare_tokens_per_s": b, "trainer_tokens_per_s": f,
            "bare_runs": bare, "trainer_runs": full,
            "model": "small" if small else "quickstart", "steps": steps, "repeats": repeats}


def markdown(r: dict, command: str) -> str:
    verdict = "meets" if r["ratio"] >= TARGET else "below"
    return (f"Trainer / bare loop tokens/s = **{r['ratio']:.3f}** ({verdict} the target {TARGET}): median time "
            f"per update {r['bare_median_step_s'] * 1e3:.1f} ms bare vs {r['trainer_median_step_s'] * 1e3:.1f} ms "
            f"Trainer over {r['intervals'][0]} and {r['intervals'][1]} updates. Whole-run windows, which also "
            f"carry the machine's run-to-run swings: median of the per-pair ratios {r['window_ratio']:.3f} "
            f"({[round(x, 3) for x in r['pair_ratios']]}), ratio of the medians {r['ratio_of_medians']:.3f}. "
            f"{r['model']} model, {r['steps']} timed updates per run, {r['repeats']} alternating pairs, logging "
            f"every step, progress bar on. Command: `{command}`\n\n"
            + bc.markdown_table(["loop", "median ms per update", "tokens/s per run (median)", "runs tokens/s"],
                                [["bare loop", round(r["bare_median_step_s"] * 1e3, 1), round(r["bare_tokens_per_s"]),
                                  [round(x) for x in r["bare_runs"]]],
                                 ["Trainer.train()", round(r["trainer_median_step_s"] * 1e3, 1),
                                  round(r["trainer_tokens_per_s"]), [round(x) for x in r["trainer_runs"]]]]))


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
    print(f"median ms per update: bare {r['bare_median_step_s'] * 1e3:.1f}, "
          f"Trainer {r['trainer_median_step_s'] * 1e3:.1f}")
    print(f"Trainer / bare = {r['ratio']:.3f} per update (target >= {TARGET}); whole-run windows: median of pair "
          f"ratios {r['window_ratio']:.3f} {[round(x, 3) for x in r['pair_ratios']]}, ratio of medians "
          f"{r['ratio_of_medians']:.3f}")
    bc.emit({**r, "markdown": markdown(r, bc.this_command())})


if __name__ == "__main__":
    main()
