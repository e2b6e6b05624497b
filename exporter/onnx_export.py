"""nn.Module -> ExportedModel: ONNX through the dynamo exporter, custom ops via the plugins registry.

The model is exported once, with the llmtrt custom nodes; a dialect pass then gives the graph its
final form (custom nodes + local functions, opset-23 standard ops, or primitive ops only).
The functions here write into the directory they are given; llmtrt.pipelines.artifacts.export_artifact
hands them a temporary one and swaps it into place with the manifest, so a failed or interrupted
export never leaves a ``model.onnx`` behind.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch

from llmtrt.exporter import dialects
from llmtrt.exporter.capture import capture
from llmtrt.exporter.config import ModelConfig, ModelSource
from llmtrt.exporter.errors import LlmtrtUserError
from llmtrt.exporter.files import DATA_FILE, MODEL_FILE
from llmtrt.exporter.iospec import IOSpec
from llmtrt.exporter.kv_cache import get_layout

# Bytes of initializers above which weights go to model.onnx.data. Low, because an inline graph costs
# at every step: serializing it holds the weights twice, and every reader parses them whole (156M: export
# 27 -> 18 s and peak RSS 2.4 -> 0.9 GB with external data). The onnxruntime-genai builder always writes one.
EXTERNAL_DATA_THRESHOLD = 64 << 20
# fp32 weight bytes of a checkpoint above which export streams by default: every checkpoint directory, as the
# streamed files are byte-identical and cheaper at any size (156M: 2.4 GB peak RSS instead of 5.3 GB, ~30% faster)
STREAMING_THRESHOLD = 0
LOGITS = ("all", "last")  # which positions the graph's logits cover


@dataclass(frozen=True)
class ExportOptions:
    # standard: the fastest in ONNX Runtime (docs/benchmarks.md); TensorRT < 10.15 needs custom (support matrix)
    dialect: str = "standard"
    opset: int | None = None  # None: the dialect's default
    max_positions: int | None = None  # rotary table length; None: config.max_position_embeddings
    external_data: bool | None = None  # None: only when the weights are over 64 MiB
    kv_cache: str = "dynamic"  # "dynamic": past in, past+seq out; "static": fixed-size cache + write_indices
    # Stream checkpoint tensors into model.onnx.data instead of loading the model (same files, a fraction
    # of the memory). None: for HF checkpoint directories (presets are random-init and load instead).
    streaming: bool | None = None
    # One MatMul for q/k/v (qkv_proj) and one for gate/up (gate_up_proj), weights concatenated along the
    # output axis; the manifest's ``fused`` lists the parts. Same numbers, fewer and larger MatMuls.
    fuse: bool = True
    logits: str = "all"  # "all": logits for every position; "last": [batch, 1, vocab] (generate, engines)

    def resolved_opset(self) -> int:
        spec = dialects.get(self.dialect)
        layout = get_layout(self.kv_cache)
        min_opset = max(spec.min_opset, layout.min_standard_opset) if self.dialect == "standard" else spec.min_opset
        opset = self.opset or max(spec.default_opset, min_opset)
        if opset < min_opset:
            raise LlmtrtUserError(
                f"--opset {opset} is too old for --ops {self.dialect} --kv-cache {self.kv_cache}; "
                f"it needs opset >= {min_opset}")
        if opset > dialects.MAX_OPSET:
            raise LlmtrtUserError(f"--opset {opset} is newer than the installed onnx supports ({dialects.MAX_OPSET})")
        if self.max_positions is not None and self.max_positions < 1:
            raise LlmtrtUserError(f"--max-positions must be a positive integer, got {self.max_positions}")
        if self.logits not in LOGITS:
            raise LlmtrtUserError(f"--logits {self.logits!r} is not one of {', '.join(LOGITS)}")
        return opset


@dataclass(frozen=True)
class ExportedModel:
    """An exported ONNX graph and what a later stage needs to know about it."""

    onnx_path: Path
    config: ModelConfig
    io: IOSpec
    dialect: str
    opset: int
    stats: dict = field(default_factory=dict)
    kv_cache: str = "dynamic"
    fused: dict[str, list[str]] = field(default_factory=dict)  # fused module -> its checkpoint modules, in order
    logits: str = "all"  # "all" positions, or the "last" one only


def export_model(model, out_dir: str | Path, options: ExportOptions = ExportOptions(), *,
                 in_place: bool = False) -> ExportedModel:
    """Export ``model`` (an llmtrt.exporter.model.LlamaDecoder) to ``out_dir/model.onnx`` in the chosen dialect.

    ``model`` is left as it was unless ``in_place`` (then fusing replaces its q/k/v and gate/up modules:
    for a model loaded only to be exported, it saves a copy of those weights)."""
    out_dir = Path(out_dir)
    opset = options.resolved_opset()
    t0 = time.perf_counter()
    model = model.export_variant(fuse=options.fuse, last_logits_only=options.logits == "last", in_place=in_place)
    with torch.no_grad():
        proto = capture(model, options.kv_cache)
    proto = dialects.finalize(proto, model.config, options.dialect, opset)
    io = get_layout(options.kv_cache).io_spec(model.config, logits=options.logits)
    io.apply_dim_names(proto)
    size = sum(t.ByteSize() for t in proto.graph.initializer)
    external = options.external_data if options.external_data is not None else size > EXTERNAL_DATA_THRESHOLD
    onnx_path = write_model(proto, out_dir, external)
    stats = {"export_seconds": round(time.perf_counter() - t0, 3), "weights_bytes": size, "external_data": external,
             "streaming": False}
    return ExportedModel(onnx_path, model.config, io, options.dialect, opset, stats, options.kv_cache,
                         _fused(model.config, options), options.logits)


def write_model(proto: onnx.ModelProto, out_dir: Path, external: bool, write_data=None) -> Path:
    """Save model.onnx (+ model.onnx.data) into ``out_dir`` (a fresh directory: the caller makes the
    artifact appear whole, see llmtrt.exporter.files.artifact_dir) and run the ONNX checker on the file.

    ``write_data(path)``, when given, writes model.onnx.data itself; ``proto`` then already points
    its large initializers at that file and is saved as it is.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    if write_data is not None:
        if external:
            write_data(out_dir / DATA_FILE)
        onnx.save_model(proto, out_dir / MODEL_FILE)
    elif external:
        onnx.save_model(proto, out_dir / MODEL_FILE, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=DATA_FILE, size_threshold=1024)
    else:
        onnx.save_model(proto, out_dir / MODEL_FILE)
    # Checked from the file: an in-memory proto over 2 GB cannot be serialized for the checker.
    onnx.checker.check_model(str(out_dir / MODEL_FILE), full_check=False)
    return out_dir / MODEL_FILE


def export(source: ModelSource, out_dir: str | Path, options: ExportOptions = ExportOptions()) -> ExportedModel:
    """Load (or random-init) the model a ModelSource names and export it."""
    from llmtrt.exporter.weights import load_model

    options.resolved_opset()  # fail on a bad option before loading weights
    if use_streaming(source, options):
        return export_streaming(source, out_dir, options)
    model = load_model(source, max_positions=options.max_positions)
    return export_model(model, out_dir, options, in_place=True)


def use_streaming(source: ModelSource, options: ExportOptions) -> bool:
    if source.checkpoint_dir is None:
        if options.streaming:
            raise LlmtrtUserError(f"--model {source.spec}: streaming export reads an HF checkpoint directory, and "
                                  "this preset is random-init; leave streaming off or pass a checkpoint")
        return False
    if options.streaming is not None:
        return options.streaming
    return 4 * source.config.num_parameters > STREAMING_THRESHOLD


def export_streaming(source: ModelSource, out_dir: str | Path, options: ExportOptions = ExportOptions()
                     ) -> ExportedModel:
    """Export an HF checkpoint without loading it: graph captured with meta weights, tensors copied
    from the safetensors files into model.onnx.data one block at a time (see exporter/streaming.py).
    Writes the same files as ``export_model`` on the loaded model."""
    from llmtrt.exporter import streaming

    out_dir = Path(out_dir)
    opset = options.resolved_opset()
    t0 = time.perf_counter()
    config = source.config
    checkpoint = streaming.Checkpoint(config, source.checkpoint_dir)  # key/shape errors before the capture
    captured: dict = {}
    proto = streaming.capture(checkpoint, config, options.kv_cache, options.max_positions, fuse=options.fuse,
                              last_logits_only=options.logits == "last", stats=captured)
    proto = dialects.finalize(proto, config, options.dialect, opset)
    io = get_layout(options.kv_cache).io_spec(config, logits=options.logits)
    io.apply_dim_names(proto)
    size = streaming.initializer_bytes(proto)
    external = options.external_data if options.external_data is not None else size > EXTERNAL_DATA_THRESHOLD
    plan = streaming.lay_out(proto, external)
    streaming.fill_inline(proto, checkpoint)
    onnx_path = write_model(proto, out_dir, external,
                            write_data=lambda path: streaming.write_data(path, plan, checkpoint))
    stats = {"export_seconds": round(time.perf_counter() - t0, 3), "weights_bytes": size, "external_data": external,
             "streaming": True, **captured}
    return ExportedModel(onnx_path, config, io, options.dialect, opset, stats, options.kv_cache,
                         _fused(config, options), options.logits)


def _fused(config: ModelConfig, options: ExportOptions) -> dict[str, list[str]]:
    from llmtrt.exporter.model import fused_modules

    return fused_modules(config) if options.fuse else {}
