"""TensorRT optimization profiles for a decoder graph: ``prefill`` and ``decode``.

A profile gives min/opt/max for three independent quantities, batch, new tokens (``seq``) and
cached tokens (``past``); ``total`` = past + seq follows from them. A static-cache graph
(``--kv-cache static``) has no past dimension: its cache tensors are
``[batch, kv_heads, max_cache_length, head_dim]``, and ``max_cache_length`` is one fixed length
chosen at build time (``cache``), the same in every profile. ``profile_shapes`` turns a
profile plus the graph's inputs (their dims written as ints or symbolic names) into per-input
(min, opt, max) shapes for ``IOptimizationProfile.set_shape``.

TensorRT accepts 0 in a profile dimension: ``past`` min 0 (prefill with an empty cache) builds,
Concat with an empty past tensor included (measured on TensorRT-RTX 1.7).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import onnx

from llmtrt.exporter.kv_cache import Profile, Range, get_layout
from llmtrt.pipelines.errors import LlmtrtUserError

# Symbolic dim names (ONNX Runtime GenAI spelling first) -> profile quantity.
DIM_ALIASES: dict[str, str] = {
    "batch": "batch", "batch_size": "batch",
    "sequence_length": "seq", "seq": "seq", "seq_len": "seq",
    "past_sequence_length": "past", "past": "past", "past_seq_len": "past",
    "total_sequence_length": "total", "total": "total", "total_seq_len": "total",
    "max_cache_length": "cache",
}

Shape = tuple[int, ...]


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


def static_profiles(max_batch: int, max_prompt: int, cache_length: int, *, opt_batch: int | None = None,
                    opt_prompt: int | None = None) -> tuple[Profile, Profile]:
    """(prefill, decode) for a static cache of ``cache_length`` slots: seq 1..max_prompt, then seq 1."""
    batch = Range(1, opt_batch or max_batch, max_batch)
    return (Profile("prefill", batch, Range(1, opt_prompt or max_prompt, max_prompt), cache=cache_length),
            Profile("decode", batch, Range(1, 1, 1), cache=cache_length))


def default_profiles(max_batch: int, max_prompt: int, max_positions: int,
                     kv_cache: str = "dynamic") -> tuple[Profile, Profile]:
    """(prefill, decode) covering every context up to ``max_positions`` tokens."""
    layout = get_layout(kv_cache)
    return layout.default_profiles(max_batch, max_prompt, max_positions if layout.fixed_capacity else max_positions - 1)


def validate_profile(profile: Profile, max_positions: int | None = None) -> None:
    """Raise a user error unless every range is ordered and past + seq (or the static cache) fits
    ``max_positions``."""
    if profile.cache is not None:
        _validate_static(profile, max_positions)
    lower = {"batch": 1, "seq": 1, "past": 0}
    checked = [("batch", profile.batch), ("seq", profile.seq)]
    if profile.past is not None:
        checked.append(("past", profile.past))
    for key, rng in checked:
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
            "lower --max-kv / --max-prompt or export with a larger --max-positions")


def _validate_static(profile: Profile, max_positions: int | None) -> None:
    cache = profile.cache
    if cache is None or cache < 1:
        raise LlmtrtUserError(f"profile {profile.name!r}: max_cache_length must be >= 1, got {cache}")
    if profile.seq.max > cache:
        raise LlmtrtUserError(
            f"profile {profile.name!r}: seq max ({profile.seq.max}) exceeds max_cache_length ({cache}); "
            "a prompt must fit the static cache: lower --max-prompt or raise --max-kv")
    if max_positions is not None and cache > max_positions:
        raise LlmtrtUserError(
            f"profile {profile.name!r}: max_cache_length {cache} exceeds the model's max positions "
            f"({max_positions}, the rotary table length); lower --max-kv or export with a larger --max-positions")


def validate_profiles(profiles: Sequence[Profile], max_positions: int | None = None) -> None:
    """Validate each profile and that there is at least one, with unique names, all with the same
    cache layout (and, for a static cache, the same fixed length: it is one tensor shape)."""
    if not profiles:
        raise LlmtrtUserError("at least one optimization profile is needed (prefill and/or decode)")
    names = [p.name for p in profiles]
    if len(set(names)) != len(names):
        raise LlmtrtUserError(f"optimization profile names must be unique, got {names}")
    caches = {p.cache for p in profiles}
    if len(caches) > 1:
        raise LlmtrtUserError(
            "every profile must use the same cache: " + ", ".join(
                f"{p.name}: " + (f"static max_cache_length {p.cache}" if p.cache is not None else "dynamic past")
                for p in profiles))
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
            if key not in ranges:
                want, have = ("a static cache (max_cache_length)", "dynamic (past)") if key == "cache" else \
                             ("a growing cache (past)", "static (max_cache_length)")
                raise LlmtrtUserError(
                    f"input {name!r} axis {axis} ({dim}) belongs to {want}, but profile {profile.name!r} is "
                    f"{have}; build profiles for the graph's kv_cache layout")
            per_axis.append(ranges[key].as_tuple())
        out[name] = tuple(tuple(r[i] for r in per_axis) for i in range(3))  # type: ignore[assignment]
    return out


@dataclass(frozen=True)
class EngineProfile:
    """One TensorRT optimization profile: the profiles it serves and per-input (min, opt, max) shapes."""

    members: tuple[Profile, ...]
    shapes: dict[str, tuple[Shape, Shape, Shape]]

    @property
    def name(self) -> str:
        return "+".join(p.name for p in self.members)

    def to_dict(self, inputs: Collection[str]) -> dict[str, Any]:
        """The manifest entry: the profile's own fields (or, merged, the union of its members' ranges and
        the members under ``covers``) plus ``shapes`` of the network inputs in ``inputs``."""
        shapes = {k: {"min": list(v[0]), "opt": list(v[1]), "max": list(v[2])}
                  for k, v in self.shapes.items() if k in inputs}
        if len(self.members) == 1:
            return {**self.members[0].to_dict(), "shapes": shapes}
        ranges = [p.ranges() for p in self.members]
        union = {key: {"min": min(r[key].min for r in ranges), "opt": ranges[-1][key].opt,
                       "max": max(r[key].max for r in ranges)} for key in ranges[0]}
        if "cache" in union:
            union = {k: v for k, v in union.items() if k != "cache"} | {"max_cache_length": self.members[0].cache}
        return {"name": self.name, "kv_cache": self.members[0].layout, **union,
                "covers": [p.to_dict() for p in self.members], "shapes": shapes}


def engine_profiles(profiles: Sequence[Profile], inputs: Mapping[str, Sequence[int | str]], *,
                    merge: bool) -> list[EngineProfile]:
    """The optimization profiles to build: one per profile, or (``merge``) one covering them all.

    A merged profile takes, per input, the smallest min and the largest max of the profiles'
    shapes and the last profile's opt (decode: the step that runs most often). Every shape a member
    accepts is accepted, and no input is stretched beyond what some member allows, so the attention
    mask never exceeds the model's positions. TensorRT-RTX stores the weights once per optimization
    profile, so merging halves a prefill + decode plan (``Backend.weights_per_profile``).
    """
    shapes = [profile_shapes(p, inputs) for p in profiles]
    if not merge or len(profiles) < 2:
        return [EngineProfile((p,), s) for p, s in zip(profiles, shapes, strict=True)]
    union: dict[str, tuple[Shape, Shape, Shape]] = {}
    for name in shapes[0]:
        lows, _, highs = zip(*(s[name] for s in shapes), strict=True)
        union[name] = (tuple(map(min, zip(*lows, strict=True))), shapes[-1][name][1],
                       tuple(map(max, zip(*highs, strict=True))))
    return [EngineProfile(tuple(profiles), union)]


def max_positions_from_model(model: onnx.ModelProto) -> int | None:
    """Positions the graph can address: ``max_position_embeddings`` from its metadata_props, else the
    length of its rotary cos table (the exporter's ``rope_cos`` initializer, [max_positions, D/2])."""
    return _max_positions({p.key: p.value for p in model.metadata_props},
                          {t.name: tuple(t.dims) for t in model.graph.initializer if t.name == "rope_cos"})


def max_positions_from_file(onnx_path: str | Path) -> int | None:
    """max_positions_from_model for a file, reading neither its weights nor, for a graph that carries
    them inline, the graph (its protobuf fields are walked with seeks: milliseconds for 600 MB)."""
    from llmtrt.exporter.onnx_layout import scan

    layout = scan(onnx_path)
    return _max_positions(layout.metadata, layout.dims)


def _max_positions(metadata: Mapping[str, str], dims: Mapping[str, tuple[int, ...]]) -> int | None:
    for key in ("max_position_embeddings", "max_positions"):
        if key in metadata:
            try:
                return int(metadata[key])
            except ValueError:
                return None
    cos = dims.get("rope_cos")
    return int(cos[0]) if cos is not None and len(cos) == 2 else None


# --------------------------------------------------------------------------------------------
# --profiles YAML
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RangeSpec:
    min: int
    opt: int
    max: int


def _range(value: int | list[int] | RangeSpec, key: str) -> Range:
    """``4`` (fixed), ``[min, opt, max]`` or ``{min:, opt:, max:}`` -> Range."""
    if isinstance(value, int):
        return Range(value, value, value)
    if isinstance(value, list):
        if len(value) != 3:
            raise LlmtrtUserError(f"{key}: expected an integer, [min, opt, max] or {{min, opt, max}}, got {value}")
        return Range(*value)
    return Range(value.min, value.opt, value.max)


@dataclass(frozen=True)
class ProfileSpec:
    """One profile of a --profiles YAML; each range is N, [min, opt, max] or {min:, opt:, max:}."""

    batch: int | list[int] | RangeSpec
    seq: int | list[int] | RangeSpec
    past: int | list[int] | RangeSpec | None = None

    def ranges(self) -> dict[str, Range | None]:
        out = {key: _range(getattr(self, key), key) for key in ("batch", "seq")}
        out["past"] = None if self.past is None else _range(self.past, "past")
        for key, rng in out.items():
            if rng is not None and not rng.min <= rng.opt <= rng.max:
                raise LlmtrtUserError(f"{key} must satisfy min <= opt <= max, got min={rng.min} opt={rng.opt} "
                                      f"max={rng.max}")
        return out

    def __post_init__(self) -> None:
        self.ranges()


def profiles_from_yaml(path: str | Path, kv_cache: str = "dynamic") -> list[Profile]:
    """Profiles from a YAML file, in file order (read through the one YAML loader: errors at file:line).
    Dynamic cache::

        prefill: {batch: [1, 1, 4], seq: [1, 128, 512], past: 0}
        decode:  {batch: [1, 1, 4], seq: 1, past: [1, 512, 2047]}

    Static cache (``kv_cache: static`` graphs): a top-level ``max_cache_length: N`` and no ``past``.
    """
    from llmtrt.exporter.yaml_schema import load_typed

    raw = dict(load_typed(dict[str, ProfileSpec | int], path))
    cache = raw.pop("max_cache_length", None)
    fixed = get_layout(kv_cache).fixed_capacity
    if fixed and not isinstance(cache, int):
        raise LlmtrtUserError(f"--profiles {path}: the graph has a static KV cache; set max_cache_length: N "
                              "(the fixed cache length) at the top level")
    if not fixed and cache is not None:
        raise LlmtrtUserError(f"--profiles {path}: max_cache_length is for static-cache graphs; this graph's cache "
                              "grows (use past: [min, opt, max] in each profile)")
    profiles = []
    for name, spec in raw.items():
        if not isinstance(spec, ProfileSpec):
            raise LlmtrtUserError(f"--profiles {path}: {name}: expected a mapping with batch, seq"
                                  + ("" if fixed else ", past"))
        if (spec.past is None) != fixed:
            raise LlmtrtUserError(f"--profiles {path}: {name}: " + ("a static cache has no past (drop it)" if fixed
                                                                    else "missing key past (past: [min, opt, max])"))
        r = spec.ranges()
        profiles.append(Profile(name, r["batch"], r["seq"], r["past"], cache))
    if not profiles:
        raise LlmtrtUserError(f"--profiles {path}: no profiles; expected a mapping of profile name -> ranges")
    return profiles
