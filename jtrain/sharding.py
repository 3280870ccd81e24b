"""Mesh and logical-axis rules: shardings are derived here, never written at call sites.

Every parameter carries logical axis names (`embed`, `mlp`, `heads`, ...). A rules table maps
each logical name to mesh axes (`data`, `stage`, `fsdp`, `expert`, `sequence`, `tensor`). Data parallelism, FSDP
(ZeRO-3-like), ZeRO-2 (`shard_grad_op`) and tensor parallelism are presets of that table, not
code paths: a preset (`ShardingRules`) holds one table for parameters, one for the optimizer
state (and the gradients that feed it) and one for activations. The mesh shape decides what is
actually split: a rule that names an axis of size 1 is a no-op.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jtrain.errors import ConfigError
from jtrain.optim.quantize import QuantizedArray

# Outermost first: the axes that talk least (data: once per update; stage: one activation
# hand-off per micro-batch) go outermost, where a multi-host mesh puts the slower network.
MESH_AXES = ("data", "stage", "fsdp", "expert", "sequence", "tensor")
# Batch rows split over these: expert parallelism reuses the data-parallel group for every
# non-expert layer (each expert-parallel device also holds its own rows), as is usual.
BATCH_AXES = ("data", "fsdp", "expert")
# Axes that split the rows the host loader reads, in the order processes are laid out on them.
PROCESS_AXES = ("data", "fsdp")
Rules = tuple[tuple[str, Any], ...]

# logical name -> mesh axis (or None = replicated). Axes of size 1 make a rule a no-op, so one
# table serves every mesh. `batch` and `length` name activation dimensions; a mesh axis is used
# at most once per array, so an activation [batch, length, embed] keeps `embed` whole (fsdp is
# already taken by the batch) while the `embed` dimension of a weight is split over fsdp.
DEFAULT_RULES: Rules = (
    ("batch", BATCH_AXES),
    ("length", "sequence"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    # Scanned layer stacks [layers, ...] split into consecutive blocks over the pipeline stages
    # (stage s holds layers s*L/S .. (s+1)*L/S - 1); `stage` names the stage dimension of the
    # pipeline's own buffers ([stages, micro-batch rows, ...], `jtrain.pipeline_parallel`).
    ("layers", "stage"),
    ("stage", "stage"),
    # Mixture-of-experts weights [experts, ...] put whole experts on different devices.
    ("expert", "expert"),
    ("labels", None),
)


def without_axis(rules: Rules, axis: str) -> Rules:
    """The same table with `axis` removed from every target (what ZeRO-2 does to parameters)."""
    out = []
    for name, target in rules:
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        kept = tuple(a for a in axes if a != axis)
        out.append((name, None if not kept else kept[0] if len(kept) == 1 else kept))
    return tuple(out)


@dataclass(frozen=True)
class ShardingRules:
    """One preset: where parameters, optimizer state (and gradients) and activations live.

    `opt_state` also decides the gradients' layout: when it differs from `params` the step
    constrains the gradients to it, so they are reduce-scattered instead of all-reduced.
    """

    params: Rules = DEFAULT_RULES
    opt_state: Rules = DEFAULT_RULES
    activations: Rules = DEFAULT_RULES


# HF `fsdp=` shortcuts -> rule presets. full_shard and hybrid_shard share the table: they differ
# in the mesh (hybrid puts `data` across hosts and `fsdp` within one; see `resolve_mesh_shape`).
PRESETS: dict[str, ShardingRules] = {
    "": ShardingRules(),
    "full_shard": ShardingRules(),
    "hybrid_shard": ShardingRules(),
    "shard_grad_op": ShardingRules(params=without_axis(DEFAULT_RULES, "fsdp")),
}


def sharding_rules(fsdp: str) -> ShardingRules:
    """The preset for HF's `fsdp` shortcut ("" = the default table, FSDP when the mesh has fsdp > 1)."""
    if fsdp not in PRESETS:
        raise ConfigError(f"`fsdp` must be one of {sorted(PRESETS)}, got {fsdp!r}")
    return PRESETS[fsdp]


def resolve_mesh_shape(mesh_shape: Mapping[str, int], fsdp: str, n_devices: int,
                       local_devices: int | None = None) -> dict[str, int]:
    """Fill the mesh shape: explicit axes, HF-style `fsdp` shortcuts, and one -1 from the device count.

    Without `mesh_shape`: plain data parallelism; `full_shard`/`shard_grad_op` put every device
    on fsdp; `hybrid_shard` puts one host's devices on fsdp and the hosts on data.
    """
    unknown = set(mesh_shape) - set(MESH_AXES)
    if unknown:
        raise ConfigError(f"unknown mesh axis {sorted(unknown)} in `mesh_shape`; valid axes: {list(MESH_AXES)}")
    shape = {axis: int(mesh_shape.get(axis, 1)) for axis in MESH_AXES}
    if not mesh_shape:
        if fsdp == "hybrid_shard":
            local = jax.local_device_count() if local_devices is None else local_devices
            shape.update(data=-1, fsdp=local)
        elif fsdp:
            shape.update(fsdp=-1)
        else:
            shape.update(data=-1)
    bad = {a: n for a, n in shape.items() if n == 0 or n < -1}
    if bad:
        raise ConfigError(f"`mesh_shape` axis sizes must be >= 1 (or one -1), got {bad}")
    free = [a for a, n in shape.items() if n == -1]
    if len(free) > 1:
        raise ConfigError(f"`mesh_shape` may have only one -1 axis, got {free}")
    known = math.prod(n for n in shape.values() if n != -1)
    if free:
        if n_devices % known:
            raise ConfigError(f"`mesh_shape` {dict(mesh_shape)}: mesh axis {free[0]!r} cannot be filled, "
                              f"{n_devices} devices do not divide by {known}")
        shape[free[0]] = n_devices // known
    if math.prod(shape.values()) > n_devices:
        raise ConfigError(f"`mesh_shape` {shape} needs {math.prod(shape.values())} devices, "
                          f"but {n_devices} are visible")
    return shape


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over `MESH_AXES` (every axis, size 1 where unused) with automatic (GSPMD) axis types.

    One process: a mesh smaller than the visible devices uses the first ones (e.g. `{data: 1}`
    for one device). Several processes: the mesh must use every device, and processes are laid
    out outermost on the batch axes (data, then fsdp), so each process holds one contiguous
    block of batch rows, which is exactly the share `HostLoader` reads.
    """
    dims = tuple(shape.get(a, 1) for a in MESH_AXES)
    types = (AxisType.Auto,) * len(MESH_AXES)
    devices = list(devices if devices is not None else jax.devices())
    n_proc = len({d.process_index for d in devices})
    if n_proc == 1:
        return jax.make_mesh(dims, MESH_AXES, axis_types=types, devices=devices[: math.prod(dims)])
    if math.prod(dims) != len(devices):
        raise ConfigError(f"`mesh_shape` {dict(shape)} uses {math.prod(dims)} of {len(devices)} devices; "
                          f"with {n_proc} processes the mesh must use every device")
    from jax.experimental import mesh_utils

    dcn = _process_grid(shape, n_proc)
    ici = tuple(n // p for n, p in zip(dims, dcn))
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=True)
    return Mesh(grid, MESH_AXES, axis_types=types)


def _process_grid(shape: Mapping[str, int], n_proc: int) -> tuple[int, ...]:
    """How the processes split each mesh axis (in `MESH_AXES` order): data first, then fsdp; no other."""
    on_data = math.gcd(shape.get("data", 1), n_proc)
    rest = n_proc // on_data
    grid = dict.fromkeys(MESH_AXES, 1)
    grid["data"] = on_data
    if rest == 1:
        return tuple(grid.values())
    if on_data == shape.get("data", 1) and shape.get("fsdp", 1) % rest == 0:
        grid["fsdp"] = rest
        return tuple(grid.values())
    raise ConfigError(
        f"`mesh_shape` {dict(shape)} cannot be split over {n_proc} processes: each process loads its own "
        f"rows, so the batch axes ('data', 'fsdp') must split over processes (make `data` a multiple of "
        f"{n_proc}, or data a divisor of it and fsdp a multiple of the rest); mesh axes 'stage', 'expert', "
        "'sequence' and 'tensor' stay within a process")


def logical_to_mesh_spec(logical: P, rules: Rules = DEFAULT_RULES) -> P:
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


def param_shardings(logical_specs: Any, abstract_params: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """NamedShardings for params; refuses a dimension that its mesh axis does not divide.

    All offending parameters are collected so that one error names every dimension to fix.
    """
    problems: list[str] = []

    def one(path: Any, spec: P, shape_dtype: Any) -> NamedSharding:
        mesh_spec = on_mesh(logical_to_mesh_spec(spec, rules), mesh)
        for dim, axes, logical in zip(shape_dtype.shape, mesh_spec, spec):
            size = axis_size(mesh, axes)
            if dim % size:
                name = jax.tree_util.keystr(path, simple=True, separator="/")
                if logical == "layers":  # one message per layer stack, not one per weight in it
                    stack = name.rsplit("/layer/", 1)[0]
                    problem = (f"{dim} layers of `{stack}` do not split evenly into {size} pipeline stages "
                               f"(mesh axis {axes!r} of size {size}); use a layer count that is a multiple of {size}")
                else:
                    problem = (f"parameter `{name}` dimension `{logical}`={dim} does not divide over mesh "
                               f"axis {axes!r} of size {size}")
                if problem not in problems:
                    problems.append(problem)
        return NamedSharding(mesh, mesh_spec)

    out = jax.tree_util.tree_map_with_path(one, logical_specs, abstract_params, is_leaf=lambda x: isinstance(x, P))
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ConfigError("; ".join(problems[:3]) + more + "; change `mesh_shape` or the model size")
    return out


def bytes_per_device(shardings: Any, abstract: Any) -> dict[jax.Device, int]:
    """Bytes of `abstract` (shapes and dtypes) each device holds under `shardings`, from shapes alone."""
    held: dict[jax.Device, int] = {}
    for sharding, leaf in zip(jax.tree.leaves(shardings), jax.tree.leaves(abstract)):
        itemsize = np.dtype(leaf.dtype).itemsize
        for device, index in sharding.devices_indices_map(tuple(leaf.shape)).items():
            count = math.prod(len(range(*s.indices(n))) for s, n in zip(index, leaf.shape))
            held[device] = held.get(device, 0) + count * itemsize
    return held


def describe_param_bytes(shardings: Any, abstract: Any, mesh: Mesh) -> str:
    """One line: parameter bytes per device against the whole model, for the run log."""
    held = bytes_per_device(shardings, abstract)
    total = sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(abstract))
    used = {a: n for a, n in mesh.shape.items() if n > 1} or {"data": 1}
    return (f"parameters: {max(held.values())} bytes per device (min {min(held.values())}) of {total} in all, "
            f"on mesh {used}")


def on_mesh(spec: P, mesh: Mesh) -> P:
    """`spec` without the axes `mesh` lacks (a hand-built mesh of fewer axes treats them as size 1)."""
    out = []
    for axes in spec:
        kept = tuple(a for a in ((axes,) if isinstance(axes, str) else axes or ()) if a in mesh.shape)
        out.append(None if not kept else kept[0] if len(kept) == 1 else kept)
    return P(*out)


def axis_size(mesh: Mesh, axes: Any) -> int:
    """Devices along mesh axis `axes` (a name, a tuple of names, or None for 1); absent axes count 1."""
    if axes is None:
        return 1
    names = (axes,) if isinstance(axes, str) else axes
    return math.prod(dict(mesh.shape).get(a, 1) for a in names)


def batch_sharding(mesh: Mesh, leading_micro_axis: bool) -> NamedSharding:
    """Rows over data and fsdp; the micro-batch axis of accumulation stays whole."""
    spec = P(None, BATCH_AXES) if leading_micro_axis else P(BATCH_AXES)
    return NamedSharding(mesh, on_mesh(spec, mesh))


def data_parallel_size(mesh: Mesh) -> int:
    return axis_size(mesh, BATCH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def opt_state_shardings(abstract_opt_state: Any, params_sharding: Any, abstract_params: Any, mesh: Mesh) -> Any:
    """Optimizer state is sharded like its parameter (ZeRO-style); everything else is replicated.

    A copy of the param tree in the state is any subtree that has the params' structure as its
    prefix. Its leaf positions may hold more than one array (Adafactor's factored row and column, an
    8-bit moment's codes and scales, GaLore's projector) or none (a masked transform's `MaskedNode`):
    a state array of its parameter's shape is sharded like it, an 8-bit moment's blocks over the same
    mesh axes (`_blocks_sharding`), any other array is replicated. (optax's
    `tree_map_params` finds the copies by initialising the optimizer on a placeholder, which
    optimizers that label params by name, GaLore and APOLLO, cannot do.)
    """
    params_def = jax.tree.structure(abstract_params)

    def is_param_copy(node: Any) -> bool:
        try:
            params_def.flatten_up_to(node)
        except (ValueError, TypeError):
            return False
        return True

    def per_param(sharding: NamedSharding, param: Any, state_subtree: Any) -> Any:
        if isinstance(state_subtree, QuantizedArray):
            return _blocks_sharding(state_subtree, sharding, mesh)
        return jax.tree.map(lambda leaf: sharding if tuple(leaf.shape) == tuple(param.shape) else replicated(mesh),
                            state_subtree)

    def place(node: Any) -> Any:
        if is_param_copy(node):
            return jax.tree.map(per_param, params_sharding, abstract_params, node)
        return replicated(mesh)

    return jax.tree.map(place, abstract_opt_state, is_leaf=is_param_copy)


def _blocks_sharding(moment: Any, param_sharding: NamedSharding, mesh: Mesh) -> Any:
    """An 8-bit moment's blocks (of its flattened parameter) split over every mesh axis that splits the
    parameter, when they divide evenly, else replicated: FSDP then holds 1/n of the 8-bit state per device
    as of the float32 one. Where the parameter is split along its first axis and each device's share is
    whole blocks, the two layouts coincide; otherwise XLA moves the blocks (correct either way)."""
    axes = tuple(a for entry in param_sharding.spec if entry is not None
                 for a in (entry if isinstance(entry, tuple) else (entry,)))
    size = math.prod(mesh.shape[a] for a in axes)
    if not axes or moment.absmax.shape[0] % size:
        return QuantizedArray(replicated(mesh), replicated(mesh))
    return QuantizedArray(NamedSharding(mesh, P(axes, None)), NamedSharding(mesh, P(axes)))


@dataclass(frozen=True)
class ActivationSharding:
    """Layout constraints for activations, handed to a model explicitly (through its config).

    `constrain(x, ("batch", "length", "heads", "head_dim"))` pins `x` to the mesh axes the rules
    give those names. Without it GSPMD propagates weight shardings into activations and can pick
    a layout that splits the hidden dimension over fsdp, then reshards (an all-to-all or a full
    rematerialisation) at the next layer. A dimension its axes do not divide is left free: a
    constraint is a layout hint, never a reason to fail.
    """

    mesh: Mesh
    rules: Rules = DEFAULT_RULES

    def __call__(self, x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
        return self._pin(x, logical_to_mesh_spec(P(*logical), self.rules))

    def gathered(self, weight: jax.Array, logical: Sequence[str | None]) -> jax.Array:
        """A weight in its compute layout: whole over fsdp (FSDP's all-gather), still split over tensor.

        Needed where the weight feeds a gather rather than a dot: an embedding table split on
        `embed` over fsdp makes GSPMD produce the looked-up rows split the same way, which then
        cannot be resharded to rows-over-batch without replicating the whole activation.
        """
        return self._pin(weight, logical_to_mesh_spec(P(*logical), without_axis(self.rules, "fsdp")))

    def check_sequence_length(self, length: int) -> None:
        """Refuse (at trace time, before XLA compiles) a length the `sequence` axis does not split.

        Every other constraint silently falls back to a free layout; here that would quietly turn
        sequence parallelism off (each device holding the whole sequence), so it is an error.
        """
        axes, size = logical_to_mesh_spec(P("length"), self.rules)[0], self.devices_along("length")
        if length % size:
            raise ConfigError(f"sequence length {length} does not divide over mesh axis {axes!r} of size {size} "
                              f"(sequence parallelism); pad or bucket the rows to a multiple of {size} "
                              "(e.g. `data.block_size`, `pad_to_multiple_of`) or change `mesh_shape`")

    def devices_along(self, logical: str) -> int:
        """How many devices the mesh axes of logical axis `logical` span (1 when it is not split)."""
        return axis_size(self.mesh, logical_to_mesh_spec(P(logical), self.rules)[0])

    def splits_length(self) -> bool:
        """True when the `length` dimension is split over devices (sequence parallelism)."""
        return self.devices_along("length") > 1

    def _pin(self, x: jax.Array, spec: P) -> jax.Array:
        spec = on_mesh(spec, self.mesh)
        fitted = [axes if dim % axis_size(self.mesh, axes) == 0 else None for dim, axes in zip(x.shape, spec)]
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, P(*fitted)))


def check_batch_rows(rows: int, mesh: Mesh, *, what: str) -> None:
    """Refuse, before compiling, a batch whose rows do not split over the batch axes."""
    dp = data_parallel_size(mesh)
    if rows % dp:
        raise ConfigError(
            f"{what}: a batch of {rows} rows does not divide over mesh axes {BATCH_AXES} of size {dp} "
            f"({' x '.join(f'{a}={axis_size(mesh, a)}' for a in BATCH_AXES)}); make the global micro-batch "
            f"(per_device batch size x {dp}) a multiple of {dp}")


def process_row_block(mesh: Mesh, rows: int, process_index: int | None = None) -> tuple[int, int]:
    """The contiguous block [start, stop) of batch rows that one process's devices hold.

    Raises ConfigError if those rows are not one contiguous block (then the per-process share
    that `HostLoader` reads would land on the wrong devices).
    """
    process_index = jax.process_index() if process_index is None else process_index
    index_map = batch_sharding(mesh, leading_micro_axis=False).devices_indices_map((rows,))
    mine = sorted({(s[0].start or 0, rows if s[0].stop is None else s[0].stop)
                   for d, s in index_map.items() if d.process_index == process_index})
    if not mine:
        raise ConfigError(f"process {process_index} has no device in mesh {dict(mesh.shape)}; "
                          "with several processes the mesh must use every device")
    start, stop = mine[0][0], mine[-1][1]
    if any(a[1] != b[0] for a, b in zip(mine, mine[1:])):
        raise ConfigError(f"process {process_index} holds batch rows {mine} of mesh {dict(mesh.shape)}, which are "
                          "not one contiguous block; build the mesh with jtrain.sharding.make_mesh")
    return start, stop


def check_process_layout(mesh: Mesh) -> None:
    """With several processes, each must hold its own equal, contiguous, in-order block of rows."""
    n = jax.process_count()
    if n == 1:
        return
    rows = data_parallel_size(mesh)
    for p in range(n):
        want = (p * rows // n, (p + 1) * rows // n)
        got = process_row_block(mesh, rows, p)
        if rows % n or got != want:
            raise ConfigError(
                f"mesh {dict(mesh.shape)}: process {p} holds batch rows {got} of {rows}, not its own share {want}; "
                f"the batch axes {BATCH_AXES} (size {rows}) must split evenly over the {n} processes")


def host_local_array_to_global(batch: Mapping[str, np.ndarray], sharding: NamedSharding, row_axis: int = 0) -> dict:
    """Assemble a global jax.Array from this process's rows (one process: a sharded device_put).

    Each process passes its own contiguous share of rows along `row_axis` (see
    `check_process_layout`); the global row count is the local one times the number of processes.
    """
    if jax.process_count() == 1:
        return {k: jax.device_put(v, sharding) for k, v in batch.items()}
    out = {}
    for k, v in batch.items():
        shape = list(v.shape)
        shape[row_axis] *= jax.process_count()
        out[k] = jax.make_array_from_process_local_data(sharding, v, tuple(shape))
    return out


def spec_to_json(spec: P) -> list:
    """A PartitionSpec as JSON: one entry per dimension, None, an axis name or a list of names."""
    return [list(e) if isinstance(e, tuple) else e for e in spec]


def partition_table(logical_specs: Any, rules: ShardingRules) -> dict[str, dict[str, list]]:
    """`{param path: {"params": spec, "opt_state": spec}}` in mesh axes: a preset, written out.

    The golden file `tests/golden/partition_specs.json` holds this table for the tiny Llama, so
    any change to the rules or the model's logical axes shows up as a reviewed diff.
    """
    leaves = jax.tree_util.tree_flatten_with_path(logical_specs, is_leaf=lambda x: isinstance(x, P))[0]
    return {
        jax.tree_util.keystr(path, simple=True, separator="/"): {
            "params": spec_to_json(logical_to_mesh_spec(spec, rules.params)),
            "opt_state": spec_to_json(logical_to_mesh_spec(spec, rules.opt_state)),
        }
        for path, spec in leaves
    }
