"""TensorRT backends: full NVIDIA TensorRT (10.x/11.x, e.g. Jetson) and TensorRT-RTX, one object each.

Everything that differs between the two lives here, in data and small methods, so the build code
never branches on a backend's name. Modules are imported lazily: ``--help`` and the ONNX-only
stages work without either installed.

Measured facts (TensorRT-RTX 1.7.1, CPU-only machine) that shaped this file:

* RTX builds engines ahead of time on a CPU; ``Runtime.deserialize_cuda_engine`` needs a GPU
  (returns None with "CUDA driver version is insufficient"), so layer info comes from the network.
* RTX networks are strongly typed whatever the flags (``create_network(0).get_flag(STRONGLY_TYPED)``
  is True); TensorRT 10.x needs ``1 << NetworkDefinitionCreationFlag.STRONGLY_TYPED``; 11.x accepts
  and ignores it. So we always pass the flag when the enum has it.
* Target GPUs: RTX only, ``config.num_compute_capabilities = n`` then
  ``config.set_compute_capability(trt.ComputeCapability.SM89, i)``. Members: SM75 SM80 SM86 SM89
  SM120 SM121 (+ CURRENT, NONE). Full TensorRT builds for the GPU it runs on.
* RTX timing cache calls are deprecated no-ops ("Timing cache operations are no-ops in
  TensorRT-RTX"); RTX's runtime cache is a runtime (GPU) feature.
* RTX Python ``INetworkDefinition`` has no ``add_plugin_v3``; a Python IPluginV3 creator picked by
  the ONNX parser aborts the process ("terminate called without an active exception").
* RTX stores the weights once per optimization profile: the 156M-shaped fp32 export (0.62 GB of
  weights) gives a 1.13 GB plan with prefill + decode profiles and 0.63 GB with either alone, the
  1.1B-shaped one 8.59 GB vs 4.43 GB. So on RTX the build merges the profiles into one optimization
  profile (the union of their shapes) unless told otherwise (``weights_per_profile``).
* RTX builds a refittable or weight-stripped plan (REFIT*, STRIP_PLAN) only where the CUDA driver
  library is installed, GPU or not: without libcuda.so.1 the build fails in Myelin
  ("graph_jit.cpp:278: CHECK(status == CUDA_SUCCESS) failed"); plain builds need no driver.
* The builder copies every weight into its own memory (+1x, measured: 512 MiB of weights add
  512 MiB of anonymous memory before the file is read) and concatenates the weights of GEMMs it
  fuses horizontally (q/k/v, gate/up: about +0.55x more for Llama); ``parse_from_file`` maps the
  external-data file instead of reading it (file-backed, reclaimable page cache).

Capabilities per backend version (which ONNX ops the parser imports natively, whether Python
plugins work, which engine precisions build) are declared in ``Backend.capabilities`` so a pipeline
config can be checked against the TensorRT it names without that TensorRT installed.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from types import ModuleType
from typing import Any

from llmtrt.pipelines.errors import LlmtrtUserError

_log = logging.getLogger(__name__)

# Ops whose parser support decides how our custom nodes are lowered (queried at run time with
# OnnxParser.supports_operator; the static sets below are what we measured / what NVIDIA documents).
LOWERING_OPS = ("RMSNormalization", "RotaryEmbedding", "Attention", "TensorScatter",
                "TRT_Attention", "TRT_KVCacheUpdate")


ENGINE_PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4", "fp8")


def parse_version(text: str) -> tuple[int, int]:
    """'10.3' / '10.3.0.30' / '1.7.1.116' -> (major, minor); a user error for anything else."""
    parts = str(text).strip().split(".")
    try:
        return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        raise LlmtrtUserError(f"version {text!r}: expected MAJOR.MINOR, e.g. 10.3 or 1.7") from None


@dataclass(frozen=True)
class Capabilities:
    """What one version range of a backend can build (inclusive bounds on (major, minor))."""

    first: tuple[int, int]
    last: tuple[int, int] | None      # None: open-ended
    native_ops: frozenset[str]        # ops of LOWERING_OPS its ONNX parser imports natively
    python_plugins: bool              # llmtrt's tensorrt.plugin definitions (AOT) register and build
    precisions: frozenset[str]        # engine precisions (ENGINE_PRECISIONS) it builds
    source: str                       # measured here, or which NVIDIA document says so

    def covers(self, version: tuple[int, int]) -> bool:
        return self.first <= version and (self.last is None or version <= self.last)

    @property
    def versions(self) -> str:
        first = ".".join(map(str, self.first))
        if self.last is None:
            return f">= {first}"
        return first if self.last == self.first else f"{first} - {'.'.join(map(str, self.last))}"


@dataclass(frozen=True)
class Backend:
    """One TensorRT flavour: how to import it and what it can do."""

    name: str                       # registry key and manifest value
    module_name: str                # python import name
    pip_hint: str                   # what to install when the import fails
    supports_target_cc: bool        # ahead-of-time builds for named compute capabilities
    supports_timing_cache: bool     # build-time timing cache has an effect
    supports_python_plugins: bool   # INetworkDefinition.add_plugin_v3 exists; parser can use Python plugins
    plugin_parse_may_abort: bool    # importing a plugin node can kill the process: parse in a subprocess
    inspects_built_engine: bool     # builds happen on a GPU, so the plan can be deserialized and inspected
    weights_per_profile: bool | None = None   # each optimization profile carries its own weights (None: unmeasured)
    # Releases with Builder.build_serialized_network_to_stream (plan streamed to disk) and with
    # OnnxParser.load_model_proto/load_initializer (weights mapped by the build); the build checks the
    # API itself (hasattr) and falls back to the in-memory plan / parse_from_file.
    stream_plan_since: str = ""
    mapped_weights_since: str = ""
    strip_flags: tuple[str, ...] = ()         # BuilderFlag names for a weight-stripped, refittable plan
    strip_needs_cuda_driver: bool = False     # that build needs libcuda.so.1 even ahead of time
    capabilities: tuple[Capabilities, ...] = ()

    # -- import -----------------------------------------------------------------------------
    def available(self) -> bool:
        """True when the module imports (cached)."""
        return _try_import(self.module_name) is not None

    def module(self) -> ModuleType:
        """The imported TensorRT module, or a user error saying what to install."""
        mod = _try_import(self.module_name)
        if mod is None:
            raise LlmtrtUserError(
                f"backend {self.name!r} needs the python module {self.module_name!r}, which is not "
                f"installed; install it with: {self.pip_hint}")
        return mod

    def version(self) -> str:
        return str(getattr(self.module(), "__version__", "unknown"))

    # -- builder objects ----------------------------------------------------------------------
    def create_network(self, builder: Any) -> Any:
        """A strongly typed network definition (precision comes from the ONNX graph, never flags)."""
        trt = self.module()
        flag_enum = getattr(trt, "NetworkDefinitionCreationFlag", None)
        strongly = getattr(flag_enum, "STRONGLY_TYPED", None) if flag_enum is not None else None
        flags = (1 << int(strongly)) if strongly is not None else 0
        network = builder.create_network(flags)
        if strongly is not None and not network.get_flag(strongly):
            raise RuntimeError(f"{self.name}: network is not strongly typed despite the flag")
        return network

    def set_target_cc(self, config: Any, target_cc: Sequence[str]) -> list[str]:
        """Restrict the engine to ``target_cc`` (e.g. ["8.9", "12.0"]); returns the enum names set."""
        if not target_cc:
            return []
        trt = self.module()
        if not (self.supports_target_cc and hasattr(config, "set_compute_capability")):
            raise LlmtrtUserError(
                f"--target-cc needs TensorRT-RTX (pip install 'llmtrt[rtx]'); backend {self.name!r} "
                "builds for the GPU it runs on. Drop --target-cc or use --backend tensorrt-rtx")
        names = [normalize_cc(cc, trt) for cc in target_cc]
        config.num_compute_capabilities = len(names)
        for i, enum_name in enumerate(names):
            config.set_compute_capability(getattr(trt.ComputeCapability, enum_name), i)
        return names

    def check_target_cc(self, target_cc: Sequence[str]) -> list[str]:
        """The enum names ``target_cc`` maps to, or a user error, without building anything."""
        if not target_cc:
            return []
        if not self.supports_target_cc:
            raise LlmtrtUserError(
                f"--target-cc needs TensorRT-RTX (pip install 'llmtrt[rtx]'); backend {self.name!r} "
                "builds for the GPU it runs on. Drop --target-cc or use --backend tensorrt-rtx")
        trt = self.module()
        return [normalize_cc(cc, trt) for cc in target_cc]

    def capabilities_for(self, version: str | None = None) -> Capabilities:
        """The declared capabilities of ``version`` (default: the newest declared range)."""
        if version is None:
            return self.capabilities[-1]
        wanted = parse_version(version)
        for caps in self.capabilities:
            if caps.covers(wanted):
                return caps
        known = ", ".join(c.versions for c in self.capabilities)
        raise LlmtrtUserError(f"{self.name} {version}: no capabilities are declared for this version (known: "
                              f"{known}); name one of those versions")

    def check_strip_weights(self) -> None:
        """A user error unless this backend can build a weight-stripped plan here (no building needed)."""
        if not self.strip_flags:
            raise LlmtrtUserError(f"--strip-weights: backend {self.name!r} cannot build weight-stripped plans; "
                                  "drop --strip-weights")
        if self.strip_needs_cuda_driver and not cuda_driver_present():
            raise LlmtrtUserError(
                f"--strip-weights: {self.name} builds weight-stripped (refittable) plans only where the NVIDIA "
                "driver's libcuda.so.1 is installed, GPU or not, and this machine has none (measured with "
                "TensorRT-RTX 1.7.1: the build fails in Myelin with CHECK(status == CUDA_SUCCESS)); build on a "
                "machine with the NVIDIA driver, or drop --strip-weights for a plan with its weights")

    def logger(self) -> Any:
        """The process-wide capturing logger (TensorRT keeps the first logger it is given and
        ignores later ones: "The logger passed into createInferBuilder differs from one already
        registered ... the current new logger is ignored"), so every builder/parser shares it."""
        return _logger(self.name)

    def plugin_registry(self) -> Any:
        """The process-wide plugin registry (builders' own registries search it as their parent)."""
        return self.module().get_plugin_registry()

    def plugin_names(self) -> set[str]:
        """Names of every registered plugin creator."""
        registry = self.plugin_registry()
        creators = getattr(registry, "all_creators_recursive", None) or registry.all_creators
        return {c.name for c in creators}

    def supports_operator(self, op_type: str) -> bool:
        """Whether this backend's ONNX parser has a built-in importer for ``op_type``."""
        return _parser_supports(self.name, op_type)

    def native_ops(self) -> dict[str, bool]:
        """Parser support for every op the ``native`` lowering can emit."""
        return {op: self.supports_operator(op) for op in LOWERING_OPS}

    def describe(self) -> dict[str, Any]:
        """Manifest/CLI summary (imports the module)."""
        return {"backend": self.name, "module": self.module_name, "version": self.version(),
                "supports_target_cc": self.supports_target_cc,
                "supports_timing_cache": self.supports_timing_cache,
                "supports_python_plugins": self.supports_python_plugins,
                "weights_per_profile": self.weights_per_profile, "strip_flags": list(self.strip_flags),
                "native_ops": self.native_ops()}


def cuda_driver_present() -> bool:
    """Whether the CUDA driver library (libcuda.so.1 / nvcuda.dll) can be loaded by this process."""
    import ctypes
    import ctypes.util

    for name in ("libcuda.so.1", ctypes.util.find_library("cuda"), "nvcuda.dll"):
        if not name:
            continue
        try:
            ctypes.CDLL(name)
        except OSError:
            continue
        return True
    return False


def _rtx_available_cc(trt: ModuleType) -> list[str]:
    return sorted(n for n in dir(trt.ComputeCapability) if n.startswith("SM"))


def normalize_cc(value: str | int | float, trt: ModuleType | None = None) -> str:
    """'8.9' / '89' / 'sm89' / 'SM_89' / 8.9 -> 'SM89' (checked against the module's enum if given)."""
    text = str(value).strip().upper().replace("_", "")
    if text.startswith("SM"):
        text = text[2:]
    if "." in text:
        major, _, minor = text.partition(".")
        text = f"{major}{minor}"
    name = f"SM{text}"
    if not text.isdigit():
        raise LlmtrtUserError(f"--target-cc {value!r}: expected a compute capability like 8.9 or 12.0")
    if trt is not None and not hasattr(trt.ComputeCapability, name):
        raise LlmtrtUserError(
            f"--target-cc {value!r}: this TensorRT-RTX does not build for {name}; choose from "
            + ", ".join(_rtx_available_cc(trt)))
    return name


_ALL_NATIVE = frozenset({"RMSNormalization", "RotaryEmbedding", "Attention", "TensorScatter"})
_TRT_PRECISIONS = frozenset({"fp32", "fp16", "bf16", "int8", "int4"})  # fp8 needs a GPU of compute capability >= 8.9

TENSORRT_CAPABILITIES = (
    Capabilities((10, 0), (10, 6), frozenset(), False, _TRT_PRECISIONS,
                 "NVIDIA release notes: INT4 weight-only quantization from 10.0; no tensorrt.plugin before 10.7; "
                 "Attention importer from 10.14, RotaryEmbedding (IRotaryEmbeddingLayer) from 10.15.1"),
    Capabilities((10, 7), (10, 8), frozenset(), False, _TRT_PRECISIONS,
                 "NVIDIA: tensorrt.plugin is experimental and has no AOT implementations before 10.9"),
    Capabilities((10, 9), (10, 13), frozenset(), True, _TRT_PRECISIONS,
                 "NVIDIA quickly_deployable_plugins sample: AOT Python plugins from 10.9 (not measured here)"),
    Capabilities((10, 14), (10, 14), frozenset({"Attention"}), True, _TRT_PRECISIONS,
                 "NVIDIA 10.14 parser release notes: Attention operator added (not measured here)"),
    Capabilities((10, 15), None, _ALL_NATIVE, True, _TRT_PRECISIONS,
                 "NVIDIA 10.15.1 documentation: IRotaryEmbeddingLayer; RMSNormalization/TensorScatter per "
                 "docs/support-matrix.md (not measured here)"),
)
RTX_CAPABILITIES = (
    Capabilities((1, 7), None, _ALL_NATIVE, False, frozenset({"fp32", "fp16", "bf16", "int8", "int4"}),
                 "measured here with TensorRT-RTX 1.7.1.116 (docs/support-matrix.md, docs/precision.md)"),
)

BACKENDS: dict[str, Backend] = {
    "tensorrt": Backend(
        name="tensorrt", module_name="tensorrt", pip_hint="pip install 'llmtrt[tensorrt]'",
        supports_target_cc=False, supports_timing_cache=True, supports_python_plugins=True,
        plugin_parse_may_abort=False, inspects_built_engine=True,
        strip_flags=("STRIP_PLAN", "REFIT_IDENTICAL"),   # NVIDIA: weight-stripped engines, TensorRT >= 10.0
        stream_plan_since="10.15 (C++ API reference lists it; 10.0 does not; not measured)",
        mapped_weights_since="10.13 (release notes: IParser::loadModelProto/loadInitializer; not measured)",
        capabilities=TENSORRT_CAPABILITIES,
    ),
    "tensorrt-rtx": Backend(
        name="tensorrt-rtx", module_name="tensorrt_rtx_bindings", pip_hint="pip install 'llmtrt[rtx]'",
        supports_target_cc=True, supports_timing_cache=False, supports_python_plugins=False,
        plugin_parse_may_abort=True, inspects_built_engine=False,
        weights_per_profile=True,
        strip_flags=("REFIT", "STRIP_PLAN"),            # TensorRT-RTX docs: weightless engine = kREFIT + kSTRIP_PLAN
        stream_plan_since="1.3 (API reference; measured in 1.7.1)",
        mapped_weights_since="1.7 (measured in 1.7.1)",
        strip_needs_cuda_driver=True,
        capabilities=RTX_CAPABILITIES,
    ),
}

# Preference order for detect_backend(): full TensorRT first (it is what Jetson has).
DETECT_ORDER = ("tensorrt", "tensorrt-rtx")


def get_backend(name: str | None = None) -> Backend:
    """The named backend (checked importable), or the detected one when ``name`` is None."""
    if name is None:
        return detect_backend()
    try:
        backend = BACKENDS[name]
    except KeyError:
        raise LlmtrtUserError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}") from None
    backend.module()
    return backend


def detect_backend(order: Iterable[str] = DETECT_ORDER) -> Backend:
    """The first importable backend: ``tensorrt`` if present, else ``tensorrt-rtx``."""
    order = tuple(order)
    for name in order:
        if BACKENDS[name].available():
            return BACKENDS[name]
    hints = " or ".join(BACKENDS[n].pip_hint for n in order)
    raise LlmtrtUserError(f"no TensorRT backend is installed; install one: {hints}")


@cache
def _try_import(module_name: str) -> ModuleType | None:
    try:
        return importlib.import_module(module_name)
    except ImportError:
        return None


@cache
def _logger(backend_name: str) -> Any:
    trt = BACKENDS[backend_name].module()

    class CapturingLogger(trt.ILogger):
        """Forwards TensorRT messages to ``logging``; keeps warnings and errors for reports."""

        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: list[tuple[str, str]] = []

        def log(self, severity: Any, msg: str) -> None:
            sev = trt.ILogger.Severity
            if severity <= sev.WARNING:
                self.messages.append((severity.name, msg))
                del self.messages[:-500]
            level = (logging.ERROR if severity <= sev.ERROR else
                     logging.WARNING if severity <= sev.WARNING else logging.DEBUG)
            _log.log(level, "[%s] %s", backend_name, msg)

        def mark(self) -> int:
            """Position to pass to since() later (messages logged after this call)."""
            return len(self.messages)

        def since(self, mark: int, *severities: str) -> list[str]:
            return [m for s, m in self.messages[mark:] if not severities or s in severities]

    return CapturingLogger()


@cache
def _probe_parser(backend_name: str) -> tuple[Any, ...]:
    """A throwaway parser kept alive (with its builder/network) to answer supports_operator."""
    backend = BACKENDS[backend_name]
    trt = backend.module()
    logger = _logger(backend_name)
    builder = trt.Builder(logger)
    network = backend.create_network(builder)
    return logger, builder, network, trt.OnnxParser(network, logger)


@cache
def _parser_supports(backend_name: str, op_type: str) -> bool:
    return bool(_probe_parser(backend_name)[-1].supports_operator(op_type))
