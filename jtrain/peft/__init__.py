"""Parameter-efficient fine-tuning: LoRA as a params-tree transform, with HF PEFT's file format.

`apply_lora(model, LoraConfig(...))` wraps any jtrain Model; `save_adapter` / `load_adapter`
read and write PEFT's `adapter_config.json` + `adapter_model.safetensors`.
"""

from jtrain.peft.config import DEFAULT_TARGET_MODULES, LoraConfig, matches_target
from jtrain.peft.lora import LoraModel, LoraTarget, adapter_param_count, apply_lora
from jtrain.peft.peft_io import load_adapter, save_adapter, save_merged

__all__ = ["DEFAULT_TARGET_MODULES", "LoraConfig", "LoraModel", "LoraTarget", "adapter_param_count",
           "apply_lora", "load_adapter", "matches_target", "save_adapter", "save_merged"]
