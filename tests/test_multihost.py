"""Multi-host on one machine: `python -m jtrain.launch` runs this file as a worker.

2 processes x 4 CPU devices (fsdp=hybrid_shard: data=2 across the processes, fsdp=4 within
each) must report the same losses as 1 process x 8 devices (fsdp=8), and a job whose process
dies must end, non-zero, instead of hanging in a collective.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

STEPS = 5
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# Both runs sum the same float32 products in a different order: the 2-process mesh reduces the
# gradient over `data` across processes (gloo) and over `fsdp` within each, the 1-process mesh
# over 8 devices at once. Same budget and reason as tests/test_parallel.py (a few ulp per
# reduction, carried through 5 Adam updates); a lost or doubled process share moves the loss by >1e-2.
LOSS_RTOL = 2e-6
# Bound on a whole launch: start-up, compilation and 5 tiny updates take ~20 s on 2 busy cores;
# a job that hangs (a dead peer, a collective that never completes) is stopped by this.
LAUNCH_TIMEOUT_S = 240


def _launch(nproc: int, devices: int, *command: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, HERE, env.get("PYTHONPATH", "")])
    # Less LLVM optimisation: ~40% less compile time for these tiny programs; both runs compared use it.
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
    launcher = [sys.executable, "-m", "jtrain.launch", "--nproc", str(nproc), "--devices_per_proc", str(devices),
                "--grace_s", "3", "--"]
    return subprocess.Popen(launcher + list(command), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    return proc.returncode, out, err


def said(out: str, rank: int, text: str) -> bool:
    """Whether rank `rank` printed `text`. Gloo writes its "[Gloo] Rank r is connected to n peer ranks"
    messages to the same stdout from its own threads, in pieces, so a fragment can share a line with a
    print (a clean-clone run once failed on "[rank0] roles: ..." for that); the launcher's `[rankI]`
    prefix still starts every line of that rank's output."""
    return any(line.startswith(f"[rank{rank}] ") and text in line for line in out.splitlines())


def test_two_processes_train_like_one(tmp_path):
    import jax

    from tiny import tiny_llama

    # Start params made once here (a jitted init costs each worker ~3 s of compilation).
    params = jax.tree.leaves(jax.device_get(jax.jit(tiny_llama().init)(jax.random.key(0))))
    np.savez(tmp_path / "params.npz", *params)
    one, two = tmp_path / "one", tmp_path / "two"
    worker = [sys.executable, os.path.abspath(__file__), str(tmp_path / "params.npz")]
    runs = {"1x8": _launch(1, 8, *worker, str(one)), "2x4": _launch(2, 4, *worker, str(two))}
    results = {name: _finish(proc) for name, proc in runs.items()}
    for name, (code, out, err) in results.items():
        assert code == 0, f"{name} exited {code}\n{out[-3000:]}\n{err[-3000:]}"
    a = json.loads((one / "losses.json").read_text())
    b = json.loads((two / "losses.json").read_text())
    from jtrain.sharding import MESH_AXES  # imported here: this file is also the worker script

    ones = dict.fromkeys(MESH_AXES, 1)  # every mesh axis is present; unused ones have size 1
    assert a["mesh"] == {**ones, "data": 1, "fsdp": 8} and a["processes"] == 1
    assert b["mesh"] == {**ones, "data": 2, "fsdp": 4} and b["processes"] == 2
    rel = np.abs(np.array(b["losses"]) - a["losses"]) / np.abs(a["losses"])
    print(f"1x8 losses {a['losses']}\n2x4 losses {b['losses']}\nmax relative delta {rel.max():.2e}")
    np.testing.assert_allclose(b["losses"], a["losses"], rtol=LOSS_RTOL)
    out2 = results["2x4"][1]
    # Each process read only its half of every global batch of 16 rows (2 micro-batches of 8).
    assert said(out2, 0, "process 0/2 reads rows (2, 4, 16) of a (2, 8, 16) batch")
    assert said(out2, 1, "process 1/2 reads rows (2, 4, 16) of a (2, 8, 16) batch")
    # Both processes run on this host: local ranks 0 and 1 (from their gathered host names), so only
    # process 0 is a local zero, logs (HF's should_log) and prints the Trainer's logs; it alone writes files.
    assert said(out2, 0, "roles: local 0 of 2, should_log True, local zero True, world zero True")
    assert said(out2, 1, "roles: local 1 of 2, should_log False, local zero False, world zero False")
    assert said(out2, 1, "inside main_process_first: marker exists True")
    assert said(out2, 0, "{'loss'") and not said(out2, 1, "{'loss'")
    assert sorted(os.listdir(two)) == ["losses.json", "main_first.txt"]
    assert said(out2, 0, "after end(): distributed initialised False")
    assert said(out2, 1, "after end(): distributed initialised False")


_DIE = """
import os, signal, time
if os.environ["JAX_PROCESS_ID"] == "1":
    time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGKILL)
time.sleep(600)  # rank 0 stands for a peer blocked in a collective that will never complete
"""


def test_a_dead_process_stops_the_job():
    code, out, err = _finish(_launch(2, 1, sys.executable, "-c", _DIE))
    assert code != 0
    assert "rank 1" in err and "SIGKILL" in err and "stopped ranks [0]" in err, err


def test_job_comes_from_flags_then_environment(monkeypatch):
    from jtrain.distributed import JobSpec, resolve_job
    from jtrain.errors import ConfigError
    from jtrain.run import parse_argv

    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_JOB_ID",
                "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert resolve_job() is None  # nothing said: one process, nothing initialised
    cmd = parse_argv(["--coordinator_address", "10.0.0.1:1234", "--num_processes", "2", "--process_id", "1",
                      "--max_steps", "3"])
    assert cmd.overrides == {"max_steps": "3"}  # the job flags are not run-config keys
    assert resolve_job(**cmd.distributed) == JobSpec("10.0.0.1:1234", 2, 1)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:999")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    assert resolve_job() == JobSpec("127.0.0.1:999", 4, 3)
    assert resolve_job(process_id=0) == JobSpec("127.0.0.1:999", 4, 0)  # a flag wins over the environment
    monkeypatch.delenv("JAX_PROCESS_ID")
    with pytest.raises(ConfigError, match="missing: --process_id"):
        resolve_job()
    with pytest.raises(ConfigError, match=r"`process_id` must be in \[0, num_processes=4\)"):
        resolve_job(process_id=4)
    assert resolve_job(coordinator_address="auto").auto_detect  # JAX detects TPU / k8s / mpi4py clusters


def test_multi_task_slurm_step_is_joined_automatically(monkeypatch):
    from jtrain.distributed import resolve_job

    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert resolve_job() is None  # one task: nothing to join
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert resolve_job().auto_detect


def _worker(params_file: str, out_dir: str) -> None:
    """One rank: join the job, train 5 updates with hybrid_shard, process 0 writes the losses."""
    from jtrain.distributed import is_main_process, maybe_initialize

    maybe_initialize()  # JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID from the launcher
    import jax

    from jtrain import Trainer, TrainerCallback, TrainingArguments
    from jtrain.data.loader import ArrayDataset, HostLoader
    from tiny import lm_rows, tiny_llama

    class Losses(TrainerCallback):
        def __init__(self):
            self.losses = []

        def on_optimizer_step(self, args, state, control, metrics=None, **kwargs):
            self.losses.append(float(metrics["loss"]))

    model = tiny_llama()
    with np.load(params_file) as f:
        params = jax.tree.unflatten(jax.tree.structure(model.abstract_params()), [f[k] for k in f.files])
    data = ArrayDataset(lm_rows(64, 16, seed=0))
    share = HostLoader(data, global_batch_size=16, accum_steps=2).host_batch(0, 0)["input_ids"].shape
    print(f"process {jax.process_index()}/{jax.process_count()} reads rows {share} of a (2, 8, 16) batch", flush=True)
    record = Losses()
    args = TrainingArguments(output_dir=os.path.join(out_dir, "run"), max_steps=STEPS, per_device_train_batch_size=1,
                             gradient_accumulation_steps=2, learning_rate=1e-2, logging_steps=STEPS,
                             save_strategy="no", disable_tqdm=True, fsdp="hybrid_shard")
    trainer = Trainer(model, args, train_dataset=data, callbacks=[record], params=params)
    print(f"roles: local {args.local_process_index} of {args.world_size}, should_log {args.should_log}, "
          f"local zero {trainer.is_local_process_zero()}, world zero {trainer.is_world_process_zero()}", flush=True)
    marker = os.path.join(out_dir, "main_first.txt")
    with args.main_process_first(desc="marker"):  # the others wait until the main process has written it
        if args.local_process_index == 0:
            time.sleep(1.0)  # a replica that did not wait would look before the file exists
            with open(marker, "w") as fh:
                fh.write("written first")
        else:
            print(f"inside main_process_first: marker exists {os.path.exists(marker)}", flush=True)
    trainer.train()
    if is_main_process():
        with open(os.path.join(out_dir, "losses.json"), "w") as fh:
            json.dump({"losses": record.losses, "mesh": dict(trainer.mesh.shape),
                       "processes": jax.process_count()}, fh)
    trainer.end()  # HF's end(): every process leaves the job
    print(f"after end(): distributed initialised {jax.distributed.is_initialized()}", flush=True)


if __name__ == "__main__":
    os.makedirs(sys.argv[2], exist_ok=True)
    _worker(sys.argv[1], sys.argv[2])
