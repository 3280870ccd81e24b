"""HF PEFT's adapter files: `adapter_config.json` + `adapter_model.safetensors`, both directions.

Key names are PEFT's for a `PeftModel` around the transformers model:
`base_model.model.<HF module>.lora_A.weight` ([r, in]) and `.lora_B.weight` ([out, r]); trained
biases as `<HF module>.bias` (`<HF module>.base_layer.bias` for an adapted layer) and
`modules_to_save` weights under their HF names. jtrain's factors are Flax-kernel shaped
(`lora_A [*in, r]`, `lora_B [r, *out]`); PEFT's are those flattened to 2-D and transposed, the same
rule `jtrain.models.convert` applies to kernels (GPT-2's Conv1D included: PEFT's factors are
Linear-shaped there too, only its base weight is stored [in, out]). DoRA's magnitudes are
`<HF module>.lora_magnitude_vector` ([out], the output dims flattened in the kernel's order).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from jtrain.errors import CheckpointError, ConfigError
from jtrain.jsonfile import read_json_object
from jtrain.models import convert, safetensors_io
from jtrain.peft.config import LoraConfig
from jtrain.peft.adapted_dense import MAGNITUDE
from jtrain.peft.lora import LoraModel, LoraTarget, apply_lora, module_name

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
TASK_TYPES = {"causal_lm": "CAUSAL_LM", "sequence_classification": "SEQ_CLS"}
_FAN_IN_FAN_OUT = ("gpt2",)  # HF Conv1D layers: PEFT sets fan_in_fan_out=True for them


def _host(x: Any) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _factors_to_peft(t: LoraTarget, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r = a.shape[-1]
    return (np.ascontiguousarray(a.reshape(t.fan_in, r).T), np.ascontiguousarray(b.reshape(r, t.fan_out).T))


def _factors_from_peft(t: LoraTarget, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r = a.shape[0]
    return np.asarray(a).T.reshape(*t.in_shape, r), np.asarray(b).T.reshape(r, *t.out_shape)


def _base_leaf_maps(model: LoraModel) -> list[convert.LeafMap]:
    """convert's map for the base params that train beside the adapters (biases, modules_to_save).
    A quantised base keeps the float model's paths, so the float model's maps name them."""
    from jtrain.models.hub import model_leaf_maps
    from jtrain.models.wrapper import innermost

    return [m for m in model_leaf_maps(innermost(model.base)) if model.is_trainable(("base",) + m.path)]


def _peft_base_name(model: LoraModel, m: convert.LeafMap, hf: str) -> str:
    """A trained base tensor's PEFT key: an adapted layer's own bias sits under `base_layer`."""
    targets = {t.path for t in model.targets}
    if m.path[-1] == "bias" and m.path[:-1] in targets:
        hf = hf[: -len(".bias")] + ".base_layer.bias"
    return PREFIX + hf


def adapter_state_dict(model: LoraModel, params: Any) -> dict[str, np.ndarray]:
    """PEFT-named host tensors of everything that trains (what `adapter_model.safetensors` holds)."""
    lora = traverse_util.flatten_dict(params["lora"])
    out: dict[str, np.ndarray] = {}
    for t in model.targets:
        a_all, b_all = _host(lora[t.path + ("lora_A",)]), _host(lora[t.path + ("lora_B",)])
        m_all = _host(lora[t.path + (MAGNITUDE,)]) if model.lora_config.use_dora else None
        for i, name in enumerate(t.layer_names):  # a scanned target: one PEFT module per layer
            a, b = _factors_to_peft(t, *((a_all[i], b_all[i]) if t.layers else (a_all, b_all)))
            out[f"{PREFIX}{name}.lora_A.weight"] = a
            out[f"{PREFIX}{name}.lora_B.weight"] = b
            if m_all is not None:  # DoRA: PEFT's [out] vector, the output dims flattened like the kernel's
                out[f"{PREFIX}{name}.{MAGNITUDE}"] = np.ascontiguousarray((m_all[i] if t.layers else m_all).reshape(-1))
    base = traverse_util.flatten_dict(params["base"])
    for m in _base_leaf_maps(model):
        for hf, tensor in convert.from_leaf(m, _host(base[m.path])):
            out[_peft_base_name(model, m, hf)] = tensor
    return out


def adapter_config(model: LoraModel, base_model_name_or_path: str | None = None) -> dict[str, Any]:
    model_type = getattr(model.config, "model_type", "")
    base_model_name_or_path = base_model_name_or_path or model.base_model_name_or_path
    out = model.lora_config.to_peft_dict(model_type, base_model_name_or_path, TASK_TYPES.get(model.task),
                                         fan_in_fan_out=model_type in _FAN_IN_FAN_OUT)
    if model.modules_to_save:
        out["modules_to_save"] = list(model.modules_to_save)
    return out


def save_adapter(model: LoraModel, params: Any, directory: str | os.PathLike, *,
                 base_model_name_or_path: str | None = None) -> list[str]:
    """Write `adapter_config.json` + `adapter_model.safetensors` that `peft.PeftModel.from_pretrained` loads.

    Every process calls it (sharded adapters are gathered); process 0 writes. Example::

        save_adapter(lora_model, params, "out/adapter", base_model_name_or_path="out/base")
    """
    if not isinstance(model, LoraModel):
        raise ConfigError("save_adapter needs a LoraModel (jtrain.peft.apply_lora)")
    directory = os.fspath(directory)
    tensors = adapter_state_dict(model, params)
    files = [os.path.join(directory, ADAPTER_CONFIG), os.path.join(directory, ADAPTER_WEIGHTS)]
    if jax.process_index() == 0:
        os.makedirs(directory, exist_ok=True)
        safetensors_io.write_file(files[1], tensors, {"format": "pt"})
        with open(files[0], "w") as fh:
            json.dump(adapter_config(model, base_model_name_or_path), fh, indent=2, sort_keys=True)
    return files


def save_merged(model: LoraModel, params: Any, directory: str | os.PathLike, **kwargs: Any) -> list[str]:
    """An HF checkpoint of the base with the adapters folded in (`merge_and_unload` + `save_pretrained`);
    a quantised base is written dequantised, with the adapters folded into the float weights."""
    from jtrain.models import save_pretrained

    return save_pretrained(*model.merged_export(params), directory, **kwargs)


def read_adapter_config(directory: str | os.PathLike) -> LoraConfig:
    path = os.path.join(os.fspath(directory), ADAPTER_CONFIG)
    if not os.path.isfile(path):
        raise CheckpointError(f"{directory}: no {ADAPTER_CONFIG} (not a PEFT adapter directory)")
    values = read_json_object(path, what="a PEFT adapter config", error=CheckpointError)
    if values.get("fan_in_fan_out") is None:
        values.pop("fan_in_fan_out", None)
    try:
        return LoraConfig.from_dict(values, source=path, strict=False)
    except ConfigError as err:
        raise CheckpointError(str(err)) from err


def load_adapter(base_model: Any, base_params: Any, directory: str | os.PathLike) -> tuple[LoraModel, dict]:
    """A PEFT adapter directory onto a jtrain base: `(LoraModel, params)` with params = base + adapters.

    Refuses (CheckpointError naming the module) an adapter whose modules or shapes do not match
    the base model. Example::

        lora_model, params = load_adapter(model, base_params, "peft-adapter/")
    """
    directory = os.fspath(directory)
    config = read_adapter_config(directory)
    try:
        model = apply_lora(base_model, config, strict=False)
    except ConfigError as err:
        raise CheckpointError(f"adapter {directory} does not fit this base model: {err}") from err
    weights = os.path.join(directory, ADAPTER_WEIGHTS)
    if not os.path.isfile(weights):
        raise CheckpointError(f"{directory}: no {ADAPTER_WEIGHTS} (jtrain reads adapters in safetensors only)")
    infos = safetensors_io.read_header(weights)
    used: set[str] = set()

    def take(key: str, shape: tuple[int, ...], module: str) -> np.ndarray:
        if key not in infos:
            raise CheckpointError(f"{weights}: no tensor {key!r} for module `{module}`; the adapter was made "
                                  "for another base model or other target_modules")
        got = tuple(infos[key].shape)
        if got != tuple(shape):
            raise CheckpointError(f"{weights}: `{key}` has shape {got} but module `{module}` of this base "
                                  f"model needs {tuple(shape)}; the adapter was made for another base model")
        used.add(key)
        return np.asarray(safetensors_io.read_tensor(infos[key]))

    flat = {}
    for t in model.targets:
        pairs = [_factors_from_peft(t, take(f"{PREFIX}{name}.lora_A.weight", (t.r, t.fan_in), name),
                                    take(f"{PREFIX}{name}.lora_B.weight", (t.fan_out, t.r), name))
                 for name in t.layer_names]
        a, b = (np.stack(x) for x in zip(*pairs)) if t.layers else pairs[0]
        flat[t.path + ("lora_A",)], flat[t.path + ("lora_B",)] = a, b
        if config.use_dora:
            mags = [take(f"{PREFIX}{name}.{MAGNITUDE}", (t.fan_out,), name).reshape(t.out_shape)
                    for name in t.layer_names]
            flat[t.path + (MAGNITUDE,)] = np.stack(mags) if t.layers else mags[0]
    base_flat = dict(traverse_util.flatten_dict(base_params))
    for m in _base_leaf_maps(model):
        names = [_peft_base_name(model, m, hf) for hf in m.hf_names]
        if not all(n in infos for n in names):
            continue  # PEFT saves only what it trained; an absent head/bias keeps the base value
        leaf = convert.to_leaf(m, [take(n, m.hf_shape, module_name(m.path[:-1])) for n in names])
        base_flat[m.path] = leaf.astype(np.dtype(base_flat[m.path].dtype))
    extra = sorted(set(infos) - used)
    if extra:
        raise CheckpointError(f"{weights}: tensors this base model has no place for: {', '.join(extra[:5])}"
                              f"{' ...' if len(extra) > 5 else ''}; the adapter was made for another base model")
    lora = jax.tree.map(lambda x: x.astype(np.float32), traverse_util.unflatten_dict(flat))
    return model, {"base": traverse_util.unflatten_dict(base_flat), "lora": lora}
