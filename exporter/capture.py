"""The dynamo capture both exports share: the model at CAPTURE_OPSET with the llmtrt custom nodes.

    program = run_export(model, layout, optimize=True)    # torch.onnx.ONNXProgram
"""

from __future__ import annotations

import contextlib

import onnx
import torch

from llmtrt.exporter import dialects
from llmtrt.exporter.kv_cache import KVLayout, get_layout


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
        for lg, lv in zip(loggers, levels, strict=False):
            lg.setLevel(lv)


def run_export(model, layout: KVLayout, *, optimize: bool):
    """torch.onnx.export (dynamo) of a LlamaDecoder with the custom translation table and the layout's
    sample inputs and dynamic shapes; returns the ONNXProgram."""
    from llmtrt.plugins.registry import translation_table

    io = layout.io_spec(model.config)
    args = layout.sample_inputs(model.config)
    with torch.no_grad(), warnings_quiet():
        return torch.onnx.export(
            model, args, dynamic_shapes=layout.dynamic_shapes(len(args[3])), dynamo=True,
            custom_translation_table=translation_table(), input_names=io.input_names,
            output_names=io.output_names, opset_version=dialects.CAPTURE_OPSET, optimize=optimize, verbose=False,
        )


def capture(model, kv_cache: str = "dynamic") -> onnx.ModelProto:
    """The graph with llmtrt nodes (no function bodies yet) at ``dialects.CAPTURE_OPSET``."""
    return run_export(model, get_layout(kv_cache), optimize=True).model_proto
