"""The sharding presets, written out: tests/golden/partition_specs.json must match the rules.

A diff here is either a bug or a deliberate change to the rules or to the model's logical axes;
for the latter, regenerate with `python scripts/gen_partition_golden.py` and review the JSON diff.
"""

from __future__ import annotations

import json
import os

from jax.sharding import PartitionSpec as P

from jtrain.models import create_model
from jtrain.sharding import DEFAULT_RULES, PRESETS, partition_table

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "partition_specs.json")


def _golden() -> dict:
    with open(GOLDEN) as fh:
        return json.load(fh)


def test_presets_reproduce_the_golden_partition_specs():
    golden = _golden()
    logical = create_model(golden["model"]["model_type"], golden["model"]["config"]).logical_axes()
    for name, rules in PRESETS.items():
        expected = golden["presets"][name or "(default)"]
        got = partition_table(logical, rules)
        changed = sorted(p for p in set(expected) | set(got) if expected.get(p) != got.get(p))
        assert not changed, f"preset {name or '(default)'!r} differs from the golden table at {changed[:5]}"
    assert set(golden["presets"]) == {n or "(default)" for n in PRESETS}


def test_golden_shows_what_each_preset_means():
    presets = _golden()["presets"]
    q = "model/layers_0/self_attn/q_proj/kernel"  # (embed, heads, head_dim)
    assert presets["full_shard"][q] == {"params": ["fsdp", "tensor", None], "opt_state": ["fsdp", "tensor", None]}
    assert presets["shard_grad_op"][q] == {"params": [None, "tensor", None], "opt_state": ["fsdp", "tensor", None]}
    assert presets["hybrid_shard"] == presets["full_shard"]  # hybrid differs in the mesh, not the rules
    assert presets["full_shard"]["model/norm/scale"]["params"] == [None]


def test_every_logical_axis_of_the_model_has_a_rule():
    """A new logical name must be placed deliberately, not replicated because nobody wrote a rule."""
    import jax

    golden = _golden()
    logical = create_model(golden["model"]["model_type"], golden["model"]["config"]).logical_axes()
    names = {n for spec in jax.tree.leaves(logical, is_leaf=lambda x: isinstance(x, P)) for n in spec}
    assert names <= {name for name, _ in DEFAULT_RULES}
