"""Interleaved A/B/A/B timing of jtrain variants (XLA flags, model options) on the same workload.

    python benchmarks/ab.py --preset tiny --precision fp32 --rounds 3 \
        --variant base= --variant onednn='--xla_cpu_use_onednn=true'
    python benchmarks/ab.py --variant scan='{"scan_layers": true}'

A variant is `name=FLAGS` (space-separated XLA flags, and `NAME=value` environment settings such
as `JTRAIN_CPU_F32_GEMM=xla`) or `name={json model options}`, or both joined by `|`
(`name=--flag|{"scan_layers": true}`). Each run is a fresh process running jtrain's
`Trainer` on the vs_hf.py workload; rounds alternate the variants, so machine noise hits all of
them alike. Reports each variant's median step time relative to the first variant.
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]
import bench_common as bc


def parse_variant(text: str) -> tuple[str, str, str, dict[str, str]]:
    name, _, spec = text.partition("=")
    flags, options, env = "", "", {}
    for part in (spec.split("|") if spec else []):
        part = part.strip()
        if part.startswith("{"):
            options = part
        elif part:
            words = part.split()
            for w in words:
                if not w.startswith("--") and "=" not in w:
                    raise SystemExit(f"variant {name!r}: {w!r} is neither an XLA flag (--name=value) "
                                     "nor an environment setting (NAME=value)")
            env.update(w.split("=", 1) for w in words if not w.startswith("--"))
            flags = ",".join(w for w in words if w.startswith("--"))
    return name, flags, options, env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variant", action="append", required=True)
    a = ap.parse_args()
    variants = [parse_variant(v) for v in a.variant]
    times: dict[str, list[float]] = {name: [] for name, *_ in variants}
    cpu: dict[str, list[float]] = {name: [] for name, *_ in variants}
    for r in range(a.rounds):
        for name, flags, options, env in variants:
            argv = [os.path.join(HERE, "vs_hf.py"), "--worker", "jtrain", "--quick", "--presets", a.preset,
                    "--steps", str(a.steps), "--warmup", str(a.warmup)]
            argv += ["--bf16"] if a.precision == "bf16" else []
            argv += [f"--xla-flags={flags}"] if flags else []
            argv += ["--model-options", options] if options else []
            res = bc.run_child(argv, env=env)
            times[name].append(res["median_step_s"])
            cpu[name].append(res["median_step_cpu_s"])
            print(f"round {r + 1} {name:24s} {res['median_step_s'] * 1e3:9.1f} ms wall "
                  f"{res['median_step_cpu_s'] * 1e3:9.1f} ms CPU (kernel {res['median_step_kernel_s'] * 1e3:.0f} ms, "
                  f"{res['median_step_page_faults']:.0f} page faults, peak RSS {res['peak_rss_mb']:.0f} MiB)  "
                  f"loss {res['train_loss']:.6f}", flush=True)
    base, base_cpu = bc.median(times[variants[0][0]]), bc.median(cpu[variants[0][0]])
    print(f"\n{a.preset} {a.precision}, median of {a.rounds} rounds (per step; speed relative to {variants[0][0]}; "
          "CPU time = all threads, robust when the machine is shared):")
    for name, flags, options, env in variants:
        m, c = bc.median(times[name]), bc.median(cpu[name])
        print(f"  {name:24s} wall {m * 1e3:9.1f} ms x{base / m:.3f}   CPU {c * 1e3:9.1f} ms x{base_cpu / c:.3f}"
              f"   [{flags} {options} {' '.join(f'{k}={v}' for k, v in env.items())}]")


if __name__ == "__main__":
    main()
