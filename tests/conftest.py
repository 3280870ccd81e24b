"""Test-wide environment: 8 fake CPU devices so every sharding test runs on any machine.

This is one of the two places (with the entry point) allowed to touch the JAX environment;
it must run before any JAX backend is initialised.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests are compile-bound on 2 cores: a lower XLA backend optimisation level cuts compile time by
# about 40% and changes no result a test compares (every comparison runs under the same flags).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
# XLA:CPU aborts the whole process when the 8 fake devices of a collective do not all reach it within
# 40 s (its default). With two test workers on 2 busy cores one device's thread can be starved that
# long, and a full-suite run once lost a worker to that abort in an 8-device data-parallel test; a
# real deadlock still ends, after 10 minutes.
os.environ["XLA_FLAGS"] += " --xla_cpu_collective_call_terminate_timeout_seconds=600"

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

# Many tests build the same tiny models: a persistent compilation cache shared by the whole run
# skips recompiling identical programs (tracing, and so every compile counter, is unaffected).
# Each pytest-xdist worker has its own directory: JAX writes entries in place, so a worker could
# otherwise read another's half-written entry (JAX would only warn and recompile, but why race).
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "main")
jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.dirname(__file__), ".jax_cache", _WORKER))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def pytest_configure(config):
    config.addinivalue_line("markers", "devices(n): needs n JAX devices (this file gives 8 on the CPU); skipped, "
                                       "saying so, where JAX runs on fewer (scripts/gpu_tests.sh on one GPU)")
    config.addinivalue_line("markers", "cpu_only(reason): checks what only the CPU backend does; skipped, with the "
                                       "reason, where JAX runs on another backend")


def pytest_runtest_setup(item):
    """CI runs every test (8 CPU devices, the CPU backend): these skips only happen on a GPU run."""
    import pytest

    for mark in item.iter_markers("devices"):
        if jax.device_count() < mark.args[0]:
            pytest.skip(reason=f"needs {mark.args[0]} JAX devices; {jax.device_count()} on {jax.default_backend()} "
                               "here")
    for mark in item.iter_markers("cpu_only"):
        if jax.default_backend() != "cpu":
            pytest.skip(reason=f"CPU backend only ({jax.default_backend()} here): {mark.args[0]}")
