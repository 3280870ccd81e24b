"""Quantised weights on disk: one safetensors file plus a small JSON describing the format.

`quantized_model.safetensors` holds every param of a `QuantizedModel` under its jtrain path
(`model/layers_0/mlp/up_proj/kernel`); a quantised kernel is stored as its arrays,
`<path>.codes`, `<path>.scales` (and `<path>.scales2`, `<path>.offset` with double
quantisation), never as float. `quantization_config.json` records the format, the exact
modules that are quantised and each one's float shape and dtype, so `load_quantized` rebuilds
the same `QuantizedModel` around the caller's (float) model and checks every tensor against it.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jtrain.errors import CheckpointError, ConfigError
from jtrain.models import safetensors_io
from jtrain.quant.formats import QuantFormat, QuantizedTensor
from jtrain.quant.model import QuantizedModel
from jtrain.quant.targets import module_name

WEIGHTS_FILE = "quantized_model.safetensors"
CONFIG_FILE = "quantization_config.json"
_FIELDS = ("codes", "scales", "scales2", "offset")


def _targets_regex(qmodel: QuantizedModel) -> str:
    return "|".join(re.escape(module_name(p)) for p in qmodel.plans)


def save_quantized(directory: str, qmodel: QuantizedModel, qparams: Any) -> str:
    """Write `qparams` (a `qmodel` tree) to `directory`; returns the weights file's path."""
    os.makedirs(directory, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    described = {}
    for path, leaf in traverse_util.flatten_dict(qparams).items():
        name = "/".join(path)
        if isinstance(leaf, QuantizedTensor):
            for f in _FIELDS:
                if getattr(leaf, f) is not None:
                    tensors[f"{name}.{f}"] = np.asarray(getattr(leaf, f))
            described[name] = {"shape": list(leaf.shape), "dtype": leaf.dtype_name, "format": leaf.fmt,
                               "block_size": leaf.block_size, "double_quant": leaf.double_quant}
        else:
            tensors[name] = np.asarray(leaf)
    fmt = qmodel.fmt
    config = {"format": fmt.name, "block_size": fmt.block_size, "double_quant": fmt.double_quant,
              "targets": _targets_regex(qmodel), "quantized": described}
    weights = os.path.join(directory, WEIGHTS_FILE)
    safetensors_io.write_file(weights, tensors, {"format": "jtrain-quantized"})
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2)
    return weights


def load_quantized(directory: str, model: Any) -> tuple[QuantizedModel, Any]:
    """(QuantizedModel around `model`, its params) from `save_quantized` output.

    Every stored tensor is checked against the tree `model` quantised this way must have;
    a missing, extra or reshaped tensor raises CheckpointError naming it."""
    cfg_path, weights = os.path.join(directory, CONFIG_FILE), os.path.join(directory, WEIGHTS_FILE)
    if not (os.path.isfile(cfg_path) and os.path.isfile(weights)):
        raise CheckpointError(f"{directory}: not a quantised export (needs {CONFIG_FILE} and {WEIGHTS_FILE}; "
                              "write one with jtrain.quant.save_quantized or export_quantized)")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
        fmt = QuantFormat(cfg["format"], cfg["block_size"], cfg["double_quant"])
        qmodel = QuantizedModel(model, fmt, targets=cfg["targets"])
    except (OSError, ValueError, KeyError) as e:
        kind = "does not fit this model" if isinstance(e, ConfigError) else "is unreadable"
        raise CheckpointError(f"{cfg_path} {kind}: {e}") from e
    infos = safetensors_io.read_header(weights)
    expected = {}
    for path, leaf in traverse_util.flatten_dict(qmodel.abstract_params()).items():
        name = "/".join(path)
        if isinstance(leaf, QuantizedTensor):
            expected.update({f"{name}.{f}": getattr(leaf, f) for f in _FIELDS if getattr(leaf, f) is not None})
        else:
            expected[name] = leaf
    missing, extra = sorted(set(expected) - set(infos)), sorted(set(infos) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{weights} does not match the model: missing {missing[:5]}, unexpected "
                              f"{extra[:5]}; load it with the model it was quantised from")
    arrays = {}
    for name, want in expected.items():
        info = infos[name]
        if tuple(info.shape) != tuple(want.shape) or np.dtype(info.dtype) != np.dtype(want.dtype):
            raise CheckpointError(f"{weights}: tensor {name!r} is {info.dtype}{list(info.shape)}, the model "
                                  f"expects {np.dtype(want.dtype)}{list(want.shape)}")
        arrays[name] = jnp.asarray(np.array(safetensors_io.read_tensor(info)))

    def build(path: tuple[str, ...], leaf: Any) -> Any:
        name = "/".join(path)
        if isinstance(leaf, QuantizedTensor):
            return leaf.replace(**{f: arrays[f"{name}.{f}"] for f in _FIELDS if getattr(leaf, f) is not None})
        return arrays[name]

    flat = traverse_util.flatten_dict(qmodel.abstract_params())
    return qmodel, traverse_util.unflatten_dict({p: build(p, leaf) for p, leaf in flat.items()})
