"""Which parameters get weight decay: HF's rule, restated for Flax path names.

HF (`Trainer.get_decay_parameter_names`, transformers 5.x) decays every parameter except
(a) those inside an `nn.LayerNorm` module and (b) those whose lower-cased dotted name
matches `bias`, `layernorm`, `rmsnorm`, `(^|.)norm($|.)` or `_norm($|.)`.

Flax has no module types in the params tree, so (a) becomes a name rule: Flax norm layers
(LayerNorm, RMSNorm, GroupNorm) call their weight `scale`, and GPT-2 style trees name
their LayerNorms `ln_1`, `ln_2`, `ln_f`. Embeddings and LoRA factors are decayed, as in HF.
"""
from __future__ import annotations

import re
from typing import Any

from jtrain.optim.paths import map_with_names

# HF's forbidden name patterns, verbatim in meaning (searched in the lower-cased name).
_HF_NO_DECAY = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")
# Stand-ins for HF's `isinstance(module, nn.LayerNorm)` test (see module docstring).
_NORM_MODULE = (r"(?:^|\.)scale$", r"(?:^|\.)ln(?:_[a-z0-9]+)?\.")
_NO_DECAY_RE = re.compile("|".join(_HF_NO_DECAY + _NORM_MODULE))


def decays(name: str) -> bool:
    """True when the parameter called `name` (dotted or '/'-joined) gets weight decay."""
    return _NO_DECAY_RE.search(name.replace("/", ".").lower()) is None


def decay_mask(params: Any) -> Any:
    """Pytree of bools shaped like `params`: True where weight decay applies.

    Example:
        >>> decay_mask({'dense': {'kernel': 0.0, 'bias': 0.0}, 'ln_f': {'scale': 0.0}})
        {'dense': {'bias': False, 'kernel': True}, 'ln_f': {'scale': False}}
    """
    return map_with_names(lambda name, _: decays(name), params)
