"""The fp32 export as an editable IR: lazy weights, linear layers, and the tensors that leave it.

    source = Source.open("out/onnx")            # onnx_ir model; external weights stay on disk (mmap on read)
    for lin in linears(source.graph):           # every MatMul on a 2-D weight
        w = read_fp32(lin.weight)               # one weight in memory, its mapping released
    sink = TensorSink(out_dir, external=source.external)
    sink.put(value, array, ir.DataType.FLOAT16) # written to model.onnx.data now, referenced by the graph

A *linear* is a MatMul (default domain) whose weight input is a 2-D initializer named
``<module>.weight_t`` ([in, out], the exporter's naming, fused q/k/v and gate/up included), or the
Transpose of a 2-D initializer (a tied embedding table used as the lm_head). Producer/consumer
lookups are onnx_ir's (O(1) per value), so no edit scans the node list.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmtrt.pipelines.errors import LlmtrtUserError

DATA_FILE = "model.onnx.data"
INLINE_BYTES = 1024          # tensors smaller than this stay inside model.onnx (as onnx.save's size_threshold)
ALIGNMENT = 4096             # external tensors start at page boundaries (ONNX Runtime can map them)
COPY_BLOCK = 64 << 20


@dataclass
class Linear:
    node: Any                # ir.Node, the MatMul
    module: str              # "model.layers.0.self_attn.q_proj"
    weight: Any              # ir.Value of the initializer ([in, out]; [out, in] when transposed)
    transposed: bool = False # weight reached through a Transpose (a tied table): W = table^T
    role: str = "linear"     # "lm_head" when its output is a graph output

    @property
    def x(self):
        return self.node.inputs[0]

    @property
    def shape(self) -> tuple[int, int]:
        """(in, out) of the layer."""
        a, b = (int(d) for d in self.weight.shape)
        return (b, a) if self.transposed else (a, b)


def node_prefix(node) -> str:
    return node.name.rsplit("/", 1)[0] if node.name and "/" in node.name else (node.name or "")


def find_linears(graph) -> list[Linear]:
    found = []
    for node in graph:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            continue
        w = node.inputs[1]
        if w is None:
            continue
        role = "lm_head" if _reaches_graph_output(node.outputs[0]) else "linear"
        if w.is_initializer() and w.name.endswith(".weight_t") and w.shape is not None and len(w.shape) == 2:
            found.append(Linear(node, w.name[: -len(".weight_t")], w, False, role))
            continue
        t = w.producer()
        if t is not None and t.op_type == "Transpose" and t.inputs[0] is not None and t.inputs[0].is_initializer():
            table = t.inputs[0]
            perm = t.attributes.get("perm")
            if table.shape is not None and len(table.shape) == 2 and (perm is None or list(perm.value) == [1, 0]):
                module = ".".join(p for p in node_prefix(node).split("/") if p) or table.name
                found.append(Linear(node, module, table, True, role))
    return found


def _reaches_graph_output(value, hops: int = 8) -> bool:
    for _ in range(hops):
        if value.is_graph_output():
            return True
        uses = value.uses()
        if len(uses) != 1 or uses[0].node.op_type not in ("Cast", "Identity"):
            return False
        value = uses[0].node.outputs[0]
    return False


def groups_of(lins: list[Linear]) -> list[list[Linear]]:
    """Linears grouped by their shared input (q/k/v; gate/up), in graph order."""
    by_input: dict[int, list[Linear]] = {}
    for lin in lins:
        by_input.setdefault(id(lin.x), []).append(lin)
    return list(by_input.values())


def annotate_types(graph, types: dict[str, int]) -> None:
    """Give every value without a known element type the one ONNX type inference found for its name."""
    import onnx_ir as ir

    for node in graph:
        for v in node.outputs:
            if v.dtype is None and types.get(v.name):
                v.dtype = ir.DataType(types[v.name])


# --------------------------------------------------------------------------------------------
# reading weights
# --------------------------------------------------------------------------------------------
def read_array(value, dtype=np.float32) -> np.ndarray:
    """An initializer's data as a fresh array (external data read with plain reads: nothing stays mapped)."""
    return read_tensor(value.const_value, dtype)


def read_tensor(t, dtype=np.float32) -> np.ndarray:
    """A tensor's data as a fresh array of ``dtype``."""
    array = _read_external(t, 0, None) if _is_external(t) else t.numpy()
    return np.array(array, dtype=dtype, copy=not _is_external(t) or array.dtype != np.dtype(dtype))


def iter_rows(value, block_bytes: int = COPY_BLOCK):
    """An initializer's data in blocks of whole rows (axis 0), each a fresh array of its stored type."""
    t = value.const_value
    shape = tuple(int(d) for d in t.shape)
    row_bytes = max(1, t.nbytes // max(1, shape[0])) if shape else t.nbytes
    rows = max(1, block_bytes // max(1, row_bytes))
    if not shape:
        yield read_array(value, t.dtype.numpy())
        return
    for r in range(0, shape[0], rows):
        n = min(rows, shape[0] - r)
        yield _read_external(t, r, n) if _is_external(t) else np.array(t.numpy()[r:r + n])


def _is_external(t) -> bool:
    import onnx_ir as ir

    return isinstance(t, ir.ExternalTensor)


def _read_external(t, row: int, rows: int | None) -> np.ndarray:
    shape = tuple(int(d) for d in t.shape)
    dtype = np.dtype(t.dtype.numpy()).newbyteorder("<")
    count_shape = ((rows if rows is not None else shape[0]), *shape[1:]) if shape else ()
    out = np.empty(count_shape, dtype=dtype)
    row_bytes = out.itemsize * int(np.prod(shape[1:], dtype=np.int64)) if shape else out.itemsize
    with open(t.path, "rb") as f:
        f.seek((t.offset or 0) + row * row_bytes)
        if f.readinto(memoryview(out).cast("B")) != out.nbytes:
            raise LlmtrtUserError(f"{t.path}: truncated at tensor {t.name!r}; re-run `llmtrt export`")
    return out


def read_fp32(lin_or_value) -> np.ndarray:
    """A linear's weight as fp32 [in, out] (a tied table transposed), or an initializer as fp32."""
    if isinstance(lin_or_value, Linear):
        w = read_array(lin_or_value.weight)
        return np.ascontiguousarray(w.T) if lin_or_value.transposed else w
    return read_array(lin_or_value)


# --------------------------------------------------------------------------------------------
# the source export
# --------------------------------------------------------------------------------------------
@dataclass
class Source:
    directory: Path
    onnx_path: Path
    model: Any               # ir.Model
    external: bool           # weights in an external-data file
    manifest: dict[str, Any] = field(default_factory=dict)
    exported: Any = None     # the ExportedModel the manifest describes
    proto: Any = None        # the parsed ModelProto the IR was made from (read-only)
    types: dict[str, int] = field(default_factory=dict)  # element type of every tensor, by name

    @property
    def graph(self):
        return self.model.graph

    @classmethod
    def open(cls, directory: Path, onnx_path: Path, manifest: dict[str, Any], exported: Any = None) -> Source:
        """The export as IR over one parsed ModelProto (inline weights are shared, not copied; external
        ones stay on disk), with every tensor's inferred element type."""
        import onnx_ir as ir

        from llmtrt.pipelines.artifacts import load_graph
        from llmtrt.pipelines.precision.inventory import infer_types

        proto = load_graph(onnx_path)
        model = ir.serde.deserialize_model(proto)
        ir.external_data.set_base_dir(model.graph, str(onnx_path.parent))
        external = any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())
        for v in model.graph.initializers.values():
            t = v.const_value
            if isinstance(t, ir.ExternalTensor) and not Path(t.path).is_file():
                raise LlmtrtUserError(f"{onnx_path}: its weights file {t.location} is missing; re-run "
                                      "`llmtrt export`")
        types = infer_types(proto)
        annotate_types(model.graph, types)
        return cls(directory, onnx_path, model, external, manifest, exported, proto, types)


# --------------------------------------------------------------------------------------------
# writing tensors as they are made
# --------------------------------------------------------------------------------------------
class TensorSink:
    """Gives initializers their new data: appended to ``model.onnx.data`` at once (external mode) or kept
    in the graph (a small model). Every write releases what it can, so memory stays one tensor deep."""

    def __init__(self, out_dir: Path, external: bool) -> None:
        self.out_dir = Path(out_dir)
        self.external = external
        self.offset = 0
        self.written = 0
        self._file = open(self.out_dir / DATA_FILE, "wb") if external else None

    def put(self, value, data: np.ndarray | bytes, dtype, shape: tuple[int, ...] | None = None) -> None:
        """``value`` (an initializer ir.Value) now holds ``data`` (raw little-endian bytes, or an array
        converted with :func:`raw_bytes`) of element type ``dtype`` (ir.DataType)."""
        import onnx_ir as ir

        raw = data if isinstance(data, bytes | bytearray | memoryview) else raw_bytes(data, dtype)
        dims = tuple(int(d) for d in (shape if shape is not None else np.shape(data)))
        value.dtype = dtype
        value.shape = ir.Shape(dims)
        value.const_value = self._tensor(value.name, bytes(raw) if not self.external else raw, dtype, dims)

    def _tensor(self, name: str, raw, dtype, dims):
        import onnx
        import onnx_ir as ir

        if not self.external or len(raw) < INLINE_BYTES:
            proto = onnx.helper.make_tensor(name, int(dtype), list(dims), bytes(raw), raw=True)
            return ir.serde.TensorProtoTensor(proto)
        self._pad()
        offset = self.offset
        self._file.write(raw)
        self.offset += len(raw)
        self.written += len(raw)
        return ir.ExternalTensor(DATA_FILE, offset, len(raw), dtype, shape=ir.Shape(dims), name=name,
                                 base_dir=str(self.out_dir))

    def _pad(self) -> None:
        pad = -self.offset % ALIGNMENT
        if pad:
            self._file.write(b"\0" * pad)
            self.offset += pad

    def put_blocks(self, value, blocks, dtype, shape: tuple[int, ...]) -> None:
        """Like :meth:`put` for a large tensor produced in row blocks (arrays), written one at a time."""
        import onnx_ir as ir

        if not self.external:
            parts = [raw_bytes(b, dtype) for b in blocks]
            self.put(value, b"".join(parts), dtype, shape)
            return
        self._pad()
        offset = self.offset
        for b in blocks:
            raw = raw_bytes(b, dtype)
            self._file.write(raw)
            self.offset += len(raw)
        self.written += self.offset - offset
        value.dtype = dtype
        value.shape = ir.Shape(shape)
        value.const_value = ir.ExternalTensor(DATA_FILE, offset, self.offset - offset, dtype, shape=ir.Shape(shape),
                                              name=value.name, base_dir=str(self.out_dir))

    def carry(self, value) -> None:
        """Copy a source tensor's bytes unchanged (kernel copy for an external one)."""
        import onnx_ir as ir

        t = value.const_value
        if not self.external or not isinstance(t, ir.ExternalTensor):
            if isinstance(t, ir.ExternalTensor):  # external source, inline output: read it in
                self.put(value, read_array(value, t.dtype.numpy()), t.dtype)
            return
        if t.nbytes < INLINE_BYTES:
            self.put(value, read_array(value, t.dtype.numpy()), t.dtype)
            return
        self._pad()
        self._file.flush()
        offset = self.offset
        self._file.seek(offset)
        t.tofile(self._file)
        t.release()
        self._file.seek(0, os.SEEK_END)
        self.offset = self._file.tell()
        self.written += self.offset - offset
        value.const_value = ir.ExternalTensor(DATA_FILE, offset, self.offset - offset, t.dtype, shape=t.shape,
                                              name=value.name, base_dir=str(self.out_dir))

    def finish(self, model, source_dir: Path | None = None):
        """Carry every initializer still pointing at the source, close the data file; the ModelProto."""
        import onnx_ir as ir

        for value in model.graph.initializers.values():
            t = value.const_value
            if isinstance(t, ir.ExternalTensor) and Path(t.base_dir) != self.out_dir:
                self.carry(value)
        if self._file is not None:
            self._file.close()
            self._file = None
            if self.written == 0:
                (self.out_dir / DATA_FILE).unlink()
        return ir.serde.serialize_model(model)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def raw_bytes(array: np.ndarray, dtype) -> bytes:
    """Little-endian bytes of ``array`` as ONNX stores ``dtype``: bf16 by round-to-nearest-even of
    fp32, int4 packed two per byte (low nibble first)."""
    import onnx_ir as ir

    from llmtrt.pipelines.precision import quant_math as qm

    if dtype == ir.DataType.BFLOAT16:
        return qm.to_bf16_bits(array).astype("<u2").tobytes()
    if dtype == ir.DataType.INT4:
        return qm.pack_int4(array)
    return np.ascontiguousarray(array, dtype=np.dtype(dtype.numpy()).newbyteorder("<")).tobytes()
