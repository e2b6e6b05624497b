"""nn.Module -> ExportedModel: ONNX through the dynamo exporter, custom ops via the plugins registry.

The model is exported once, with the llmtrt custom nodes; a dialect pass then gives the graph its
final form (custom nodes + local functions, opset-23 standard ops, or primitive ops only).
Files are written to a temporary directory and moved into place at the end, so a failed or
interrupted export never leaves a ``model.onnx`` behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch

from exporter import dialects
from exporter.config import ModelConfig, ModelSource
from exporter.errors import LlmtrtUserError
from exporter.iospec import IOSpec, io_spec

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
EXTERNAL_DATA_THRESHOLD = 1 << 30  # bytes of initializers above which weights go to model.onnx.data


@dataclass(frozen=True)
class ExportOptions:
    dialect: str = "custom"
    opset: int | None = None  # None: the dialect's default
    max_positions: int | None = None  # rotary table length; None: config.max_position_embeddings
    external_data: bool | None = None  # None: only when the weights are over 1 GiB

    def resolved_opset(self) -> int:
        spec = dialects.get(self.dialect)
        opset = self.opset or spec.default_opset
        if opset < spec.min_opset:
            raise LlmtrtUserError(
                f"--opset {opset} is too old for --ops {self.dialect}; it needs opset >= {spec.min_opset}")
        if opset > dialects.MAX_OPSET:
            raise LlmtrtUserError(f"--opset {opset} is newer than the installed onnx supports ({dialects.MAX_OPSET})")
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


def _sample_inputs(model, batch: int = 2, seq: int = 3, past: int = 4):
    # Sizes > 1 and distinct, so torch.export keeps every dynamic dimension symbolic.
    c = model.config
    input_ids = torch.zeros(batch, seq, dtype=torch.int64)
    position_ids = torch.arange(past, past + seq, dtype=torch.int64).expand(batch, seq).contiguous()
    attention_mask = torch.ones(batch, past + seq, dtype=torch.int64)
    cache = [torch.zeros(batch, c.num_key_value_heads, past, c.head_dim) for _ in range(2 * c.num_hidden_layers)]
    return input_ids, position_ids, attention_mask, cache


def _dynamic_shapes(n_cache: int):
    dim = torch.export.Dim
    batch, seq = dim("batch"), dim("sequence_length")
    past, total = dim("past_sequence_length"), dim("total_sequence_length")
    return {
        "input_ids": {0: batch, 1: seq},
        "position_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total},
        "past_key_values": [{0: batch, 2: past}] * n_cache,
    }


def capture(model) -> onnx.ModelProto:
    """Run the dynamo exporter with the custom translation table; returns the graph with llmtrt nodes
    (no function bodies yet) at ``dialects.CAPTURE_OPSET``."""
    from plugins.registry import translation_table

    io = io_spec(model.config)
    args = _sample_inputs(model)
    with warnings_quiet():
        program = torch.onnx.export(
            model, args, dynamo=True, dynamic_shapes=_dynamic_shapes(len(args[3])),
            custom_translation_table=translation_table(), input_names=io.input_names,
            output_names=io.output_names, opset_version=dialects.CAPTURE_OPSET, optimize=True, verbose=False,
        )
    return program.model_proto


@contextlib.contextmanager
def warnings_quiet():
    """The exporter logs chatty warnings (torchvision missing, dim renames); keep the user's terminal clean."""
    import logging
    import warnings

    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def export_model(model, out_dir: str | Path, options: ExportOptions = ExportOptions()) -> ExportedModel:
    """Export ``model`` (an exporter.model.LlamaDecoder) to ``out_dir/model.onnx`` in the chosen dialect."""
    out_dir = Path(out_dir)
    opset = options.resolved_opset()
    _check_writable(out_dir)
    t0 = time.perf_counter()
    with torch.no_grad():
        proto = capture(model)
    proto = dialects.finalize(proto, model.config, options.dialect, opset)
    io = io_spec(model.config)
    io.apply_dim_names(proto)
    onnx.checker.check_model(proto, full_check=False)
    size = sum(t.ByteSize() for t in proto.graph.initializer)
    external = options.external_data if options.external_data is not None else size > EXTERNAL_DATA_THRESHOLD
    onnx_path = write_atomically(proto, out_dir, external)
    stats = {"export_seconds": round(time.perf_counter() - t0, 3), "weights_bytes": size, "external_data": external}
    return ExportedModel(onnx_path, model.config, io, options.dialect, opset, stats)


def _check_writable(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LlmtrtUserError(f"--out {out_dir}: cannot create the directory ({exc.strerror}); choose another path") from None
    if not os.access(out_dir, os.W_OK):
        raise LlmtrtUserError(f"--out {out_dir}: directory is not writable; choose another path or fix its permissions")


def write_atomically(proto: onnx.ModelProto, out_dir: Path, external: bool) -> Path:
    """Save into a temp dir beside the target, then move the data file and finally model.onnx in place."""
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out_dir))
    try:
        if external:
            onnx.save_model(proto, tmp / MODEL_FILE, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=DATA_FILE, size_threshold=1024)
            os.replace(tmp / DATA_FILE, out_dir / DATA_FILE)
        else:
            onnx.save_model(proto, tmp / MODEL_FILE)
            with contextlib.suppress(FileNotFoundError):
                (out_dir / DATA_FILE).unlink()
        os.replace(tmp / MODEL_FILE, out_dir / MODEL_FILE)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir / MODEL_FILE


def export(source: ModelSource, out_dir: str | Path, options: ExportOptions = ExportOptions()) -> ExportedModel:
    """Load (or random-init) the model a ModelSource names and export it."""
    from exporter.weights import load_model

    options.resolved_opset()  # fail on a bad option before loading weights
    model = load_model(source, max_positions=options.max_positions)
    return export_model(model, out_dir, options)
