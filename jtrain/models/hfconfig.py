"""The part of every architecture's config that mirrors HF's `PretrainedConfig`.

Fields keep config.json names so a dict read from a checkpoint maps onto them directly; keys a
config does not model are kept in `extra` and written back on save, so a round trip loses
nothing. jtrain's execution options (compute dtype, attention path, remat, scan) live beside
them but never reach config.json.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, TypeVar

from jtrain.errors import ConfigError

JTRAIN_OPTIONS = ("dtype", "attention_impl", "sequence_parallel_attention", "remat_policy", "scan_layers",
                  "pipeline_stages", "pipeline_microbatches", "activation_sharding")
# Keys that save_pretrained writes itself, or that describe a checkpoint rather than a model.
_WRITTEN_BY_SAVE = ("architectures", "dtype", "torch_dtype", "transformers_version", "model_type",
                    "num_labels", "id2label", "label2id", "_name_or_path")

C = TypeVar("C", bound="HFConfig")


@dataclass(frozen=True)
class HFConfig:
    """Fields every jtrain config shares (labels and execution options)."""

    model_type: str = ""
    num_labels: int = 2
    id2label: dict | None = None
    problem_type: str | None = None
    pad_token_id: int | None = None
    # jtrain execution options (not part of HF's config.json).
    dtype: str = "float32"
    attention_impl: str = "auto"  # jtrain.models.attention.resolve_implementation
    # Attention under sequence parallelism: "all_gather" gathers keys and values to the whole length on
    # every device; "ring" passes their blocks round the devices (`jtrain.models.ring_attention`).
    # Without sequence parallelism it changes nothing.
    sequence_parallel_attention: str = "all_gather"
    remat_policy: str | None = None
    scan_layers: bool = False
    # Pipeline parallelism (`jtrain.pipeline_parallel`): set from the mesh's `stage` axis by
    # `jtrain.compiled`, never by hand; 1 = the plain layer stack. Needs `scan_layers`.
    pipeline_stages: int = 1
    # Micro-batches per pipelined forward (GPipe's M); None = 2 x stages. The bubble (idle share
    # of each stage) is (S - 1) / (M + S - 1); M must divide the rows of each step's micro-batch.
    pipeline_microbatches: int | None = None
    # A `jtrain.sharding.ActivationSharding` that pins activations (hidden states, q/k/v, MLP
    # units, logits) to the mesh; set by `jtrain.compiled` on a multi-device mesh, never by hand.
    # None leaves layouts to GSPMD propagation. See `jtrain.models.layers.constrain`.
    activation_sharding: Any = None
    extra: dict = field(default_factory=dict)

    # Fields a given model_type does not have in HF (so they are not written for it).
    HF_OMIT: ClassVar[Mapping[str, tuple[str, ...]]] = {}
    # Defaults that differ by model_type (e.g. RoBERTa's pad id), applied before config.json values.
    TYPE_DEFAULTS: ClassVar[Mapping[str, Mapping[str, Any]]] = {}

    @classmethod
    def from_dict(cls: type[C], values: Mapping[str, Any]) -> C:
        """Build from an HF config.json dict; unknown keys go to `extra`, labels are normalised."""
        values = {**cls.TYPE_DEFAULTS.get(values.get("model_type", ""), {}), **dict(values)}
        num_labels, id2label = _labels(values)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "num_labels", "id2label"}
        known = {k: v for k, v in values.items() if k in names}
        extra = {k: v for k, v in values.items() if k not in names and k not in _WRITTEN_BY_SAVE}
        try:
            return cls(**known, num_labels=num_labels, id2label=id2label, extra=extra)
        except TypeError as e:  # pragma: no cover - dataclass rejects nothing we filtered in
            raise ConfigError(f"invalid {cls.__name__} values: {e}") from e

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json fields (without `architectures`/`dtype`, which save_pretrained adds)."""
        skip = set(JTRAIN_OPTIONS) | {"extra", "num_labels", "id2label"} | set(self.HF_OMIT.get(self.model_type, ()))
        out: dict[str, Any] = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name not in skip:
                value = getattr(self, f.name)
                out[f.name] = list(value) if isinstance(value, tuple) else value
        labels = self.id2label or {i: f"LABEL_{i}" for i in range(self.num_labels)}
        out["id2label"] = {str(i): name for i, name in labels.items()}
        out["label2id"] = {name: int(i) for i, name in labels.items()}
        return out


def _labels(values: Mapping[str, Any]) -> tuple[int, dict | None]:
    """HF derives `num_labels` from `id2label` when present (2 when neither is given)."""
    id2label = values.get("id2label")
    if id2label:
        try:
            id2label = {int(k): v for k, v in id2label.items()}
        except (AttributeError, ValueError) as e:
            raise ConfigError(f"`id2label` must map integer ids to names, got {id2label!r}") from e
        n = values.get("num_labels")
        if n is not None and int(n) != len(id2label):
            raise ConfigError(f"`num_labels`={n} disagrees with `id2label` of {len(id2label)} entries")
        return len(id2label), id2label
    return int(values.get("num_labels") or 2), None
