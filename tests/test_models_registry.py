"""The registry: every model type x head builds, names its HF class, and tags every weight axis.

Shapes only (`jax.eval_shape`), nothing is compiled, so these run in a moment.
"""

from __future__ import annotations

import pytest
from jax.sharding import PartitionSpec as P

from jtrain.models import SUPPORTED_MODEL_TYPES, architecture, config_to_hf_dict, create_model
from jtrain.models.registry import task_from_architectures
from test_models_common import TINY

PAIRS = [(t, task) for t in SUPPORTED_MODEL_TYPES for task in architecture(t).heads]
KNOWN_AXES = {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "norm", "layers", "positions",
              "token_types", "labels", "embed_out", "qkv", "expert", "router"}


# Every head unscanned; scanning changes only the body, so one head per type covers it.
LAYOUTS = [(t, k, False) for t, k in PAIRS] + [(t, architecture(t).default_task, True) for t in SUPPORTED_MODEL_TYPES]


@pytest.mark.parametrize("model_type,task,scan", LAYOUTS, ids=[f"{t}-{k}-{'scan' if s else 'loop'}"
                                                               for t, k, s in LAYOUTS])
def test_every_weight_axis_has_a_logical_name(model_type, task, scan):
    model = create_model(model_type, TINY[model_type], task, scan_layers=scan)
    flat_specs = dict(_leaves(model.logical_axes()))
    for path, leaf in _leaves(model.abstract_params()):
        spec = flat_specs[path]
        assert len(spec) == len(leaf.shape) and set(spec) <= KNOWN_AXES, (path, spec, leaf.shape)
        assert (spec[0] == "layers") == (scan and any(p in ("layers", "h", "layer") for p in path[:-2])), path
    name = config_to_hf_dict(model)["architectures"][0]
    assert task_from_architectures([name]) == task


def _leaves(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _leaves(v, prefix + (k,))
        else:
            yield prefix + (k,), v if not isinstance(v, P) else tuple(v)


def test_task_from_bare_or_pretraining_architectures():
    assert task_from_architectures(["BertModel"]) is None
    assert task_from_architectures(["BertForPreTraining"]) == "masked_lm"
    assert task_from_architectures(["GPT2LMHeadModel"]) == "causal_lm"
