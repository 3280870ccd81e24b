"""Write tests/golden/partition_specs.json: param path -> PartitionSpec per `fsdp` preset.

The table is the sharding rules applied to the tiny test Llama (tests/tiny.py). Regenerate it
after a deliberate change to the rules or the model's logical axes, and review the diff:

    python scripts/gen_partition_golden.py
"""

from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "golden", "partition_specs.json")


def golden_table() -> dict:
    """The whole golden document: the model it describes and one table per preset."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from tiny import TINY_LLAMA

    from jtrain.models import create_model
    from jtrain.sharding import PRESETS, partition_table

    logical = create_model("llama", TINY_LLAMA).logical_axes()
    return {
        "about": "jtrain.sharding presets applied to the tiny Llama of tests/tiny.py; "
                 "regenerate with `python scripts/gen_partition_golden.py` and review the diff",
        "model": {"model_type": "llama", "config": TINY_LLAMA},
        "presets": {name or "(default)": partition_table(logical, rules) for name, rules in PRESETS.items()},
    }


def main() -> None:
    os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
    with open(GOLDEN, "w") as fh:
        json.dump(golden_table(), fh, indent=1, sort_keys=True)
        fh.write("\n")
    print(f"wrote {GOLDEN}")


if __name__ == "__main__":
    main()
