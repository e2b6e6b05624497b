"""Where things sit inside a serialized ONNX file, read by walking its protobuf fields with seeks
(nothing large is read): the model's metadata_props, each initializer's dims, and the byte span of
each initializer's inline ``raw_data``; and the graph without those bytes (``weightless_model``).

An export written without external data (models under protobuf's 2 GB limit) carries its weights
inline. ``weightless_model`` copies every protobuf field of the file except those raw_data fields,
which become external data whose "file" is the ONNX file itself, at the offsets found here: the
build checks and lowers the graph without ever holding the weights, and TensorRT's parser maps
those bytes like any other external-data file.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    import onnx

# protobuf field numbers (onnx.proto)
_MODEL_GRAPH, _MODEL_METADATA = 7, 14
_GRAPH_INITIALIZER = 5
_TENSOR_DIMS, _TENSOR_NAME, _TENSOR_RAW_DATA = 1, 8, 9
_ENTRY_KEY, _ENTRY_VALUE = 1, 2
_TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 13, 14
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
SMALL_FILE = 64 << 20    # below this a file is simply parsed
INLINE_MIN_BYTES = 1024  # smaller inline tensors (shape constants) stay in the graph


@dataclass(frozen=True)
class FileLayout:
    """What ``scan`` found: metadata_props, initializer name -> dims, and -> (offset, length) of its raw_data."""

    metadata: dict[str, str] = field(default_factory=dict)
    dims: dict[str, tuple[int, ...]] = field(default_factory=dict)
    raw_data: dict[str, tuple[int, int]] = field(default_factory=dict)


def scan(path: str | Path) -> FileLayout:
    """The metadata_props and inline raw_data spans of the ONNX file ``path``."""
    path = Path(path)
    layout = FileLayout()
    with open(path, "rb") as f:
        end = path.stat().st_size
        for number, wire, value, *_ in _fields(f, end):
            if wire != _LEN:
                continue
            start, length = value
            if number == _MODEL_METADATA:
                entry = _strings(f, start, start + length)
                layout.metadata[entry.get(_ENTRY_KEY, "")] = entry.get(_ENTRY_VALUE, "")
            elif number == _MODEL_GRAPH:
                _scan_graph(f, start, start + length, layout)
    return layout


def _scan_graph(f: BinaryIO, start: int, end: int, layout: FileLayout) -> None:
    f.seek(start)
    for number, wire, value, *_ in _fields(f, end):
        if number != _GRAPH_INITIALIZER or wire != _LEN:
            continue
        t_start, t_len = value
        name, raw, dims = "", None, []
        f.seek(t_start)
        for t_number, t_wire, t_value, *_ in _fields(f, t_start + t_len):
            if t_number == _TENSOR_DIMS:
                dims.extend([t_value] if t_wire == _VARINT else _packed(f, *t_value))
            elif t_number == _TENSOR_NAME and t_wire == _LEN:
                name = _read(f, *t_value).decode("utf-8")
            elif t_number == _TENSOR_RAW_DATA and t_wire == _LEN:
                raw = t_value
        if name:
            layout.dims[name] = tuple(dims)
            if raw is not None:
                layout.raw_data[name] = raw


def _packed(f: BinaryIO, start: int, length: int) -> list[int]:
    here = f.tell()
    f.seek(start)
    values = []
    while f.tell() < start + length:
        values.append(_varint(f))
    f.seek(here)
    return values


def _strings(f: BinaryIO, start: int, end: int) -> dict[int, str]:
    f.seek(start)
    return {n: _read(f, *v).decode("utf-8") for n, w, v, *_ in _fields(f, end) if w == _LEN}


def _read(f: BinaryIO, start: int, length: int) -> bytes:
    here = f.tell()
    f.seek(start)
    data = f.read(length)
    f.seek(here)
    return data


def _fields(f: BinaryIO, end: int) -> Iterator[tuple[int, int, object, int, int]]:
    """(field number, wire type, value, field start, field end) of each field up to ``end``; a
    length-delimited value is (offset, length) and is skipped after the consumer has looked at it."""
    while f.tell() < end:
        field_start = f.tell()
        tag = _varint(f)
        number, wire = tag >> 3, tag & 7
        if wire == _VARINT:
            value = _varint(f)
            yield number, wire, value, field_start, f.tell()
        elif wire in (_I64, _I32):
            f.seek(8 if wire == _I64 else 4, 1)
            here = f.tell()
            yield number, wire, None, field_start, here
            f.seek(here)
        elif wire == _LEN:
            length = _varint(f)
            start = f.tell()
            yield number, wire, (start, length), field_start, start + length
            f.seek(start + length)
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} at offset {f.tell()} (not an ONNX file?)")


def _varint(f: BinaryIO) -> int:
    result = shift = 0
    while True:
        byte = f.read(1)
        if not byte:
            raise ValueError("truncated protobuf varint (not an ONNX file, or a truncated one)")
        result |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return result
        shift += 7


# --------------------------------------------------------------------------------------------
# the graph without its inline weights
# --------------------------------------------------------------------------------------------
def weightless_model(path: str | Path, min_bytes: int = INLINE_MIN_BYTES) -> onnx.ModelProto:
    """``path``'s model without loading weights: external data stays external, and each inline
    raw_data of at least ``min_bytes`` becomes external data pointing at its own bytes in ``path``
    (location = the file's name, so it resolves next to the file). A small file is simply parsed."""
    import onnx

    path = Path(path)
    if path.stat().st_size < SMALL_FILE:
        return onnx.load(str(path), load_external_data=False)
    out = bytearray()
    with open(path, "rb") as f:
        for number, wire, value, start, end in _fields(f, path.stat().st_size):
            if number == _MODEL_GRAPH and wire == _LEN:
                out += _length_field(number, _weightless_graph(f, *value, path.name, min_bytes))
            else:
                out += _read(f, start, end - start)
    return onnx.load_from_string(bytes(out))


def _weightless_graph(f: BinaryIO, start: int, length: int, location: str, min_bytes: int) -> bytes:
    out = bytearray()
    f.seek(start)
    for number, wire, value, f_start, f_end in _fields(f, start + length):
        tensor = _weightless_tensor(f, *value, location, min_bytes) \
            if number == _GRAPH_INITIALIZER and wire == _LEN else None
        out += _length_field(number, tensor) if tensor is not None else _read(f, f_start, f_end - f_start)
    return bytes(out)


def _weightless_tensor(f: BinaryIO, start: int, length: int, location: str, min_bytes: int) -> bytes | None:
    """The tensor's fields with a large raw_data replaced by an external-data reference, or None to
    copy the tensor as it is."""
    kept, raw = bytearray(), None
    here = f.tell()
    f.seek(start)
    for number, wire, value, f_start, f_end in _fields(f, start + length):
        if number == _TENSOR_RAW_DATA and wire == _LEN and value[1] >= min_bytes:
            raw = value
        else:
            kept += _read(f, f_start, f_end - f_start)
    f.seek(here)
    if raw is None:
        return None
    for key, text in (("location", location), ("offset", str(raw[0])), ("length", str(raw[1]))):
        entry = _length_field(_ENTRY_KEY, key.encode()) + _length_field(_ENTRY_VALUE, text.encode())
        kept += _length_field(_TENSOR_EXTERNAL_DATA, entry)
    kept += _varint_bytes(_TENSOR_DATA_LOCATION << 3 | _VARINT) + _varint_bytes(_EXTERNAL)
    return bytes(kept)


def _length_field(number: int, payload: bytes) -> bytes:
    return _varint_bytes(number << 3 | _LEN) + _varint_bytes(len(payload)) + payload


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
