"""Compile time of the train step: with and without `scan_layers`, and with a persistent cache.

    python benchmarks/compile_time.py [--layers 4 32] [--hidden 128] [--seq 128] [--batch 4]

Part 1: for each depth, the train step of a Llama-shaped model is traced, lowered and compiled
on abstract inputs (`CompiledSteps.compile_train`, what the Trainer does before step 1), once
with a Python loop over layers and once with `nn.scan` (`scan_layers=True`). A scanned stack is
one layer body in the program, so its compile time should stay roughly flat as depth grows,
while the unrolled one grows with depth.

Part 2: the same compile in two fresh processes sharing a new `compilation_cache_dir`; the
second should load the executable from the cache instead of compiling it.

Not a test: nothing is asserted. Times on a busy machine are noisy; compare ratios, rerun idle.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)


def _model_config(layers: int, hidden: int) -> dict:
    return dict(vocab_size=1024, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)


def compile_seconds(layers: int, scan: bool, hidden: int, seq: int, batch: int,
                    cache_dir: str | None = None) -> dict:
    """Seconds to trace+lower and to compile the train step (abstract inputs, one device)."""
    import numpy as np
    import optax

    from jtrain.compiled import build_compiled_steps, use_compilation_cache
    from jtrain.losses import causal_lm_loss
    from jtrain.models import create_model
    from jtrain.sharding import make_mesh

    use_compilation_cache(cache_dir)
    model = create_model("llama", _model_config(layers, hidden), scan_layers=scan)
    steps = build_compiled_steps(model, make_mesh({"data": 1}), optax.adamw(1e-3), 1e-3, causal_lm_loss, seed=0)
    ids = np.zeros((1, batch, seq), np.int32)
    abstract = steps.abstract_train_batch({"input_ids": ids, "attention_mask": ids, "labels": ids})
    start = time.perf_counter()
    lowered = steps.train_step.lower(steps.abstract_state, abstract)
    traced = time.perf_counter()
    lowered.compile()
    done = time.perf_counter()
    return {"layers": layers, "scan": scan, "lower_s": round(traced - start, 3), "compile_s": round(done - traced, 3)}


def _child(argv: list[str]) -> None:
    """One compile in this (fresh) process; prints its timings as JSON."""
    layers, hidden, seq, batch, cache = int(argv[0]), int(argv[1]), int(argv[2]), int(argv[3]), argv[4]
    print(json.dumps(compile_seconds(layers, False, hidden, seq, batch, cache_dir=cache)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 32])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--skip-cache", action="store_true", help="skip part 2 (persistent cache)")
    args = parser.parse_args()

    print("part 1: compile time vs depth (seconds)")
    print(f"{'layers':>6} {'scan':>5} {'lower':>8} {'compile':>8} {'total':>8}")
    for layers in args.layers:
        for scan in (False, True):
            r = compile_seconds(layers, scan, args.hidden, args.seq, args.batch)
            print(f"{layers:>6} {scan!s:>5} {r['lower_s']:>8.2f} {r['compile_s']:>8.2f} "
                  f"{r['lower_s'] + r['compile_s']:>8.2f}", flush=True)
    if args.skip_cache:
        return
    print("\npart 2: persistent compilation cache (fresh process each run, same new cache directory)")
    with tempfile.TemporaryDirectory() as cache:
        for run in ("first", "second"):
            cmd = [sys.executable, __file__, "--child", str(args.layers[0]), str(args.hidden), str(args.seq),
                   str(args.batch), cache]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS":
                                 os.environ.get("JAX_PLATFORMS", "cpu")})
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{run:>6} run, {r['layers']} layers: lower {r['lower_s']:.2f}s, compile {r['compile_s']:.2f}s "
                  f"(cache holds {len(os.listdir(cache))} entries)", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2:])
    else:
        main()
