#!/usr/bin/env python
"""HF's `run_mlm.py` arguments on jtrain: translated onto `python -m jtrain.run --data.task mlm`.

Example (no download; a local model directory and local files)::

    python scripts/run_mlm.py --model_name_or_path ./my-model --train_file train.jsonl \\
        --validation_file dev.jsonl --do_train --do_eval --output_dir out --learning_rate 3e-4

See `--help` for the argument mapping; the translation lives in `jtrain.tasks.hf_args`.
"""

import sys

from jtrain.tasks.hf_args import main

if __name__ == "__main__":
    sys.exit(main("mlm", "mlm"))
