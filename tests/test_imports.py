"""`import jtrain` and a training run need only the JAX stack.

A GPU machine may hold JAX, flax, optax and orbax and nothing else (no `tokenizers`, no PyTorch
stack, no `datasets`): training on arrays that are already tokens, as `benchmarks/gpu_1b.py`
does, must work there. The text pipeline imports `tokenizers` when it makes or loads one.
"""

from __future__ import annotations

import subprocess
import sys

NOT_JAX = ("tokenizers", "transformers", "torch", "datasets", "peft", "accelerate", "pandas", "pyarrow")

CODE = f"""
import sys
for name in {NOT_JAX!r}:
    sys.modules[name] = None  # any import of these raises ImportError
import tempfile
import numpy as np
from jtrain import Trainer, TrainingArguments, create_model
from jtrain.data.loader import ArrayDataset

ids = np.random.default_rng(0).integers(1, 64, size=(16, 16)).astype(np.int32)
model = create_model("llama", dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
with tempfile.TemporaryDirectory() as out:
    args = TrainingArguments(output_dir=out, max_steps=2, per_device_train_batch_size=8, save_strategy="no",
                             report_to=["none"], disable_tqdm=True)
    result = Trainer(model, args, train_dataset=ArrayDataset({{"input_ids": ids, "labels": ids}})).train()
print("trained", result.training_loss)
"""


def test_training_on_token_arrays_needs_only_the_jax_stack():
    proc = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trained" in proc.stdout
