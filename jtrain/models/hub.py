"""Hugging Face checkpoint directories: load into jtrain params, save params back.

Loading validates everything (config, every key, every shape) from file headers before any
tensor is read, so a bad checkpoint raises and nothing is half-loaded. Tensors are then read
one at a time from memory maps and placed straight onto their target sharding, so the full
tree never sits on one device (or, beyond one tensor, in host memory).
jtrain never downloads: a path must be a local directory with config.json.
"""

from __future__ import annotations

import glob
import json
import os
import re
import warnings
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jtrain.errors import CheckpointError, ConfigError
from jtrain.jsonfile import read_json_object
from jtrain.models import convert, safetensors_io
from jtrain.models.base import Model
from jtrain.models.registry import SUPPORTED_MODEL_TYPES, architecture, create_model, task_from_architectures

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"
_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def checkpoint_dir(path: str | os.PathLike) -> str:
    """The directory itself, or a CheckpointError that explains how to get a local copy."""
    p = os.fspath(path)
    if os.path.isfile(os.path.join(p, CONFIG_FILE)):
        return p
    where = "has no config.json" if os.path.isdir(p) else "is not a local directory"
    raise CheckpointError(
        f"{p!r} {where}. jtrain never downloads models: fetch it once, e.g. "
        f"`huggingface-cli download {p} --local-dir ./{os.path.basename(p.rstrip('/')) or 'model'}`, "
        "and pass that local directory (it must contain config.json and model.safetensors)."
    )


def read_config(directory: str) -> dict[str, Any]:
    """config.json as a dict, checked for a supported `model_type`; errors name the file."""
    file = os.path.join(directory, CONFIG_FILE)
    values = read_json_object(file, what="a model config")
    if values.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"{file}: unsupported model_type {values.get('model_type')!r}; "
                          f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    return values


def find_tokenizer_file(path: str | os.PathLike) -> str | None:
    """Path of the `tokenizer.json` saved beside a checkpoint, or None."""
    file = os.path.join(os.fspath(path), TOKENIZER_FILE)
    return file if os.path.isfile(file) else None


def weight_index(directory: str) -> dict[str, safetensors_io.TensorInfo]:
    """Every tensor of the checkpoint (single file or sharded with an index), from headers only."""
    index_file, single = os.path.join(directory, INDEX_FILE), os.path.join(directory, WEIGHTS_FILE)
    if os.path.isfile(index_file):
        try:
            with open(index_file) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_file}: not a valid safetensors index ({e})") from e
        infos = {}
        for file in sorted(set(weight_map.values())):
            infos.update(safetensors_io.read_header(os.path.join(directory, file)))
        absent = sorted(set(weight_map) - set(infos))
        if absent:
            raise CheckpointError(f"{index_file} lists tensors missing from their files: {absent[:5]}")
        return infos
    if os.path.isfile(single):
        return safetensors_io.read_header(single)
    hint = " (found PyTorch .bin weights: re-save them with transformers' save_pretrained(safe_serialization=True))" \
        if glob.glob(os.path.join(directory, "*.bin")) else ""
    raise CheckpointError(f"{directory}: no {WEIGHTS_FILE} or {INDEX_FILE}{hint}")


def _is_head(path: tuple[str, ...], base: str) -> bool:
    """Task-head params: everything outside the body, plus BERT's pooler (absent from MLM checkpoints)."""
    return path[0] != base or path[:2] == (base, "pooler")


def _plan(model: Model, infos: Mapping[str, Any], ckpt_task: str | None, ignore_mismatched_sizes: bool = False):
    """Match model leaves to checkpoint tensors; raise on anything that cannot load.

    Returns (maps, stored names, leaves to initialise fresh, unexpected tensors, mis-shaped tensors kept
    fresh because of `ignore_mismatched_sizes`)."""
    base = architecture(model.config.model_type).base_prefix(model.config)
    maps = model_leaf_maps(model)
    stored = convert.canonical_keys(list(infos), base)
    missing, mismatched, fresh, resized = [], [], [], []
    for m in maps:
        absent = [n for n in m.hf_names if n not in stored]
        if absent:
            if _is_head(m.path, base) and ckpt_task != model.task:
                fresh.append(m)
            else:
                missing.append((m, absent))
            continue
        shapes = {n: tuple(infos[stored[n]].shape) for n in m.hf_names}
        wrong = [f"{n}: checkpoint {shape} vs model {m.hf_shape}" for n, shape in shapes.items() if shape != m.hf_shape]
        if wrong and ignore_mismatched_sizes:
            fresh.append(m)
            resized += wrong
        else:
            mismatched += wrong
    if missing or mismatched:
        lines = [f"missing {a[0]} (expected shape {m.hf_shape})" for m, a in missing] + mismatched
        hint = ("\n(a head of another size, e.g. num_labels: ignore_mismatched_sizes=True initialises the "
                "mis-shaped weights afresh, as in HF)" if mismatched and not missing else "")
        raise CheckpointError("checkpoint does not fit the model:\n  " + "\n  ".join(lines) + hint)
    used = {n for m in maps for n in m.hf_names}
    unexpected = sorted(n for n in stored if n not in used and not convert.is_ignored(n))
    return maps, stored, fresh, unexpected, resized


def _target_dtype(dtype: str | None, stored: np.dtype) -> np.dtype:
    return stored if dtype == "auto" else np.dtype(jnp.dtype(dtype or "float32"))


def _place(host: np.ndarray, sharding: Any) -> jax.Array:
    """Put one tensor on its sharding; each device receives only its own slice."""
    if sharding is None:
        return jax.device_put(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def _check_shardings(mesh_shardings: Any, maps: list) -> dict | None:
    """Flattened shardings, refused before any tensor moves when they do not cover the params."""
    if mesh_shardings is None:
        return None
    flat = convert.flatten(mesh_shardings)
    differ = sorted("/".join(p) for p in set(flat) ^ {m.path for m in maps})
    if differ:
        raise ConfigError(f"mesh_shardings does not match the model's params at: {', '.join(differ[:6])}")
    return flat


def _fresh_init(model: Model, maps: list, shardings: Mapping | None, dtype: str | None, seed: int) -> dict:
    """Initialise the listed (head) params on the host, as the modules' own initialisers do.

    Every jtrain layer initialises kernels and embeddings with normal(initializer_range), biases
    with zeros and norm scales with ones (HF's `_init_weights` rule), so the head is drawn here
    directly instead of compiling the whole model's init to keep a few leaves.
    """
    rng = np.random.default_rng(seed)
    std = float(getattr(model.config, "initializer_range", 0.02))
    out = {}
    for m in maps:
        kind = m.path[-1]
        if kind == "scale":
            host = np.ones(m.shape, np.float32)
        elif kind == "bias":
            host = np.zeros(m.shape, np.float32)
        else:
            host = (std * rng.standard_normal(m.shape)).astype(np.float32)
        host = host.astype(_target_dtype(dtype, host.dtype), copy=False)
        out[m.path] = _place(host, shardings[m.path] if shardings else None)
    return out


def from_pretrained(path: str | os.PathLike, task: str | None = None, *, dtype: str | None = "float32",
                    mesh_shardings: Any = None, seed: int = 0, ignore_mismatched_sizes: bool = False,
                    **options: Any) -> tuple[Model, Any]:
    """Load a local HF checkpoint directory into `(Model, params)`.

    `task` defaults to the one named by config.json's `architectures`. `dtype` is the dtype of
    the loaded params ("auto" keeps the checkpoint's). `mesh_shardings` (a tree of shardings
    shaped like params) places each tensor straight onto its shards. Heads the checkpoint lacks
    because it was saved for another task (e.g. a classifier on a masked-LM checkpoint) are
    freshly initialised with a warning; any other missing weight raises, and so does a mis-shaped
    one unless `ignore_mismatched_sizes` (HF's flag: e.g. a classifier's head for another
    `num_labels`), which initialises it afresh with a warning.
    `options` are jtrain model options (attention_impl, remat_policy, scan_layers, num_labels).

    Example::

        model, params = from_pretrained("./bert-tiny", task="sequence_classification", num_labels=3)
    """
    directory = checkpoint_dir(path)
    config = read_config(directory)
    ckpt_task = task_from_architectures(config.get("architectures"))
    arch = architecture(config["model_type"])
    task = task or ckpt_task or arch.default_task
    body = {k: v for k, v in config.items() if k not in ("dtype", "torch_dtype")}
    model = create_model(config["model_type"], body, task, **options)
    infos = weight_index(directory)
    maps, stored, fresh, unexpected, resized = _plan(model, infos, ckpt_task, ignore_mismatched_sizes)
    if unexpected:
        warnings.warn(f"{directory}: checkpoint tensors not used by {model.task} model: {', '.join(unexpected)}",
                      stacklevel=2)
    shardings = _check_shardings(mesh_shardings, maps)
    flat = {}
    for m in maps:
        if m in fresh:
            continue
        tensors = [safetensors_io.read_tensor(infos[stored[n]]) for n in m.hf_names]
        host = convert.to_leaf(m, tensors)
        host = host.astype(_target_dtype(dtype, host.dtype), copy=False)
        flat[m.path] = _place(host, shardings[m.path] if shardings else None)
    if fresh:
        why = (f"not in the {ckpt_task or 'base'} checkpoint" if not resized else
               "not in the checkpoint, or shaped otherwise there (ignore_mismatched_sizes): " + "; ".join(resized))
        warnings.warn(f"{directory}: newly initialised ({why}): {', '.join(m.jtrain_name for m in fresh)}",
                      stacklevel=2)
        flat.update(_fresh_init(model, fresh, shardings, dtype, seed))
    return model, convert.unflatten(flat)


def config_to_hf_dict(model: Model, dtype: str | None = None) -> dict[str, Any]:
    """The config.json that HF's `AutoModelFor*` reads for this model (architectures, dtype...)."""
    cfg = model.config
    out = cfg.to_hf_dict()
    out["model_type"] = cfg.model_type
    out["architectures"] = [architecture(cfg.model_type).architecture_name(model.task)]
    name = jnp.dtype(dtype or "float32").name
    out["dtype"] = out["torch_dtype"] = name  # `dtype` for transformers 5, `torch_dtype` for 4.x
    return dict(sorted(out.items()))


def model_leaf_maps(model: Model) -> list[convert.LeafMap]:
    """How each of the model's params corresponds to HF checkpoint tensors."""
    arch = architecture(model.config.model_type)
    return convert.leaf_maps(model.abstract_params(), model.logical_axes(), arch.conv1d_pattern)


def to_hf_state_dict(model: Model, tree: Any) -> dict[str, np.ndarray]:
    """A params-shaped tree (params, grads, ...) as HF-named, HF-laid-out host arrays.

    Example::

        state = to_hf_state_dict(model, params)  # {"model.embed_tokens.weight": array, ...}
    """
    leaves = convert.flatten(tree)
    return {name: t for m in model_leaf_maps(model) for name, t in convert.from_leaf(m, _to_host(leaves[m.path]))}


def parse_size(size: int | str) -> int:
    """Bytes from an int or an HF-style size string ("5GB", "500MB", "2GiB")."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?I?B)\s*", str(size).upper())
    if not match:
        raise ConfigError(f"max_shard_size {size!r}: use bytes or a size like '5GB' or '500MB'")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


def _to_host(x: Any) -> np.ndarray:
    """A leaf as a host array; on several hosts, sharded leaves are gathered (a collective)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _shard_plan(maps: list, leaves: Mapping, dtype: str | None, limit: int) -> list[list[str]]:
    """HF tensor names grouped into files of at most `limit` bytes, in leaf order (sizes from shapes)."""
    shards: list[list[str]] = [[]]
    size = 0
    for m in maps:
        out_dtype = np.dtype(jnp.dtype(dtype)) if dtype else np.dtype(leaves[m.path].dtype)
        for name in m.hf_names:
            n = safetensors_io.tensor_bytes(m.hf_shape, out_dtype)
            if shards[-1] and size + n > limit:
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += n
    return shards


def _check_tree(maps: list, leaves: Mapping) -> None:
    expected = {m.path: m.shape for m in maps}
    got = {p: tuple(np.shape(x)) for p, x in leaves.items()}
    if expected != got:
        diff = sorted("/".join(p) for p in set(expected) ^ set(got))
        diff += sorted(f"{'/'.join(p)}: {got[p]} vs model {s}" for p, s in expected.items()
                       if p in got and got[p] != s)
        raise CheckpointError(f"params do not match the model: {', '.join(diff[:8])}")


def _clear_weights(directory: str) -> None:
    """Remove weight files of an earlier save, so a loader never mixes old and new shards."""
    for f in glob.glob(os.path.join(directory, "model*.safetensors")) + [os.path.join(directory, INDEX_FILE)]:
        if os.path.isfile(f):
            os.remove(f)


def _write_shards(directory: str, maps: list, leaves: Mapping, dtype: str | None,
                  shards: list[list[str]], files: list[str], writer: bool) -> int:
    """Fetch leaves one by one and write each file as soon as all its tensors are ready; total bytes."""
    file_of = {name: files[i] for i, names in enumerate(shards) for name in names}
    expected = {f: len(names) for f, names in zip(files, shards)}
    pending: dict[str, dict[str, np.ndarray]] = {f: {} for f in files}
    total = 0
    for m in maps:
        host = _to_host(leaves[m.path])
        host = host.astype(np.dtype(jnp.dtype(dtype)), copy=False) if dtype else host
        for name, tensor in convert.from_leaf(m, host):
            file = file_of[name]
            pending[file][name] = tensor
            total += tensor.nbytes
            if len(pending[file]) == expected[file]:
                if writer:
                    safetensors_io.write_file(os.path.join(directory, file), pending[file])
                pending[file] = {}
    return total


def _dominant_dtype(leaves: Mapping) -> str:
    """The dtype holding most parameters: what config.json's `dtype` should announce."""
    counts: dict[str, int] = {}
    for x in leaves.values():
        counts[np.dtype(x.dtype).name] = counts.get(np.dtype(x.dtype).name, 0) + int(np.size(x))
    return max(counts, key=counts.get) if counts else "float32"


def save_pretrained(model: Model, params: Any, directory: str | os.PathLike, *,
                    max_shard_size: int | str = "5GB", dtype: str | None = None) -> list[str]:
    """Write config.json and safetensors weights that `transformers.AutoModelFor*` loads.

    Above `max_shard_size` the weights are split into `model-0000i-of-0000n.safetensors` with a
    `model.safetensors.index.json`. `dtype` casts on the way out (default: the params' dtype).
    Leaves are fetched one at a time; with several hosts every host must call this (sharded
    leaves are gathered collectively) and only process 0 writes. Returns the files written.

    Example::

        save_pretrained(model, params, "out/checkpoint-final", max_shard_size="2GB")
    """
    directory = os.fspath(directory)
    maps = model_leaf_maps(model)
    leaves = convert.flatten(params)
    _check_tree(maps, leaves)
    shards = _shard_plan(maps, leaves, dtype, parse_size(max_shard_size))
    files = [WEIGHTS_FILE] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    writer = jax.process_index() == 0
    if writer:
        os.makedirs(directory, exist_ok=True)
        _clear_weights(directory)
    total = _write_shards(directory, maps, leaves, dtype, shards, files, writer)
    written = [CONFIG_FILE, *files]
    if writer and len(files) > 1:
        weight_map = {name: files[i] for i, names in enumerate(shards) for name in names}
        with open(os.path.join(directory, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        written.append(INDEX_FILE)
    if writer:
        with open(os.path.join(directory, CONFIG_FILE), "w") as f:
            json.dump(config_to_hf_dict(model, dtype or _dominant_dtype(leaves)), f, indent=2)
    return [os.path.join(directory, f) for f in written]
