"""Fuse the MatMuls that share an input (q/k/v, gate/up) into one before TensorRT sees them.

TensorRT fuses such GEMMs itself, and to do it the builder concatenates their weights in memory on
top of the copy it makes of every weight: measured with TensorRT-RTX 1.7.1, 512 MiB of weights cost
+1091 MiB of anonymous memory as two MatMuls sharing an input but +708 MiB as one MatMul twice as
wide (+707 MiB unfused and unshared). On a Llama these GEMMs hold 55% of the weights, so the
builder's own fusion was a third of a 1.1B build's peak. Here the fused weight is written once
into the lowered graph's data file, row by row from the (mapped) original files, and each group
becomes MatMul(A, W_fused) -> Split: the network TensorRT would have built, with no concatenation
left for the builder. Same products, same sums: outputs are bit-identical.

Weights are plain 2-D initializers [in, out_i] or DequantizeLinear(int8/int4 weight, scale[, zero
point]) of them with per-output-channel (axis 1) or input-blocked (axis 0, block_size) scales, the
forms ``llmtrt quantize`` writes. A group whose members differ in anything but ``out_i`` is left alone.
"""

from __future__ import annotations

import mmap
import os
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from llmtrt.pipelines.errors import LlmtrtUserError

ROWS_PER_CHUNK = 256
_FOUR_BIT = (TensorProto.INT4, TensorProto.UINT4)


@dataclass(frozen=True)
class Member:
    """One MatMul of a group: its node, its weight [in, out] and, if dequantized, the DQ node."""

    matmul: onnx.NodeProto
    weight: TensorProto
    dq: onnx.NodeProto | None = None
    scale: TensorProto | None = None
    zero_point: TensorProto | None = None


@dataclass(frozen=True)
class FuseReport:
    groups: list[list[str]]      # the fused MatMuls' output names, per group
    data_file: str | None        # the file the fused weights went to (relative to the graph)
    bytes: int


def fuse_shared_input_gemms(model: onnx.ModelProto, base_dir: Path, data_path: Path) -> FuseReport:
    """Fuse every group of MatMuls sharing input A in ``model`` (in place); fused weights are
    appended to ``data_path`` (external data, location relative to ``base_dir``)."""
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    groups = _groups(model) if opset >= 13 else []  # Split takes its sizes as an input from opset 13
    if not groups:
        return FuseReport([], None, 0)
    reader = _Reader(base_dir)
    written = 0
    replace: dict[str, list[onnx.NodeProto]] = {}
    drop: set[str] = set()
    try:
        with open(data_path, "ab") as out:
            for index, members in enumerate(groups):
                nodes, tensors, size = _fuse(members, index, reader, out, data_path.name)
                written += size
                replace[members[0].matmul.output[0]] = nodes
                drop |= {id_ for m in members for id_ in _member_ids(m)}
                model.graph.initializer.extend(tensors)
    finally:
        reader.close()
    _rewrite_nodes(model, replace, drop)
    replaced_outputs = {m.matmul.output[0] for g in groups for m in g}
    for field in (model.graph.initializer, model.graph.value_info):
        kept = [t for t in field if t.name not in drop or t.name in replaced_outputs]
        del field[:]
        field.extend(kept)
    return FuseReport([[m.matmul.output[0] for m in g] for g in groups], data_path.name, written)


def _member_ids(m: Member) -> set[str]:
    """Names of what fusion removes: the MatMul (by output), DQ node (by output) and their initializers."""
    names = {m.matmul.output[0], m.weight.name}
    if m.dq is not None:
        names |= {m.dq.output[0], m.scale.name} | ({m.zero_point.name} if m.zero_point is not None else set())
    return names


def _rewrite_nodes(model: onnx.ModelProto, replace: dict[str, list[onnx.NodeProto]], drop: set[str]) -> None:
    nodes = []
    for node in model.graph.node:
        if node.output and node.output[0] in replace:
            nodes.extend(replace[node.output[0]])
        elif not (node.output and node.output[0] in drop):
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)


# --------------------------------------------------------------------------------------------
# finding groups
# --------------------------------------------------------------------------------------------
def _groups(model: onnx.ModelProto) -> list[list[Member]]:
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    uses: dict[str, int] = defaultdict(int)
    for n in g.node:
        for i in n.input:
            uses[i] += 1
    for o in g.output:
        uses[o.name] += 1
    by_key: dict[tuple, list[Member]] = defaultdict(list)
    for node in g.node:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            continue
        member = _member(node, inits, producers, uses)
        if member is not None:
            by_key[(node.input[0], *_signature(member))].append(member)
    return [m for m in by_key.values() if len(m) > 1]


def _member(node: onnx.NodeProto, inits: dict[str, TensorProto], producers: dict[str, onnx.NodeProto],
            uses: dict[str, int]) -> Member | None:
    b = node.input[1]
    if uses[b] != 1:
        return None
    if b in inits:
        w = inits[b]
        return Member(node, w) if len(w.dims) == 2 and _row_bits(w) else None
    dq = producers.get(b)
    if dq is None or dq.op_type != "DequantizeLinear" or not all(i in inits and uses[i] == 1 for i in dq.input if i):
        return None
    w, scale = inits[dq.input[0]], inits[dq.input[1]]
    zp = inits[dq.input[2]] if len(dq.input) > 2 and dq.input[2] else None
    attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
    axis, out = attrs.get("axis", 1), w.dims[1] if len(w.dims) == 2 else 0
    per_channel = axis in (1, -1) and "block_size" not in attrs and list(scale.dims) == [out]
    blocked = axis == 0 and attrs.get("block_size") and len(scale.dims) == 2 and scale.dims[1] == out
    if len(w.dims) != 2 or not (per_channel or blocked) or not _row_bits(w):
        return None
    if zp is not None and list(zp.dims) != list(scale.dims):
        return None
    return Member(node, w, dq, scale, zp)


def _signature(m: Member) -> tuple:
    """What members of one group must share: input width, dtypes, DQ attributes and scale rows."""
    sig: tuple = (m.weight.dims[0], m.weight.data_type)
    if m.dq is not None:
        attrs = tuple(sorted((a.name, str(helper.get_attribute_value(a))) for a in m.dq.attribute))
        sig += (attrs, m.scale.data_type, tuple(m.scale.dims[:-1]),
                None if m.zero_point is None else m.zero_point.data_type)
    return sig


def _row_bits(t: TensorProto) -> int:
    """Bits of one row of the last axis, when rows are whole bytes (else 0: not fusable)."""
    bits = 4 if t.data_type in _FOUR_BIT else 8 * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    row = bits * (t.dims[-1] if t.dims else 1)
    return row if row % 8 == 0 else 0


# --------------------------------------------------------------------------------------------
# writing one group
# --------------------------------------------------------------------------------------------
def _fuse(members: list[Member], index: int, reader: _Reader, out,
          location: str) -> tuple[list[onnx.NodeProto], list[TensorProto], int]:
    first = members[0]
    name = _fused_name([m.weight.name for m in members], f"fused_gemm_{index}")
    weight = _concat(f"{name}", [m.weight for m in members], reader, out, location)
    tensors, size = [weight[0]], weight[1]
    b_input = weight[0].name
    nodes: list[onnx.NodeProto] = []
    if first.dq is not None:
        scale = _concat(f"{name}.scale", [m.scale for m in members], reader, out, location)
        tensors.append(scale[0])
        size += scale[1]
        dq_inputs = [weight[0].name, scale[0].name]
        if first.zero_point is not None:
            zp = _concat(f"{name}.zero_point", [m.zero_point for m in members], reader, out, location)
            tensors.append(zp[0])
            size += zp[1]
            dq_inputs.append(zp[0].name)
        b_input = f"{name}.dequantized"
        nodes.append(helper.make_node("DequantizeLinear", dq_inputs, [b_input], name=f"{name}/DequantizeLinear",
                                      **{a.name: helper.get_attribute_value(a) for a in first.dq.attribute}))
    fused_out = f"{name}.output"
    split = numpy_helper.from_array(np.array([m.weight.dims[1] for m in members], np.int64), f"{name}.split")
    tensors.append(split)
    nodes += [helper.make_node("MatMul", [first.matmul.input[0], b_input], [fused_out], name=f"{name}/MatMul"),
              helper.make_node("Split", [fused_out, split.name], [m.matmul.output[0] for m in members],
                               name=f"{name}/Split", axis=-1)]
    return nodes, tensors, size


def _fused_name(names: list[str], fallback: str) -> str:
    """model.layers.0.self_attn.{q,k,v}_proj.weight_t from the members' weight names."""
    prefix = os.path.commonprefix(names)
    suffix = os.path.commonprefix([n[len(prefix):][::-1] for n in names])[::-1]
    middles = [n[len(prefix):len(n) - len(suffix)] for n in names]
    if not all(middles) or any("," in m for m in middles):
        return fallback
    return f"{prefix}{{{','.join(middles)}}}{suffix}"


def _concat(name: str, tensors: list[TensorProto], reader: _Reader, out, location: str) -> tuple[TensorProto, int]:
    """Concatenate 1-D or 2-D ``tensors`` along their last axis into ``out``; the external-data tensor."""
    rows = int(np.prod(tensors[0].dims[:-1])) if len(tensors[0].dims) > 1 else 1
    sources = [reader.rows(t, rows) for t in tensors]
    offset = out.tell()
    for start in range(0, rows, ROWS_PER_CHUNK):
        stop = min(rows, start + ROWS_PER_CHUNK)
        out.write(np.concatenate([src(start, stop) for src in sources], axis=1).tobytes())
    length = out.tell() - offset
    dims = [*tensors[0].dims[:-1], sum(t.dims[-1] for t in tensors)]
    fused = TensorProto(name=name, data_type=tensors[0].data_type, dims=dims, data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = fused.external_data.add()
        entry.key, entry.value = key, value
    return fused, length


class _Reader:
    """Row views of initializers, external (mapped) or inline."""

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
        self._maps: dict[str, mmap.mmap] = {}

    def rows(self, t: TensorProto, rows: int) -> Callable[[int, int], np.ndarray]:
        data = self._bytes(t)
        table = np.frombuffer(data, dtype=np.uint8).reshape(rows, -1)
        return lambda start, stop: table[start:stop]

    def _bytes(self, t: TensorProto):
        ext = {e.key: e.value for e in t.external_data}
        if "location" not in ext:
            if not (t.raw_data or t.float_data or t.int32_data or t.int64_data or t.double_data or t.uint64_data):
                raise LlmtrtUserError(f"initializer {t.name!r} holds no data (neither inline nor external); "
                                      "re-run the stage that wrote the ONNX")
            return t.raw_data if t.raw_data else numpy_helper.to_array(t).tobytes()
        path = str((self.base_dir / ext["location"]).resolve())
        if path not in self._maps:
            with open(path, "rb") as f:
                self._maps[path] = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        offset = int(ext.get("offset", 0))
        length = int(ext["length"]) if "length" in ext else len(self._maps[path]) - offset
        return memoryview(self._maps[path])[offset:offset + length]

    def close(self) -> None:
        for mapped in self._maps.values():
            try:
                mapped.close()
            except BufferError:  # a view is still referenced; the map closes when it is collected
                pass
        self._maps.clear()

