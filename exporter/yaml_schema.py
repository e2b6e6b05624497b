"""YAML into frozen dataclasses, with errors that name the file, line and key.

    cfg = load_dataclass(PipelineConfig, "configs/pipelines/demo.yaml")

Every YAML llmtrt reads goes through here: pipeline configs, model presets, tolerances,
thresholds, engine profiles. Field types come from the dataclass annotations: str, int, float, bool,
``X | None``, unions (the option matching the node: a scalar, a list or a mapping), ``list[X]``,
``tuple[X, ...]``, ``dict[str, X]`` and nested dataclasses. A field's ``metadata`` may hold
``choices`` (allowed values) and ``min``/``max`` (bounds). Unknown keys, missing required keys, wrong
types, bad choices and a dataclass's own ``__post_init__`` errors are LlmtrtUserErrors such as
``demo.yaml:7: calibration.samples: expected an integer, got 'many'``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from llmtrt.exporter.errors import LlmtrtUserError

T = TypeVar("T")
_SCALARS = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


class _Ctx:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, node: yaml.Node, key: str, message: str) -> typing.NoReturn:
        where = f"{self.source}:{node.start_mark.line + 1}"
        raise LlmtrtUserError(f"{where}: {key}: {message}" if key else f"{where}: {message}")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LlmtrtUserError(f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise LlmtrtUserError(f"{path}: not UTF-8 text") from None


def load_dataclass(cls: type[T], path: str | Path) -> T:
    """Parse ``path`` as YAML and build ``cls`` from it (see module docstring)."""
    path = Path(path)
    text = _read_text(path)
    return loads_dataclass(cls, text, str(path))


def load_typed(tp: Any, path: str | Path) -> Any:
    """Like :func:`load_dataclass` for any supported type (e.g. ``dict[str, Spec | int]``)."""
    path = Path(path)
    text = _read_text(path)
    node = _compose(text, str(path))
    if node is None:
        raise LlmtrtUserError(f"{path}: the file is empty")
    return _convert(tp, node, "", _Ctx(str(path)))


def _compose(text: str, source: str) -> yaml.Node | None:
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise LlmtrtUserError(f"{source}{line}: invalid YAML ({getattr(exc, 'problem', exc)})") from None


def loads_dataclass(cls: type[T], text: str, source: str = "<string>") -> T:
    node = _compose(text, source)
    if node is None:
        raise LlmtrtUserError(f"{source}: the file is empty; expected a mapping of {cls.__name__} fields")
    return _convert(cls, node, "", _Ctx(source))


_CONSTRUCTOR = yaml.SafeLoader("")


def _scalar(node: yaml.Node) -> Any:
    """The value safe_load would give this scalar (int, float, bool, null or str)."""
    return _CONSTRUCTOR.construct_object(node, deep=True)


def _kind(tp: Any) -> type:
    """The YAML node class a type is written as."""
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        return yaml.SequenceNode
    if origin is dict or dataclasses.is_dataclass(tp):
        return yaml.MappingNode
    return yaml.ScalarNode


def _convert(tp: Any, node: yaml.Node, key: str, ctx: _Ctx) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
            if len(options) != len(typing.get_args(tp)):
                return None
            ctx.fail(node, key, "must not be empty")
        matching = [o for o in options if isinstance(node, _kind(o))] or options
        return _convert(matching[0], node, key, ctx)
    if origin is dict:
        if not isinstance(node, yaml.MappingNode):
            ctx.fail(node, key, "expected a mapping")
        _, value_type = typing.get_args(tp)
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            name = str(_scalar(key_node))
            if name in out:
                ctx.fail(key_node, f"{key}.{name}", "given twice")
            out[name] = _convert(value_type, value_node, f"{key}.{name}" if key else name, ctx)
        return out
    if origin in (list, tuple):
        if not isinstance(node, yaml.SequenceNode):
            if isinstance(node, yaml.ScalarNode) and node.value != "":  # `precisions: fp16` means [fp16]
                node = yaml.SequenceNode("tag:yaml.org,2002:seq", [node], node.start_mark, node.end_mark)
            else:
                ctx.fail(node, key, "expected a list")
        (item,) = typing.get_args(tp)[:1]
        values = [_convert(item, child, f"{key}[{i}]", ctx) for i, child in enumerate(node.value)]
        return tuple(values) if origin is tuple else values
    if dataclasses.is_dataclass(tp):
        return _convert_dataclass(tp, node, key, ctx)
    if tp in _SCALARS:
        if not isinstance(node, yaml.ScalarNode):
            ctx.fail(node, key, f"expected {_SCALARS[tp]}")
        value = _scalar(node)
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if tp is float and isinstance(value, str) and node.style is None:
            try:  # YAML 1.1 reads 1e-4 (no dot) as a string; it is the number everyone means
                value = float(value)
            except ValueError:
                pass
        if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = node.value  # e.g. target_cc: 8.9 stays "8.9"
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            ctx.fail(node, key, f"expected {_SCALARS[tp]}, got {node.value!r}")
        return value
    raise TypeError(f"unsupported field type {tp!r}")  # a bug in the schema, not the user's file


def _check_bounds(meta: Any, value: Any, node: yaml.Node, key: str, ctx: _Ctx) -> None:
    for item in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            if "min" in meta and item < meta["min"]:
                ctx.fail(node, key, f"{item} is below the minimum {meta['min']}")
            if "max" in meta and item > meta["max"]:
                ctx.fail(node, key, f"{item} is above the maximum {meta['max']}")


def _convert_dataclass(cls: Any, node: yaml.Node, key: str, ctx: _Ctx) -> Any:
    prefix = f"{key}." if key else ""
    if not isinstance(node, yaml.MappingNode):
        ctx.fail(node, key, f"expected a mapping of {cls.__name__} fields")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    values: dict[str, Any] = {}
    where: dict[str, yaml.Node] = {}
    for key_node, value_node in node.value:
        name = key_node.value
        where[name] = key_node
        if name not in fields:
            ctx.fail(key_node, f"{prefix}{name}", f"unknown key; known keys: {', '.join(fields)}")
        if name in values:
            ctx.fail(key_node, f"{prefix}{name}", "given twice")
        value = _convert(hints[name], value_node, prefix + name, ctx)
        _check_bounds(fields[name].metadata, value, value_node, prefix + name, ctx)
        choices = fields[name].metadata.get("choices")
        if choices is not None:
            for item in value if isinstance(value, (list, tuple)) else [value]:
                if item is not None and item not in choices:
                    ctx.fail(value_node, prefix + name, f"{item!r} is not one of {', '.join(map(str, choices))}")
        values[name] = value
    missing = [n for n, f in fields.items() if n not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        ctx.fail(node, prefix + missing[0], "required key is missing")
    try:
        return cls(**values)
    except (LlmtrtUserError, ValueError) as exc:
        message = str(exc)
        named = next((n for n in where if message.startswith(n)), None)  # point at the field the error names
        if named is not None:
            raise LlmtrtUserError(f"{ctx.source}:{where[named].start_mark.line + 1}: {message}") from None
        ctx.fail(node, key, message)
