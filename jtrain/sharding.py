"""Mesh and logical-axis rules: shardings are derived here, never written at call sites.

Every parameter carries logical axis names (`embed`, `mlp`, `heads`, ...). A rules table maps
each logical name to mesh axes (`data`, `fsdp`, `tensor`). Data parallelism, FSDP
(ZeRO-3-like) and tensor parallelism are presets of that table, not code paths.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jtrain.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical name -> mesh axis (or None = replicated). Axes of size 1 make a rule a no-op, so one
# table serves every preset: the mesh shape decides what is actually sharded.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
)


def resolve_mesh_shape(mesh_shape: Mapping[str, int], fsdp: str, n_devices: int) -> dict[str, int]:
    """Fill the mesh shape: explicit axes, HF-style `fsdp` shortcuts, and one -1 from the device count."""
    shape = {axis: int(mesh_shape.get(axis, 1)) for axis in MESH_AXES}
    unknown = set(mesh_shape) - set(MESH_AXES)
    if unknown:
        raise ConfigError(f"unknown mesh axis {sorted(unknown)} in `mesh_shape`; valid axes: {list(MESH_AXES)}")
    if fsdp in ("full_shard", "shard_grad_op", "hybrid_shard") and not mesh_shape:
        shape = {"data": 1, "fsdp": -1, "tensor": 1}
    if not mesh_shape and not fsdp:
        shape = {"data": -1, "fsdp": 1, "tensor": 1}
    free = [a for a, n in shape.items() if n == -1]
    if len(free) > 1:
        raise ConfigError(f"`mesh_shape` may have only one -1 axis, got {free}")
    known = math.prod(n for n in shape.values() if n != -1)
    if free:
        if n_devices % known:
            raise ConfigError(f"`mesh_shape` {mesh_shape}: {n_devices} devices do not divide by {known}")
        shape[free[0]] = n_devices // known
    if math.prod(shape.values()) > n_devices:
        raise ConfigError(f"`mesh_shape` {shape} needs {math.prod(shape.values())} devices, but {n_devices} are visible")
    return shape


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over (data, fsdp, tensor) with automatic (GSPMD) axis types.

    A mesh smaller than the visible devices uses the first ones (e.g. `{data: 1}` for one device).
    """
    devices = list(devices if devices is not None else jax.devices())[: math.prod(shape.values())]
    dims = tuple(shape[a] for a in MESH_AXES)
    return jax.make_mesh(dims, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_to_mesh_spec(logical: P, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> P:
    """Map one PartitionSpec of logical names to mesh axes; a mesh axis is used at most once."""
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name in logical:
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def param_shardings(logical_specs: Any, abstract_params: Any, mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Any:
    """NamedShardings for params; refuses a dimension that the mesh axis does not divide."""

    def one(path: Any, spec: P, shape_dtype: Any) -> NamedSharding:
        mesh_spec = logical_to_mesh_spec(spec, rules)
        for dim, axes, logical in zip(shape_dtype.shape, mesh_spec, spec):
            size = _axis_size(mesh, axes)
            if dim % size:
                name = jax.tree_util.keystr(path, simple=True, separator="/")
                raise ConfigError(
                    f"parameter `{name}` dimension `{logical}`={dim} does not divide over mesh axis "
                    f"{axes!r} of size {size}; change `mesh_shape` or the model size"
                )
        return NamedSharding(mesh, mesh_spec)

    return jax.tree_util.tree_map_with_path(one, logical_specs, abstract_params,
                                            is_leaf=lambda x: isinstance(x, P))


def _axis_size(mesh: Mesh, axes: Any) -> int:
    if axes is None:
        return 1
    names = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in names)


def batch_sharding(mesh: Mesh, leading_micro_axis: bool) -> NamedSharding:
    """Rows over data and fsdp; the micro-batch axis of accumulation stays whole."""
    spec = P(None, BATCH_AXES) if leading_micro_axis else P(BATCH_AXES)
    return NamedSharding(mesh, spec)


def data_parallel_size(mesh: Mesh) -> int:
    return _axis_size(mesh, BATCH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def opt_state_shardings(tx: Any, abstract_opt_state: Any, params_sharding: Any, abstract_params: Any,
                        mesh: Mesh) -> Any:
    """Optimizer state is sharded like its parameter (ZeRO-style); everything else is replicated.

    `optax.tree_map_params` finds the state leaves that mirror params; a mirrored leaf whose shape
    differs from its parameter's (factored or quantised statistics) is replicated.
    """
    import optax

    def like_param(state_leaf: Any, sharding: NamedSharding, param: Any) -> NamedSharding:
        return sharding if tuple(state_leaf.shape) == tuple(param.shape) else replicated(mesh)

    return optax.tree_map_params(
        tx, like_param, abstract_opt_state, params_sharding, abstract_params,
        transform_non_params=lambda _: replicated(mesh),
    )


def host_local_array_to_global(batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict:
    """Assemble a global jax.Array from this process's rows (one process: a sharded device_put)."""
    if jax.process_count() == 1:
        return {k: jax.device_put(v, sharding) for k, v in batch.items()}
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
