"""The TensorRT side of a build: parse the ONNX file into a network, configure the builder, and
stream the serialized plan to disk.

Memory (measured with TensorRT-RTX 1.7.1 on the 1.1B-shaped fp32 export, 4.42 GB of weights):
the external-data file is mapped, not read (``MappedWeights``, or ``parse_from_file`` which maps it
too), the builder copies each weight it uses into its own memory, and
``build_serialized_network_to_stream`` hands the plan over in chunks (67 writes of ~66 MB) instead
of a whole in-memory copy (``build_serialized_network`` held 2 GB more at the peak).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import onnx

from llmtrt.exporter.files import atomic_file
from llmtrt.pipelines.engine.backends import Backend
from llmtrt.pipelines.engine.mapped_weights import MappedWeights
from llmtrt.pipelines.engine.parse_errors import (
    ERRORS,
    LOWER_HINT,
    NodeFailure,
    UnsupportedNodesError,
    parser_failures,
)
from llmtrt.pipelines.engine.profiles import EngineProfile
from llmtrt.pipelines.errors import LlmtrtUserError

log = logging.getLogger(__name__)

OVERLAP_HASH_BYTES = 1 << 20  # plan chunks at least this large are hashed on a thread while written


@dataclass(frozen=True)
class WrittenPlan:
    """The plan file as written: its size, sha256 and whether it was streamed."""

    bytes: int
    sha256: str
    streamed: bool


@dataclass
class ParsedNetwork:
    """The network, the parser that owns its weights, and the mapped weights files (None when the
    parser maps them itself): all must stay alive until the build ends."""

    network: Any
    parser: Any
    weights: MappedWeights | None

    def close(self) -> None:
        if self.weights is not None:
            self.weights.close()


def parse_network(be: Backend, builder: Any, onnx_path: Path, model: onnx.ModelProto,
                  override: bool) -> ParsedNetwork:
    """The network TensorRT's ONNX parser makes of ``onnx_path``, or an UnsupportedNodesError
    listing every node it could not import. External weights are mapped, never read into memory:
    by us where the parser takes initializers by pointer (so the build can drop the mapped pages,
    ``MappedWeights``), else by the parser (``parse_from_file``)."""
    trt = be.module()
    logger = be.logger()
    mark = logger.mark()
    network = be.create_network(builder)
    parser = trt.OnnxParser(network, logger)
    if override:
        parser.set_flag(trt.OnnxParserFlag.ENABLE_PLUGIN_OVERRIDE)
    weights = None
    if hasattr(parser, "load_initializer") and any(t.external_data for t in model.graph.initializer):
        weights = MappedWeights(model, onnx_path.parent)
        ok = parser.load_model_proto(model.SerializeToString(), str(onnx_path))
        if ok:
            weights.load_into(parser)
            ok = parser.parse_model_proto()
    else:
        ok = parser.parse_from_file(str(onnx_path))
    if not ok:
        if weights is not None:
            weights.close()
        failures = parser_failures(parser, model) or [NodeFailure("", "", e) for e in logger.since(mark, *ERRORS)]
        raise UnsupportedNodesError(str(onnx_path), failures)
    return ParsedNetwork(network, parser, weights)


def builder_config(be: Backend, builder: Any, network: Any, profiles: Sequence[EngineProfile], *, opt_level: int,
                   workspace_mb: int | None, target_cc: Sequence[str], strip_weights: bool) -> tuple[Any, list[str]]:
    """The builder config: optimization level, workspace, target GPUs, one optimization profile per
    EngineProfile, and the weight-stripping flags; returns (config, target enum names)."""
    trt = be.module()
    logger = be.logger()
    mark = logger.mark()
    config = builder.create_builder_config()
    config.builder_optimization_level = opt_level
    if workspace_mb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    cc_names = be.set_target_cc(config, target_cc)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if strip_weights:
        for flag in be.strip_flags:
            config.set_flag(getattr(trt.BuilderFlag, flag))
    inputs = network_inputs(network)
    for profile in profiles:
        opt_profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile.shapes.items():
            if name in inputs:
                opt_profile.set_shape(name, lo, opt, hi)
        if config.add_optimization_profile(opt_profile) < 0:
            raise LlmtrtUserError(f"profile {profile.name!r} was rejected by TensorRT: "
                                  f"{logger.since(mark, *ERRORS)[-1:]}")
    return config, cc_names


def network_inputs(network: Any) -> set[str]:
    return {network.get_input(i).name for i in range(network.num_inputs)}


def build_plan(be: Backend, builder: Any, network: Any, config: Any, plan_path: Path, what: str) -> WrittenPlan:
    """Build and write the serialized plan to ``plan_path`` (atomically), hashing it on the way.

    Streams it (``build_serialized_network_to_stream``: TensorRT-RTX >= 1.3, TensorRT >= 10.15 by
    NVIDIA's API documentation, absent in 10.0) where the backend has it; otherwise the plan is held
    in memory once and written. A failed build raises a user error with TensorRT's last messages and
    leaves no file behind.
    """
    logger = be.logger()
    mark = logger.mark()
    sha = hashlib.sha256()
    streamed = hasattr(builder, "build_serialized_network_to_stream")
    with atomic_file(plan_path) as tmp, open(tmp, "wb") as out:
        if streamed:
            writer = _stream_writer(be.module(), out, sha)
            ok = builder.build_serialized_network_to_stream(network, config, writer)
            size = writer.written
        else:
            plan = builder.build_serialized_network(network, config)
            ok = plan is not None
            if ok:
                view = memoryview(plan)
                out.write(view)
                sha.update(view)
                size = view.nbytes
                del view, plan
        if not ok:
            errors = "\n  ".join(logger.since(mark, *ERRORS)[-5:]) or "(no error message)"
            raise LlmtrtUserError(f"{be.name} could not build {what}:\n  {errors}\n"
                                  f"If this is about attention kernels, {LOWER_HINT}")
    return WrittenPlan(size, sha.hexdigest(), streamed)


def _stream_writer(trt: Any, out: BinaryIO, sha: Any) -> Any:
    """An IStreamWriter of ``trt`` that appends each chunk to ``out`` and to ``sha``.

    The chunk is hashed on a second thread while it is written (both release the GIL; the chunk
    stays valid until ``write`` returns): writing a 2.2 GB plan took 4.7 s and hashing it 1.3 s one
    after the other on the 2-core development machine."""

    class PlanWriter(trt.IStreamWriter):
        def __init__(self) -> None:
            trt.IStreamWriter.__init__(self)
            self.written = 0

        def write(self, data: Any) -> int:
            view = memoryview(data)
            hashing = None
            if view.nbytes >= OVERLAP_HASH_BYTES:
                hashing = threading.Thread(target=sha.update, args=(view,), name="llmtrt-plan-sha256")
                hashing.start()
            try:
                out.write(view)
            finally:
                if hashing is not None:
                    hashing.join()
            if hashing is None:
                sha.update(view)
            self.written += view.nbytes
            return view.nbytes

    return PlanWriter()


def attach_timing_cache(be: Backend, config: Any, path: str | Path | None) -> tuple[Any, str | None]:
    """Load/attach a timing cache where it has an effect; returns (cache, note for the manifest)."""
    if path is None:
        return None, None
    if not be.supports_timing_cache:
        log.warning("%s has no build-time timing cache; ignoring %s", be.name, path)
        return None, f"ignored: {be.name} has no build-time timing cache"
    path = Path(path)
    blob = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(blob)
    config.set_timing_cache(cache, False)
    return cache, str(path)
