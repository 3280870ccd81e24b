"""Test-wide environment: 8 fake CPU devices so every sharding test runs on any machine.

This is one of the two places (with the entry point) allowed to touch the JAX environment;
it must run before any JAX backend is initialised.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
