"""`python -m jtrain.launch --nproc N [--devices_per_proc K] -- COMMAND...`: a local multi-process job.

Starts N copies of COMMAND on this machine as one JAX job on CPU devices, the way a cluster
scheduler starts one process per host: each copy gets `JAX_COORDINATOR_ADDRESS` (a free port on
localhost), `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID` (read by `jtrain.distributed.maybe_initialize`)
and K fake CPU devices. Output is streamed line by line, prefixed `[rankI]`: a rank's stdout to
stdout and its stderr to stderr, each through its own pipe (as torchrun does), so tracebacks and
library logs stay where a shell or scheduler expects them and cannot land inside a printed line.
Gloo's "[Gloo] Rank r is connected to n peer ranks" messages are the exception: Gloo writes them
to stdout itself, in pieces, from its own threads, so a stdout line can carry a fragment of one.

Why the launcher polices its children: when one process of a JAX job dies, the others block
forever in their next collective. So as soon as one copy exits non-zero (or by a signal) the
others get SIGTERM, then SIGKILL after `--grace_s`, and the launcher exits non-zero with one line
naming the rank that failed. It is for testing multi-host code on one machine; real clusters
start their processes with SLURM, mpirun or the TPU tooling (see docs/parallelism.md).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import IO, Sequence

_PRINT_LOCK = threading.Lock()


@dataclass
class Rank:
    index: int
    proc: subprocess.Popen
    readers: tuple[threading.Thread, ...]


def free_port() -> int:
    """A TCP port that was free a moment ago (the coordinator binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rank_env(base: dict[str, str], *, rank: int, nproc: int, port: int, devices: int) -> dict[str, str]:
    """The environment of one rank: CPU platform, coordinator, its id and its device count."""
    env = dict(base)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env.update({
        "JAX_PLATFORMS": "cpu",
        "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
        "JAX_NUM_PROCESSES": str(nproc),
        "JAX_PROCESS_ID": str(rank),
        "JAX_NUM_CPU_DEVICES": str(devices),
        "XLA_FLAGS": " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"]),
        "PYTHONUNBUFFERED": "1",
    })
    return env


def _stream(prefix: str, pipe: IO[str], out: IO[str]) -> None:
    for line in iter(pipe.readline, ""):
        with _PRINT_LOCK:
            out.write(f"{prefix} {line}" if line.endswith("\n") else f"{prefix} {line}\n")
            out.flush()
    pipe.close()


def start_rank(command: Sequence[str], env: dict[str, str], rank: int) -> Rank:
    """Start one rank in its own process group, so that stopping it also stops its children."""
    proc = subprocess.Popen(list(command), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            bufsize=1, start_new_session=True)
    readers = tuple(threading.Thread(target=_stream, args=(f"[rank{rank}]", pipe, out), daemon=True)
                    for pipe, out in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr)))
    for reader in readers:
        reader.start()
    return Rank(rank, proc, readers)


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def stop_ranks(ranks: Sequence[Rank], grace_s: float) -> None:
    """SIGTERM every running rank's process group, then SIGKILL what is left after `grace_s`."""
    running = [r for r in ranks if r.proc.poll() is None]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for r in running:
            try:
                os.killpg(r.proc.pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(r.proc.poll() is None for r in running):
            time.sleep(0.05)
        running = [r for r in running if r.proc.poll() is None]
        if not running:
            return


def supervise(ranks: Sequence[Rank], grace_s: float, timeout_s: float | None) -> int:
    """Wait for all ranks; on the first failure (or the timeout) stop the rest. Returns the exit code."""
    started = time.monotonic()
    while True:
        codes = [r.proc.poll() for r in ranks]
        failed = [(r, c) for r, c in zip(ranks, codes) if c not in (None, 0)]
        if failed:
            rank, code = failed[0]
            others = [r.index for r in ranks if r.proc.poll() is None]
            stop_ranks(ranks, grace_s)
            _say(f"rank {rank.index} (pid {rank.proc.pid}) {describe_exit(code)}; "
                 f"stopped ranks {others}" if others else f"rank {rank.index} {describe_exit(code)}")
            return code if code > 0 else 128 - code
        if all(c == 0 for c in codes):
            return 0
        if timeout_s is not None and time.monotonic() - started > timeout_s:
            stop_ranks(ranks, grace_s)
            _say(f"timed out after {timeout_s:.0f}s; stopped every rank")
            return 124
        time.sleep(0.05)


def _say(message: str) -> None:
    with _PRINT_LOCK:
        print(f"jtrain.launch: {message}", file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    argv = list(argv)
    if "--" not in argv:
        raise SystemExit("usage: python -m jtrain.launch --nproc N [--devices_per_proc K] -- COMMAND ...")
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="python -m jtrain.launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, required=True, help="processes to start")
    parser.add_argument("--devices_per_proc", type=int, default=1, help="fake CPU devices per process")
    parser.add_argument("--port", type=int, default=0, help="coordinator port (default: a free one)")
    parser.add_argument("--grace_s", type=float, default=5.0, help="SIGTERM-to-SIGKILL grace when stopping")
    parser.add_argument("--timeout_s", type=float, default=None, help="stop every rank after this long")
    args = parser.parse_args(argv[:split])
    args.command = argv[split + 1:]
    if not args.command:
        parser.error("no COMMAND after --")
    if args.nproc < 1 or args.devices_per_proc < 1:
        parser.error("--nproc and --devices_per_proc must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    port = args.port or free_port()
    ranks: list[Rank] = []
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def forward(signum: int, _frame: object) -> None:
        stop_ranks(ranks, args.grace_s)
        raise SystemExit(128 + signum)

    for s in previous:
        signal.signal(s, forward)
    try:
        for rank in range(args.nproc):
            env = rank_env(dict(os.environ), rank=rank, nproc=args.nproc, port=port, devices=args.devices_per_proc)
            ranks.append(start_rank(args.command, env, rank))
        code = supervise(ranks, args.grace_s, args.timeout_s)
    finally:
        stop_ranks(ranks, args.grace_s)
        for s, handler in previous.items():
            signal.signal(s, handler)
    for r in ranks:
        for reader in r.readers:
            reader.join(timeout=2.0)
    return code


if __name__ == "__main__":
    sys.exit(main())
