"""jtrain.host_buffers: the cache that keeps XLA:CPU's large buffers mapped between executions.

The allocator is process-wide and cannot be taken out again, so each check runs in a child process:
- a probe library (posix_memalign/realloc/free, like XLA's) gets the cache with a 1 MiB threshold,
  and the script walks the cache's rules one by one (exact counters, no timing);
- a short Trainer run with and without the cache: the cache only decides where buffers live, never
  what is computed, so the losses must be bitwise equal (tolerance 0).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from jtrain import host_buffers
from jtrain.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE_C = r"""
#include <stdlib.h>
void* probe_alloc(size_t n) { void* p = 0; return posix_memalign(&p, 64, n) == 0 ? p : 0; }
void probe_free(void* p) { free(p); }
void* probe_realloc(void* p, size_t n) { return realloc(p, n); }
"""

PROBE_SCRIPT = r"""
import ctypes, json, sys
from jtrain import host_buffers
MiB = 2**20
lib = ctypes.CDLL(sys.argv[1])
lib.probe_alloc.restype = lib.probe_realloc.restype = ctypes.c_void_p
lib.probe_alloc.argtypes = [ctypes.c_size_t]
lib.probe_free.argtypes = [ctypes.c_void_p]
lib.probe_realloc.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
ext = host_buffers._extension()
out = {}
before = lib.probe_alloc(2 * MiB)  # glibc's, from before the cache existed
out["absent"] = ext.jtrain_host_buffers_install(b"no_such_library.so", MiB, 3600.0).decode()
out["install"] = ext.jtrain_host_buffers_install(b"libjtrain_probe", MiB, 3600.0)
def stats():
    s = (ctypes.c_uint64 * 6)(); ext.jtrain_host_buffers_stats(s); return list(s)
small = lib.probe_alloc(1000)
out["small"] = stats()
a = lib.probe_alloc(3 * MiB)
out["a_aligned"] = a % 4096 == 0
ctypes.memset(a, 7, 3 * MiB)
out["a"] = stats()
lib.probe_free(a)
out["a_freed"] = stats()
b = lib.probe_alloc(3 * MiB - 100)
out["b_is_a"] = b == a
out["b_kept_data"] = ctypes.string_at(b, 1) == b"\x07"  # reused, not fresh (nothing promises zeros)
c = lib.probe_alloc(MiB + MiB // 2)
lib.probe_free(b)
d = lib.probe_alloc(2 * MiB)  # the cached 3 MiB block is more than a quarter too big: a new one
out["d_is_a"] = d == a
out["d"] = stats()
ctypes.memset(c, 5, MiB + MiB // 2)
e = lib.probe_realloc(c, 5 * MiB)
out["e_kept"] = ctypes.string_at(e + MiB, 1) == b"\x05" and e != c
for p in (before, small, d, e, None):
    lib.probe_free(p)
out["all_freed"] = stats()
ext.jtrain_host_buffers_install(b"libjtrain_probe", MiB, 0.0)  # idle limit 0: the next call trims all
lib.probe_free(lib.probe_alloc(MiB))  # trims, maps, frees (and trims again)
out["trimmed"] = stats()
print(json.dumps(out))
"""


def _child(code: str, *args: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> str:
    import shutil

    compiler = shutil.which("gcc") or shutil.which("cc") or shutil.which("g++")
    if compiler is None or host_buffers._unsupported():
        pytest.skip(reason="needs a C compiler on Linux with glibc (x86_64 or aarch64), like the cache itself")
    folder = tmp_path_factory.mktemp("probe")
    source = folder / "probe.c"
    source.write_text(PROBE_C)
    target = folder / "libjtrain_probe.so"
    subprocess.run([compiler, "-O1", "-shared", "-fPIC", "-x", "c", str(source), "-o", str(target)], check=True)
    return str(target)


def test_cache_reuses_large_blocks_and_leaves_the_rest_to_glibc(probe):
    MiB = 2**20
    out = json.loads(_child(PROBE_SCRIPT, probe))
    assert out["absent"] == "the library is not loaded"
    assert out["install"] is None
    # stats: reused, mapped, unmapped, live bytes, cached bytes, peak live bytes
    assert out["small"] == [0, 0, 0, 0, 0, 0]  # below the threshold: glibc's
    assert out["a_aligned"] and out["a"] == [0, 1, 0, 3 * MiB, 0, 3 * MiB]
    assert out["a_freed"] == [0, 1, 0, 0, 3 * MiB, 3 * MiB]  # kept mapped
    assert out["b_is_a"] and out["b_kept_data"]  # the same block serves a request of about its size
    assert not out["d_is_a"] and out["d"][:3] == [1, 3, 0]  # b's block was too big for d: mapped anew
    assert out["e_kept"]  # realloc of a cached block moves its contents
    reused, mapped, unmapped, live, cached, peak = out["all_freed"]
    assert live == 0 and 0 < cached <= peak  # never more cached than was once live
    assert reused + mapped == 5  # a, b, c, d, e: glibc's two pointers freed through the hook without a trace
    trimmed = out["trimmed"]
    assert trimmed[1] == mapped + 1 and trimmed[2] == trimmed[1] and trimmed[3:5] == [0, 0]  # all unmapped


TRAIN_SCRIPT = r"""
import json, tempfile
import numpy as np
from jtrain import Trainer, TrainingArguments, create_model, host_buffers
from jtrain.data.loader import ArrayDataset
cfg = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=4, max_position_embeddings=64)
model = create_model("llama", cfg, dtype="float32")
ids = np.random.default_rng(0).integers(0, 512, size=(32, 64)).astype(np.int32)
with tempfile.TemporaryDirectory() as out:
    args = TrainingArguments(output_dir=out, max_steps=6, per_device_train_batch_size=4, learning_rate=1e-3,
                             save_strategy="no", report_to=["none"], disable_tqdm=True, logging_steps=1, seed=0)
    trainer = Trainer(model, args, train_dataset=ArrayDataset({"input_ids": ids, "labels": ids}))
    trainer.train()
losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
print(json.dumps({"losses": losses, "stats": host_buffers.stats()}))
"""


def test_trainer_losses_are_bitwise_equal_with_and_without_the_cache():
    small = {host_buffers.ENV_MIN_MB: "0.25"}  # this model's buffers are small: let the cache take them
    on = json.loads(_child(TRAIN_SCRIPT, env=small))
    off = json.loads(_child(TRAIN_SCRIPT, env={**small, host_buffers.ENV_MODE: "off"}))
    assert len(on["losses"]) == 6 and on["losses"] == off["losses"]
    # Later steps ran in earlier steps' blocks. Each step takes one scratch block and async dispatch keeps
    # two alive, so steps 3-6 reuse the blocks of steps 1-2 (4 reuses on an idle machine). A loaded machine
    # can cost one (seen once in a clean-clone CI run: 3 reuses, 4 mappings): a cached block left idle for
    # the cache's 30 s during a slow compile is unmapped, or dispatch runs a step further ahead. At least
    # three allows that one and still fails a cache that does not carry blocks from step to step.
    assert on["stats"]["reused"] >= 3, on["stats"]
    assert off["stats"] == dict.fromkeys(off["stats"], 0)


def test_settings_are_checked(monkeypatch):
    monkeypatch.setenv(host_buffers.ENV_MODE, "sometimes")
    with pytest.raises(ConfigError, match="JTRAIN_CPU_BUFFER_CACHE='sometimes' is not one of auto, off"):
        host_buffers.mode()
    monkeypatch.setenv(host_buffers.ENV_MODE, "off")
    monkeypatch.setenv(host_buffers.ENV_MIN_MB, "lots")
    with pytest.raises(ConfigError, match="JTRAIN_CPU_BUFFER_CACHE_MIN_MB='lots'"):
        host_buffers._min_bytes()
    installed = host_buffers.install.cache_info().currsize
    host_buffers.install.cache_clear()
    try:
        assert host_buffers.install() is False  # off: glibc is left alone
    finally:
        host_buffers.install.cache_clear()
        if installed:
            monkeypatch.delenv(host_buffers.ENV_MODE)
            monkeypatch.delenv(host_buffers.ENV_MIN_MB)
            host_buffers.install()  # as it was (re-installing is idempotent)
