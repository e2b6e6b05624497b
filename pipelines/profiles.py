"""TensorRT optimization profiles for a decoder graph: ``prefill`` and ``decode``.

A profile gives min/opt/max for three independent quantities, batch, new tokens (``seq``) and
cached tokens (``past``); ``total`` = past + seq follows from them. ``profile_shapes`` turns a
profile plus the graph's inputs (their dims written as ints or symbolic names) into per-input
(min, opt, max) shapes for ``IOptimizationProfile.set_shape``.

TensorRT accepts 0 in a profile dimension: ``past`` min 0 (prefill with an empty cache) builds,
Concat with an empty past tensor included (measured on TensorRT-RTX 1.7).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import onnx

from pipelines.errors import LlmtrtUserError

# Symbolic dim names (ONNX Runtime GenAI spelling first) -> profile quantity.
DIM_ALIASES: dict[str, str] = {
    "batch": "batch", "batch_size": "batch",
    "sequence_length": "seq", "seq": "seq", "seq_len": "seq",
    "past_sequence_length": "past", "past": "past", "past_seq_len": "past",
    "total_sequence_length": "total", "total": "total", "total_seq_len": "total",
}

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Range:
    """min <= opt <= max for one dimension."""

    min: int
    opt: int
    max: int

    def as_tuple(self) -> tuple[int, int, int]:
        return (self.min, self.opt, self.max)

    def __add__(self, other: Range) -> Range:
        return Range(self.min + other.min, self.opt + other.opt, self.max + other.max)


@dataclass(frozen=True)
class Profile:
    """One optimization profile: ranges for batch, new tokens (seq) and cached tokens (past)."""

    name: str
    batch: Range
    seq: Range
    past: Range

    @property
    def total(self) -> Range:
        return self.past + self.seq

    def ranges(self) -> dict[str, Range]:
        return {"batch": self.batch, "seq": self.seq, "past": self.past, "total": self.total}

    def to_dict(self) -> dict:
        return {"name": self.name, **{k: asdict(v) for k, v in self.ranges().items()}}


def prefill_profile(max_batch: int, max_prompt: int, *, opt_batch: int | None = None,
                    opt_prompt: int | None = None, min_prompt: int = 1) -> Profile:
    """Prompt processing with an empty cache: past is 0..0."""
    return Profile("prefill", Range(1, opt_batch or max_batch, max_batch),
                   Range(min_prompt, opt_prompt or max_prompt, max_prompt), Range(0, 0, 0))


def decode_profile(max_batch: int, max_kv: int, *, opt_batch: int | None = None,
                   opt_past: int | None = None) -> Profile:
    """One new token per step against up to ``max_kv`` cached tokens (past 1..max_kv)."""
    return Profile("decode", Range(1, opt_batch or max_batch, max_batch), Range(1, 1, 1),
                   Range(1, opt_past or max(1, max_kv // 2), max_kv))


def default_profiles(max_batch: int, max_prompt: int, max_positions: int) -> tuple[Profile, Profile]:
    """(prefill, decode) covering every context up to ``max_positions`` tokens."""
    return (prefill_profile(max_batch, max_prompt),
            decode_profile(max_batch, max_positions - 1))


def validate_profile(profile: Profile, max_positions: int | None = None) -> None:
    """Raise a user error unless every range is ordered and past + seq fits ``max_positions``."""
    lower = {"batch": 1, "seq": 1, "past": 0}
    for key, rng in (("batch", profile.batch), ("seq", profile.seq), ("past", profile.past)):
        if not rng.min <= rng.opt <= rng.max:
            raise LlmtrtUserError(
                f"profile {profile.name!r}: {key} must satisfy min <= opt <= max, got "
                f"min={rng.min} opt={rng.opt} max={rng.max}")
        if rng.min < lower[key]:
            raise LlmtrtUserError(f"profile {profile.name!r}: {key} min must be >= {lower[key]}, got {rng.min}")
    if max_positions is not None and profile.total.max > max_positions:
        raise LlmtrtUserError(
            f"profile {profile.name!r}: past max ({profile.past.max}) + seq max ({profile.seq.max}) = "
            f"{profile.total.max} exceeds the model's max_position_embeddings ({max_positions}); "
            "lower --max-kv / --max-prompt or export with a larger --max-seq")


def validate_profiles(profiles: Sequence[Profile], max_positions: int | None = None) -> None:
    """Validate each profile and that there is at least one with unique names."""
    if not profiles:
        raise LlmtrtUserError("at least one optimization profile is needed (prefill and/or decode)")
    names = [p.name for p in profiles]
    if len(set(names)) != len(names):
        raise LlmtrtUserError(f"optimization profile names must be unique, got {names}")
    for profile in profiles:
        validate_profile(profile, max_positions)


def graph_input_dims(model: onnx.ModelProto) -> dict[str, tuple[int | str, ...]]:
    """Graph inputs (not initializers) -> dims, each an int or a symbolic name ('?' if unnamed)."""
    inits = {i.name for i in model.graph.initializer}
    dims: dict[str, tuple[int | str, ...]] = {}
    for value in model.graph.input:
        if value.name in inits:
            continue
        shape = value.type.tensor_type.shape
        dims[value.name] = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in shape.dim)
    return dims


def profile_shapes(profile: Profile, inputs: Mapping[str, Sequence[int | str]],
                   aliases: Mapping[str, str] = DIM_ALIASES) -> dict[str, tuple[Shape, Shape, Shape]]:
    """Per-input (min, opt, max) shapes; static dims are copied, symbolic ones come from the profile."""
    ranges = profile.ranges()
    out: dict[str, tuple[Shape, Shape, Shape]] = {}
    for name, dims in inputs.items():
        per_axis: list[tuple[int, int, int]] = []
        for axis, dim in enumerate(dims):
            if isinstance(dim, int) and dim > 0:
                per_axis.append((dim, dim, dim))
                continue
            key = aliases.get(str(dim))
            if key is None:
                raise LlmtrtUserError(
                    f"input {name!r} axis {axis} has dynamic dim {dim!r}, which no profile range covers; "
                    f"name it one of {sorted(set(aliases))} in the ONNX graph")
            per_axis.append(ranges[key].as_tuple())
        out[name] = tuple(tuple(r[i] for r in per_axis) for i in range(3))  # type: ignore[assignment]
    return out


def max_positions_from_model(model: onnx.ModelProto) -> int | None:
    """``max_position_embeddings`` from the model's metadata_props, if the exporter wrote it."""
    for prop in model.metadata_props:
        if prop.key in ("max_position_embeddings", "max_positions"):
            try:
                return int(prop.value)
            except ValueError:
                return None
    return None
