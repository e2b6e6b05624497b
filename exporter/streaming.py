"""Low-memory export of an HF checkpoint: capture the graph with meta weights, stream the tensors.

The in-memory export loads every weight in fp32, lets the exporter's optimizer fold
``Transpose(weight)`` into a new ``[in, out]`` initializer and serializes the lot: 2-3x the fp32
weights at peak. Here the model is built on the ``meta`` device (only the rotary tables are real) and
captured with the same exporter and translation table. Before the same optimizer runs, each large
weight becomes zeros with zero strides (no memory), so the optimizer folds exactly what it folds for
the real model, in the same order and under the same names; afterwards every such initializer becomes
an empty placeholder whose external-data location names its checkpoint tensor (a fused weight, e.g.
``qkv_proj``, names its parts joined by ``+``: their concatenation along the output axis). After the dialect pass
and renaming, the placeholders are laid out as ``onnx.save_model(save_as_external_data=True,
size_threshold=1024)`` lays out tensors (graph order, back to back), and each tensor is read from its
safetensors file with plain reads, converted to fp32 and, for linear weights, transposed, in blocks
straight into ``model.onnx.data``. Peak memory is about one checkpoint tensor plus a few blocks, and
the files equal the in-memory export's byte for byte (tests/exporter/test_streaming.py). A model of more
than two decoder layers is captured with two and the second is cloned for the rest
(exporter/layer_repeat.py): model.onnx.data is still byte for byte the same, model.onnx has the same
nodes, names and weights with other names for intermediate values (tests/exporter/test_layer_repeat.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from llmtrt.exporter.config import ModelConfig
from llmtrt.exporter.errors import LlmtrtUserError

# external-data location of a placeholder: MARK + checkpoint names joined by "+" (concatenated along dim 0)
# + ("|T" if transposed)
MARK = "llmtrt.stream:"
BLOCK_BYTES = 64 << 20  # fp32 bytes written per block of a converted tensor
WRITE_QUEUE = 2  # converted blocks that may wait for the writer thread
SMALL_ELEMENTS = 1024  # weights up to this size are loaded at capture: onnx_ir deduplicates them by content
SIZE_THRESHOLD = 1024  # onnx.save_model's default: tensors this large (sys.getsizeof) go to external data
_BYTES_OVERHEAD = 33  # sys.getsizeof(bytes) - len(bytes), which onnx compares with the threshold
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


@dataclass(frozen=True)
class _Entry:
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


class Checkpoint:
    """Tensor directory of a safetensors checkpoint, read with pread (no mmap: touched pages of a
    mapping count toward the process's resident memory until it is unmapped)."""

    def __init__(self, config: ModelConfig, directory: str | Path):
        from llmtrt.exporter.weights import check_keys, checkpoint_files, expected_shapes

        self.directory = Path(directory)
        files = checkpoint_files(self.directory)
        check_keys(config, self.directory, files)
        self.shapes = expected_shapes(config)
        self.entries: dict[str, _Entry] = {}
        for path in sorted(set(files.values())):
            self.entries.update(self._read_header(path))
        for name, shape in self.shapes.items():
            e = self.entries.get(name)
            if e is None:
                raise LlmtrtUserError(f"{files[name]}: tensor {name!r} is listed in the index but not in the file; "
                                      "re-save the checkpoint")
            if e.shape != shape:
                raise LlmtrtUserError(
                    f"{e.path}: tensor {name!r} has shape {e.shape}, config.json implies {shape}; "
                    "the weights and config.json do not belong together")

    def _read_header(self, path: Path) -> dict[str, _Entry]:
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > 100 << 20:
                    raise ValueError(f"header length {n}")
                header = json.loads(f.read(n))
                size = os.fstat(f.fileno()).st_size
        except (OSError, ValueError, struct.error, UnicodeDecodeError) as exc:
            raise LlmtrtUserError(f"{path}: not a readable safetensors file ({exc}); re-download or re-save it") from None
        entries = {}
        for name, info in header.items():
            if name == "__metadata__" or name not in self.shapes:
                continue
            dtype = _DTYPES.get(info.get("dtype"))
            if dtype is None:
                raise LlmtrtUserError(f"{path}: tensor {name!r} has dtype {info.get('dtype')}; expected a float")
            begin, end = info["data_offsets"]
            shape = tuple(info["shape"])
            nbytes = end - begin
            if nbytes != dtype.itemsize * _numel(shape) or 8 + n + end > size:
                raise LlmtrtUserError(f"{path}: corrupt safetensors file (tensor {name!r} runs past the data); "
                                      "re-download or re-save it")
            entries[name] = _Entry(path, dtype, shape, 8 + n + begin, nbytes)
        return entries

    def read(self, name: str) -> torch.Tensor:
        """One tensor in its stored dtype."""
        e = self.entries[name]
        buf = bytearray(e.nbytes)
        with open(e.path, "rb") as f:
            f.seek(e.start)
            if f.readinto(buf) != e.nbytes:
                raise LlmtrtUserError(f"{e.path}: file is truncated at tensor {name!r}; re-download it")
        return torch.frombuffer(buf, dtype=e.dtype).reshape(e.shape) if e.nbytes else torch.empty(e.shape, dtype=e.dtype)

    def fp32_blocks(self, name: str, transpose: bool):
        """The tensor as fp32 bytes (transposed to [in, out] when asked), in blocks of about BLOCK_BYTES."""
        yield from self.concat_fp32_blocks([name], transpose)

    def concat_fp32_blocks(self, names: list[str], transpose: bool):
        """The tensors concatenated along dim 0 (a fused weight [sum of out, in]), as fp32 bytes in blocks
        of about BLOCK_BYTES; transposed ([in, sum of out]) when asked. Holds the parts, one block apart."""
        if not transpose:
            for name in names:
                t = self.read(name)
                rows = max(1, BLOCK_BYTES // max(1, 4 * _numel(t.shape[1:])))
                for r in range(0, t.shape[0], rows):
                    yield t[r:r + rows].to(torch.float32).contiguous().numpy()
            return
        parts = [self.read(name).T for name in names]
        width = sum(_numel(p.shape[1:]) for p in parts)
        rows = max(1, BLOCK_BYTES // max(1, 4 * width))
        for r in range(0, parts[0].shape[0], rows):
            yield torch.cat([p[r:r + rows].to(torch.float32) for p in parts], dim=1).contiguous().numpy()


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def meta_model(config: ModelConfig, max_positions: int | None = None, *, fuse: bool = False,
               last_logits_only: bool = False):
    """A LlamaDecoder whose parameters live on the meta device; the rotary tables are real."""
    from llmtrt.exporter.model import LlamaDecoder, rope_tables

    with torch.device("meta"):
        model = LlamaDecoder(config, max_positions=max_positions)
    cos, sin = rope_tables(config, max_positions)
    model.register_buffer("rope_cos", cos, persistent=False)
    model.register_buffer("rope_sin", sin, persistent=False)
    return model.export_variant(fuse=fuse, last_logits_only=last_logits_only, in_place=True).eval()


def weight_sources(config: ModelConfig, fuse: bool) -> dict[str, str]:
    """Parameter name of the export's model -> its checkpoint source (fused: the parts joined by "+")."""
    from llmtrt.exporter.model import fused_modules
    from llmtrt.exporter.weights import expected_shapes

    weights = {name: name for name in expected_shapes(config)}
    if config.tie_word_embeddings:  # the capture may name the shared weight after either module
        weights["lm_head.weight"] = "model.embed_tokens.weight"
    if fuse:
        for fused, parts in fused_modules(config).items():
            weights[fused + ".weight"] = "+".join(weights.pop(part + ".weight") for part in parts)
    return weights


def capture(checkpoint: Checkpoint, config: ModelConfig, kv_cache: str, max_positions: int | None = None, *,
            fuse: bool = False, last_logits_only: bool = False, repeat: bool = True,
            stats: dict | None = None) -> onnx.ModelProto:
    """The graph the in-memory capture gives, at CAPTURE_OPSET, with every large checkpoint weight as
    an empty placeholder initializer whose external-data location names its source. Small weights (up to
    SMALL_ELEMENTS) are loaded, because the optimizer deduplicates small initializers by content.

    With ``repeat`` (and more than two layers) two decoder layers are captured and the second is cloned
    for the rest (exporter/layer_repeat.py: the same graph, a fraction of the capture time); when the
    capture does not allow that, every layer is captured. ``stats["captured_layers"]`` says which."""
    from llmtrt.exporter import layer_repeat

    layers = config.num_hidden_layers
    stats = {} if stats is None else stats
    stats["captured_layers"] = layers
    if not repeat or layers <= layer_repeat.CAPTURED_LAYERS:
        return _capture(checkpoint, config, config, kv_cache, max_positions, fuse, last_logits_only)
    few = dataclasses.replace(config, num_hidden_layers=layer_repeat.CAPTURED_LAYERS)
    proto = _capture(checkpoint, config, few, kv_cache, max_positions, fuse, last_logits_only)
    weights = weight_sources(config, fuse)
    repeated = layer_repeat.repeat_layers(
        proto, layers, lambda name, shape: _fp32(checkpoint, weights[name], shape).tobytes(), MARK)
    if repeated is None:
        return _capture(checkpoint, config, config, kv_cache, max_positions, fuse, last_logits_only)
    stats["captured_layers"] = layer_repeat.CAPTURED_LAYERS
    return repeated


def _capture(checkpoint: Checkpoint, config: ModelConfig, captured: ModelConfig, kv_cache: str,
             max_positions: int | None, fuse: bool, last_logits_only: bool) -> onnx.ModelProto:
    """``capture`` of a model shaped as ``captured`` (``config`` with fewer layers, or ``config``)."""
    import onnx_ir as ir

    from llmtrt.exporter.capture import run_export, warnings_quiet
    from llmtrt.exporter.kv_cache import get_layout

    model = meta_model(captured, max_positions, fuse=fuse, last_logits_only=last_logits_only)
    program = run_export(model, get_layout(kv_cache), optimize=False)
    graph = program.model.graph
    weights = weight_sources(config, fuse)
    sources = {}
    for name in [n for n in graph.initializers if n in weights]:
        value, source = graph.initializers[name], weights[name]
        if _numel(value.shape) <= SMALL_ELEMENTS:  # loaded: the optimizer deduplicates small ones by content
            value.const_value = ir.tensor(_fp32(checkpoint, source, value.shape), name=name)
            continue
        # Zeros with zero strides: the optimizer folds Transpose(weight) into a new initializer named
        # after the Transpose's output exactly as it does with the real weight, without the memory.
        value.const_value = ir.tensor(np.broadcast_to(np.zeros((), np.float32), tuple(value.shape)), name=name)
        sources[name] = source
        sources.update({use.node.outputs[0].name: source + "|T" for use in value.uses()
                        if use.node.op_type == "Transpose" and use.node.domain == ""})
    with warnings_quiet():
        program.optimize()  # what optimize=True runs after the capture
    graph = program.model.graph
    for name, value in graph.initializers.items():
        if getattr(getattr(value.const_value, "raw", None), "is_meta", False):
            raise AssertionError(f"streaming capture: initializer {name!r} has no checkpoint source")
        array = value.const_value.numpy() if isinstance(value.const_value, ir.Tensor) else None
        fake = array is not None and array.size > 1 and not any(array.strides)
        if fake != (name in sources):
            raise AssertionError(f"streaming capture: initializer {name!r} is derived from a weight in a way "
                                 "this exporter does not stream")
        if fake:
            value.const_value = ir.ExternalTensor(MARK + sources[name], 0, 0, value.dtype, shape=value.shape, name=name)
    return ir.serde.serialize_model(program.model)


def _fp32(checkpoint: Checkpoint, source: str, shape) -> np.ndarray:
    return np.concatenate([b.ravel() for b in _blocks(checkpoint, source)]).reshape(tuple(shape))


def lay_out(proto: onnx.ModelProto, external: bool) -> list[tuple[int, str | bytes]]:
    """Point every large initializer at model.onnx.data the way onnx.save_model would; returns the
    data file's contents in order: (offset, checkpoint source or raw bytes). Small placeholders are
    marked ``inline`` to be filled by ``fill_inline``."""
    from llmtrt.exporter.files import DATA_FILE

    plan: list[tuple[int, str | bytes]] = []
    offset = 0
    for t in proto.graph.initializer:
        source = _source(t)
        if source is not None:
            nbytes = 4 * _numel(t.dims)
        elif t.HasField("raw_data"):
            nbytes = len(t.raw_data)
        else:
            continue
        if not external or nbytes + _BYTES_OVERHEAD < SIZE_THRESHOLD:
            if source is not None:
                t.ClearField("external_data")
                t.ClearField("data_location")
                t.doc_string = "inline:" + source  # filled (and cleared) by fill_inline
            continue
        plan.append((offset, source if source is not None else t.raw_data))
        t.ClearField("raw_data")
        del t.external_data[:]
        t.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", DATA_FILE), ("offset", offset), ("length", nbytes)):
            entry = t.external_data.add()
            entry.key, entry.value = key, str(value)
        offset += nbytes
    return plan


def _source(t: onnx.TensorProto) -> str | None:
    """The checkpoint source a placeholder stands for, or None for a tensor with data."""
    for entry in t.external_data:
        if entry.key == "location" and entry.value.startswith(MARK):
            return entry.value[len(MARK):]
    return None


def fill_inline(proto: onnx.ModelProto, checkpoint: Checkpoint) -> None:
    for t in proto.graph.initializer:
        if t.doc_string.startswith("inline:"):
            source = t.doc_string[len("inline:"):]
            t.ClearField("doc_string")
            t.raw_data = b"".join(b.tobytes() for b in _blocks(checkpoint, source))


def _blocks(checkpoint: Checkpoint, source: str):
    names, _, flag = source.partition("|")
    return checkpoint.concat_fp32_blocks(names.split("+"), transpose=flag == "T")


def write_data(path: Path, plan: list[tuple[int, str | bytes]], checkpoint: Checkpoint) -> int:
    """Write model.onnx.data from the plan; returns its size. A writer thread overlaps the file writes
    with reading and transposing the next blocks (at most WRITE_QUEUE blocks wait in memory)."""
    import queue
    import threading

    blocks: queue.Queue = queue.Queue(maxsize=WRITE_QUEUE)
    failure: list[BaseException] = []

    def writer(f):
        while (block := blocks.get()) is not None:
            if not failure:
                try:
                    f.write(block)
                except BaseException as exc:  # re-raised in the producing thread
                    failure.append(exc)

    with open(path, "wb") as f:
        thread = threading.Thread(target=writer, args=(f,), daemon=True)
        thread.start()
        expected = 0
        try:
            for offset, item in plan:
                if offset != expected:
                    raise AssertionError(f"data layout drifted at offset {offset} (expected {expected})")
                for block in ([item] if isinstance(item, bytes) else _blocks(checkpoint, item)):
                    if failure:
                        raise failure[0]
                    blocks.put(block)
                    expected += len(block) if isinstance(block, bytes) else block.nbytes
        finally:
            blocks.put(None)
            thread.join()
        if failure:
            raise failure[0]
        return f.tell()


def initializer_bytes(proto: onnx.ModelProto) -> int:
    """sum(t.ByteSize()) over the initializers as if every placeholder held its fp32 data inline: the
    figure the in-memory export computes (and compares with EXTERNAL_DATA_THRESHOLD)."""
    total = 0
    for t in proto.graph.initializer:
        if _source(t) is None:
            total += t.ByteSize()
            continue
        bare = onnx.TensorProto()
        bare.CopyFrom(t)
        bare.ClearField("external_data")
        bare.ClearField("data_location")
        n = 4 * _numel(t.dims)
        total += bare.ByteSize() + 1 + _varint_size(n) + n
    return total


def _varint_size(n: int) -> int:
    size = 1
    while n >= 0x80:
        n >>= 7
        size += 1
    return size
