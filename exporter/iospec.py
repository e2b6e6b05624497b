"""The graph's inputs and outputs, named as ONNX Runtime GenAI names them.

inputs:  input_ids [batch, sequence_length] int64, position_ids [batch, sequence_length] int64,
         attention_mask [batch, total_sequence_length] int64,
         past_key_values.{i}.key|value [batch, kv_heads, past_sequence_length, head_dim]
outputs: logits [batch, sequence_length, vocab] float32 ([batch, 1, vocab] when exported with --logits last),
         present.{i}.key|value [batch, kv_heads, total_sequence_length, head_dim]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx

BATCH, SEQ, PAST, TOTAL = "batch", "sequence_length", "past_sequence_length", "total_sequence_length"
MAX_CACHE = "max_cache_length"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy name: "int64", "float32", "float16"
    dims: tuple[str | int, ...]


@dataclass(frozen=True)
class IOSpec:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def cache_inputs(self) -> list[str]:
        return [t.name for t in self.inputs if t.name.startswith("past_key_values.")]

    @property
    def cache_outputs(self) -> list[str]:
        return [t.name for t in self.outputs if t.name.startswith("present.")]

    def to_dict(self) -> dict:
        return {"inputs": [asdict(t) for t in self.inputs], "outputs": [asdict(t) for t in self.outputs]}

    @classmethod
    def from_dict(cls, raw: dict) -> IOSpec:
        def specs(items):
            return tuple(TensorSpec(t["name"], t["dtype"], tuple(t["dims"])) for t in items)
        return cls(specs(raw["inputs"]), specs(raw["outputs"]))

    def apply_dim_names(self, proto: onnx.ModelProto) -> None:
        """Give the graph's IO the symbolic dim names of this spec (the exporter writes e.g. 's0 + s1')."""
        by_name = {t.name: t for t in (*self.inputs, *self.outputs)}
        for value in (*proto.graph.input, *proto.graph.output):
            spec = by_name.get(value.name)
            if spec is None:
                continue
            dims = value.type.tensor_type.shape.dim
            for dim, want in zip(dims, spec.dims, strict=False):
                if isinstance(want, str):
                    dim.dim_param = want
                else:
                    dim.dim_value = want
