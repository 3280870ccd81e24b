"""Adapter files inside each checkpoint, as HF's Trainer leaves them in a PEFT run's checkpoints.

`checkpoint-N/` keeps jtrain's own state (orbax: adapters, frozen base, optimizer) for exact
resume; this callback adds `adapter_config.json` + `adapter_model.safetensors` beside it, so any
checkpoint can be loaded by `peft.PeftModel.from_pretrained` without jtrain. The adapters are small
and written synchronously at `on_save`, before the next step can donate the state.
"""

from __future__ import annotations

import os
from typing import Any

from jtrain.callbacks import TrainerCallback
from jtrain.checkpoint import PREFIX


class PeftCheckpointCallback(TrainerCallback):
    """Writes the adapters into every checkpoint of a LoRA run.

    Example::

        trainer.add_callback(PeftCheckpointCallback(trainer))
    """

    def __init__(self, trainer: Any, base_model_name_or_path: str | None = None):
        self.trainer = trainer
        self.base_model_name_or_path = base_model_name_or_path

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        from jtrain.peft.lora import LoraModel
        from jtrain.peft.peft_io import save_adapter

        t = self.trainer
        if not isinstance(t.model, LoraModel) or t.train_state is None:
            return
        path = os.path.join(os.path.abspath(args.output_dir), f"{PREFIX}-{state.global_step}")
        save_adapter(t.model, t.train_state.full_params(), path,
                     base_model_name_or_path=self.base_model_name_or_path or t.model.base_model_name_or_path)
