"""Build a serialized TensorRT / TensorRT-RTX engine from an ONNX file, plus its manifest.

    build_engine("out/onnx/model.lowered.onnx", "out/engines", precision="fp16",
                 profiles=[prefill_profile(1, 512), decode_profile(1, 2047)], target_cc=["8.9"])

writes ``engine.fp16.plan`` and ``engine.fp16.json``. Engines are strongly typed: the precision
is whatever the ONNX graph holds, so ``precision`` is a check (fp16 needs fp16 tensors in the graph,
never a silent fp32 engine), not a builder flag. The plan is written to a temporary file and
renamed; the old manifest is removed first, so an interrupted build never leaves a plan that a
manifest vouches for.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from llmtrt.exporter.files import artifact_dir, check_out_dir, write_bytes_atomically
from llmtrt.exporter.kv_cache import get_layout, layout_of_inputs
from llmtrt.pipelines.artifacts import onnx_sha256, peak_rss_bytes
from llmtrt.pipelines.engine.backends import Backend, get_backend
from llmtrt.pipelines.engine.lowering import custom_nodes
from llmtrt.pipelines.engine.profiles import (
    Profile,
    graph_input_dims,
    max_positions_from_model,
    profile_shapes,
    validate_profiles,
)
from llmtrt.pipelines.errors import LlmtrtUserError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
LOWER_HINT = ("try `--lower native` (TensorRT built-in RMSNormalization/RotaryEmbedding/Attention) or "
              "`--lower inline` (primitive ops only)")
_OTHER_FLOATS = {onnx.TensorProto.FLOAT16: "fp16", onnx.TensorProto.BFLOAT16: "bf16"}
_QUANT_OPS = {"QuantizeLinear", "DequantizeLinear"}
_ERRORS = ("ERROR", "INTERNAL_ERROR")
INTENDED_DOMAINS = frozenset({"trt", "com.microsoft"})  # custom domains TensorRT's importers are written for


# --------------------------------------------------------------------------------------------
# precision check
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GraphFacts:
    """What the graph says about its precision (collected without loading external weights)."""

    float_types: frozenset[int]          # onnx.TensorProto dtypes of IO, value_info, weights, Cast targets
    weight_types: frozenset[int]         # dtypes of initializers only
    has_qdq: bool                        # QuantizeLinear/DequantizeLinear present


def graph_facts(model: onnx.ModelProto) -> GraphFacts:
    g = model.graph
    types = {v.type.tensor_type.elem_type for v in (*g.input, *g.output, *g.value_info)}
    weights = {t.data_type for t in g.initializer}
    casts = {a.i for n in g.node if n.op_type in ("Cast", "CastLike") for a in n.attribute if a.name == "to"}
    consts = {a.t.data_type for n in g.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"}
    nodes = [*g.node, *(n for f in model.functions for n in f.node)]
    return GraphFacts(frozenset(types | weights | casts | consts), frozenset(weights),
                      any(n.op_type in _QUANT_OPS for n in nodes))


def _needs(dtype: int, label: str):
    def check(facts: GraphFacts) -> str | None:
        if dtype in facts.float_types:
            return None
        return (f"--precision {label} asked for, but the ONNX graph has no {label} tensors (engines are strongly "
                f"typed, so this would be an fp32 engine); run `llmtrt quantize --to {label}` on it first")
    return check


def _fp32(facts: GraphFacts) -> str | None:
    low = sorted(label for dt, label in _OTHER_FLOATS.items() if dt in facts.weight_types)
    if low:
        return (f"--precision fp32 asked for, but the graph's weights are {'/'.join(low)}; "
                f"build it with --precision {low[0]}")
    return None


def _quantized(label: str):
    def check(facts: GraphFacts) -> str | None:
        if facts.has_qdq:
            return None
        return (f"--precision {label} needs QuantizeLinear/DequantizeLinear nodes in the graph; "
                f"run `llmtrt quantize --to {label}` on it first")
    return check


PRECISION_CHECKS = {
    "fp32": _fp32,
    "fp16": _needs(onnx.TensorProto.FLOAT16, "fp16"),
    "bf16": _needs(onnx.TensorProto.BFLOAT16, "bf16"),
    "int8": _quantized("int8"),
    "fp8": _quantized("fp8"),
    "int4": _quantized("int4"),
}


def check_precision(model: onnx.ModelProto, precision: str) -> None:
    """Raise a user error unless the graph really is ``precision`` (``int8-sq`` is checked as ``int8``)."""
    try:
        check = PRECISION_CHECKS[precision.split("-", 1)[0]]
    except KeyError:
        raise LlmtrtUserError(f"unknown --precision {precision!r}; choose one of {', '.join(PRECISION_CHECKS)}") from None
    problem = check(graph_facts(model))
    if problem:
        raise LlmtrtUserError(problem)


# --------------------------------------------------------------------------------------------
# parse errors
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NodeFailure:
    """One ONNX node TensorRT could not import."""

    node: str
    op_type: str
    message: str

    def __str__(self) -> str:
        return f"{self.node or '<unnamed>'} ({self.op_type}): {self.message}"


class UnsupportedNodesError(LlmtrtUserError):
    """TensorRT could not import some nodes; ``failures`` lists them all."""

    def __init__(self, source: str, failures: Sequence[NodeFailure], hint: str = LOWER_HINT) -> None:
        self.failures = list(failures)
        lines = "\n".join(f"  - {f}" for f in self.failures)
        if not any(f.op_type for f in self.failures):  # e.g. external weights that cannot be read
            hint = "no node is at fault; fix the file as the message says"
        super().__init__(f"{source}: TensorRT cannot import {len(self.failures)} node(s):\n{lines}\n{hint}")


def parser_failures(parser: Any, model: onnx.ModelProto) -> list[NodeFailure]:
    """Every error the ONNX parser recorded, as (node name, op type, message)."""
    failures = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        index = err.node()
        node = model.graph.node[index] if 0 <= index < len(model.graph.node) else None
        name = err.node_name() or (node.name if node is not None else "")
        op = err.node_operator() or (node.op_type if node is not None else "")
        failures.append(NodeFailure(name, op, err.desc()))
    return failures


def check_custom_nodes(model: onnx.ModelProto, backend: Backend, plugin_names: set[str],
                       override: bool, source: str = "graph") -> None:
    """Refuse custom-domain nodes that TensorRT would import with the wrong importer.

    The parser picks importers by op type only: ``llmtrt::RotaryEmbedding`` would silently go to
    the built-in RotaryEmbedding importer (different input order) unless a plugin takes it.
    """
    bad = []
    for node in custom_nodes(model):
        if node.domain in INTENDED_DOMAINS or not backend.supports_operator(node.op_type):
            continue
        if override and node.op_type in plugin_names:
            continue
        bad.append(NodeFailure(node.name, f"{node.domain}::{node.op_type}",
                               f"TensorRT would import it with its built-in '{node.op_type}' importer, which "
                               "ignores the domain and has other semantics"))
    if bad:
        raise UnsupportedNodesError(source, bad, "lower the custom nodes first: " + LOWER_HINT)


def plugin_routed_ops(model: onnx.ModelProto, plugin_names: set[str], override: bool) -> set[str]:
    """Custom op types the parser will hand to a plugin creator.

    Without the override flag a node with a local function is imported as that function even when a
    creator of the same name is registered (measured); with it, the creator wins.
    """
    functions = {(f.domain, f.name) for f in model.functions}
    return {n.op_type for n in custom_nodes(model)
            if n.op_type in plugin_names and (override or (n.domain, n.op_type) not in functions)}


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------
def plan_paths(out_dir: str | Path, precision: str) -> tuple[Path, Path]:
    """(engine.<precision>.plan, engine.<precision>.json) in ``out_dir``."""
    out_dir = Path(out_dir)
    return out_dir / f"engine.{precision}.plan", out_dir / f"engine.{precision}.json"


# --------------------------------------------------------------------------------------------
# plugin pre-flight (TensorRT-RTX aborts the whole process on some plugin imports)
# --------------------------------------------------------------------------------------------
_PREFLIGHT = """
import sys, importlib
trt = importlib.import_module(sys.argv[1])
logger = trt.Logger(trt.Logger.ERROR)
builder = trt.Builder(logger)
registry = builder.get_plugin_registry()
for lib in sys.argv[4:]:
    registry.load_library(lib)
network = builder.create_network(0)
parser = trt.OnnxParser(network, logger)
if sys.argv[3] == "1":
    parser.set_flag(trt.OnnxParserFlag.ENABLE_PLUGIN_OVERRIDE)
parser.parse_from_file(sys.argv[2])
"""


def _preflight_parse(backend: Backend, onnx_path: Path, plugins: Sequence[Path], override: bool) -> None:
    cmd = [sys.executable, "-c", _PREFLIGHT, backend.module_name, str(onnx_path), "1" if override else "0",
           *map(str, plugins)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode < 0 or proc.returncode == 134:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise LlmtrtUserError(
            f"{backend.name} aborted while importing plugin nodes of {onnx_path.name} ({tail}); plugins do not "
            f"work with this backend here: {LOWER_HINT}")


# --------------------------------------------------------------------------------------------
# build
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BuildResult:
    plan_path: Path
    manifest_path: Path
    manifest: dict[str, Any]


def _network_summary(network: Any) -> dict[str, Any]:
    """Layers of the parsed (strongly typed, pre-fusion) network with their output types."""
    layers = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        dtypes = [layer.get_output(j).dtype.name for j in range(layer.num_outputs)]
        layers.append({"name": layer.name, "type": layer.type.name, "precision": dtypes[0] if dtypes else None})
    return {"source": "network definition (before fusion; the built plan cannot be inspected without a GPU)",
            "num_layers": len(layers), "precisions": dict(Counter(x["precision"] for x in layers)),
            "layers": layers}


def _io_summary(network: Any) -> list[dict[str, Any]]:
    io = [("input", network.get_input(i)) for i in range(network.num_inputs)]
    io += [("output", network.get_output(i)) for i in range(network.num_outputs)]
    return [{"name": t.name, "mode": mode, "dtype": t.dtype.name, "shape": list(t.shape)} for mode, t in io]


def build_engine(onnx_path: str | Path, out_dir: str | Path, *, precision: str,
                 backend: str | Backend | None = None, target_cc: Sequence[str] = (),
                 profiles: Sequence[Profile], opt_level: int = 3, workspace_mb: int | None = None,
                 timing_cache: str | Path | None = None, plugins: Sequence[str | Path] = (),
                 max_positions: int | None = None, source: Mapping[str, str] | None = None,
                 extra: Mapping[str, Any] | None = None,
                 progress: Callable[[str], None] | None = None) -> BuildResult:
    """Parse ``onnx_path`` (from its path, so external data works) and write plan + manifest.

    ``profiles`` become optimization profiles 0, 1, ... in order. ``plugins`` are plugin library
    paths; when given, registered plugins override built-in importers for matching op types.
    ``max_positions`` (default: the model's ``max_position_embeddings`` metadata, else its rotary
    table length) bounds past + seq. ``source`` ({"onnx", "onnx_sha256"}) names the exported ONNX
    that ``onnx_path`` was lowered from: the manifest then points at it (the built file goes under
    ``built_onnx``). ``extra`` entries are added to (and override) the manifest;
    ``progress`` receives one line per phase.
    """
    say = progress or (lambda _msg: None)
    t_start = time.perf_counter()
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    if not onnx_path.is_file():
        raise LlmtrtUserError(f"{onnx_path}: no such ONNX file")
    if not 0 <= opt_level <= 5:
        raise LlmtrtUserError(f"--opt-level must be 0..5, got {opt_level}")
    be = backend if isinstance(backend, Backend) else get_backend(backend)
    trt = be.module()

    model = onnx.load(str(onnx_path), load_external_data=False)
    check_precision(model, precision)
    validate_profiles(profiles, max_positions or max_positions_from_model(model))
    shapes = [profile_shapes(p, graph_input_dims(model)) for p in profiles]

    logger = be.logger()
    mark = logger.mark()
    builder = trt.Builder(logger)
    plugin_paths, override = _setup_plugins(be, model, onnx_path, plugins)

    network = be.create_network(builder)
    parser = trt.OnnxParser(network, logger)
    if override:
        parser.set_flag(trt.OnnxParserFlag.ENABLE_PLUGIN_OVERRIDE)
    t_parse = time.perf_counter()
    say(f"parsing {onnx_path.name} with {be.name} {be.version()}")
    if not parser.parse_from_file(str(onnx_path)):
        failures = parser_failures(parser, model) or [NodeFailure("", "", e) for e in logger.since(mark, *_ERRORS)]
        raise UnsupportedNodesError(str(onnx_path), failures)
    parse_seconds = time.perf_counter() - t_parse

    config = builder.create_builder_config()
    config.builder_optimization_level = opt_level
    if workspace_mb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    cc_names = be.set_target_cc(config, target_cc)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    cache, cache_note = _attach_timing_cache(be, config, timing_cache)
    network_inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    for profile, per_input in zip(profiles, shapes, strict=True):
        opt_profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in per_input.items():
            if name in network_inputs:
                opt_profile.set_shape(name, lo, opt, hi)
        if config.add_optimization_profile(opt_profile) < 0:
            raise LlmtrtUserError(f"profile {profile.name!r} was rejected by TensorRT: "
                                  f"{logger.since(mark, *_ERRORS)[-1:]}")

    t_build = time.perf_counter()
    say(f"building {precision} engine: {network.num_layers} network layers, profiles "
        f"{', '.join(p.name for p in profiles)}, opt level {opt_level}"
        + (f", targets {', '.join(cc_names)}" if cc_names else ""))
    plan = builder.build_serialized_network(network, config)
    build_seconds = time.perf_counter() - t_build
    if plan is None:
        errors = "\n  ".join(logger.since(mark, *_ERRORS)[-5:]) or "(no error message)"
        raise LlmtrtUserError(f"{be.name} could not build {onnx_path.name} as {precision}:\n  {errors}\n"
                              f"If this is about attention kernels, {LOWER_HINT}")

    out_dir.mkdir(parents=True, exist_ok=True)
    plan_path, manifest_path = plan_paths(out_dir, precision)
    built_sha256 = onnx_sha256(onnx_path, model)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "kind": "tensorrt-engine",
        "kv_cache": layout_of_inputs(network_inputs).name,
        "plan": plan_path.name,
        "plan_sha256": hashlib.sha256(memoryview(plan)).hexdigest(),
        "plan_bytes": plan.nbytes,
        "precision": precision,
        "backend": {"name": be.name, "module": be.module_name, "version": be.version()},
        "target_compute_capabilities": cc_names or "backend default",
        "profiles": [{**p.to_dict(), "shapes": {k: {"min": list(v[0]), "opt": list(v[1]), "max": list(v[2])}
                                                for k, v in s.items() if k in network_inputs}}
                     for p, s in zip(profiles, shapes, strict=True)],
        "onnx": str(onnx_path),
        "onnx_sha256": built_sha256,
        **({"onnx": source["onnx"], "onnx_sha256": source["onnx_sha256"],
            "built_onnx": {"path": onnx_path.name, "sha256": built_sha256}} if source else {}),
        "builder": {"opt_level": opt_level, "workspace_mb": workspace_mb, "timing_cache": cache_note,
                    "plugins": [str(p) for p in plugin_paths], "plugin_override": override,
                    "python_plugins": _python_plugin_manifest(model)},
        "stats": {"parse_seconds": round(parse_seconds, 3), "build_seconds": round(build_seconds, 3),
                  "total_seconds": round(time.perf_counter() - t_start, 3), "peak_rss_bytes": peak_rss_bytes()},
        "io": _io_summary(network),
        "network": _network_summary(network),
        "engine": _engine_summary(be, plan),
        "warnings": logger.since(mark, "WARNING")[:50],
        **(extra or {}),
    }
    manifest_path.unlink(missing_ok=True)  # a plan never sits next to a manifest that is not its own
    write_bytes_atomically(plan_path, memoryview(plan))
    write_bytes_atomically(manifest_path, (json.dumps(manifest, indent=2) + "\n").encode())
    if cache is not None and timing_cache is not None:
        write_bytes_atomically(Path(timing_cache), memoryview(cache.serialize()))
    return BuildResult(plan_path, manifest_path, manifest)


def _setup_plugins(be: Backend, model: onnx.ModelProto, onnx_path: Path,
                   plugins: Sequence[str | Path]) -> tuple[list[Path], bool]:
    """Load plugin libraries, refuse mis-imported custom nodes, keep RTX plugin aborts out of process."""
    registry = be.plugin_registry()
    in_process = be.plugin_names()
    plugin_paths = [Path(p) for p in plugins]
    for lib in plugin_paths:
        if not lib.is_file() or registry.load_library(str(lib)) is None:
            raise LlmtrtUserError(f"plugin library {lib} could not be loaded")
    python_plugins = False
    if custom_nodes(model) and not plugin_paths and be.supports_python_plugins:
        # Our tensorrt.plugin definitions (plugins/<op>/trt_plugin.py); the nodes carry plugin_namespace.
        from llmtrt.plugins.trt_plugins import register_all

        register_all(be.module())
        python_plugins = True
    plugin_names = be.plugin_names()
    override = bool(plugin_paths) or python_plugins
    check_custom_nodes(model, be, plugin_names, override, source=onnx_path.name)
    routed = plugin_routed_ops(model, plugin_names, override)
    if routed and be.plugin_parse_may_abort:
        python_side = sorted(routed & in_process)
        if python_side and not be.supports_python_plugins:
            raise LlmtrtUserError(
                f"{be.name} cannot import {', '.join(python_side)} through in-process (Python) plugins: its ONNX "
                f"parser aborts the process (\"terminate called without an active exception\"); {LOWER_HINT}")
        _preflight_parse(be, onnx_path, plugin_paths, override)
    return plugin_paths, override


def _python_plugin_manifest(model: onnx.ModelProto) -> list[dict[str, Any]]:
    """Name, version and code checksum of each llmtrt plugin the graph's custom nodes use."""
    used = {n.op_type for n in custom_nodes(model)}
    if not used:
        return []
    from llmtrt.plugins.trt_plugins import plugin_manifest

    return [entry for entry in plugin_manifest() if entry["name"] in used]


def _engine_summary(be: Backend, plan: Any) -> dict[str, Any] | None:
    """Built-engine layers via IEngineInspector, where the backend can deserialize (needs a GPU)."""
    if not be.inspects_built_engine:
        return None
    trt = be.module()
    try:
        engine = trt.Runtime(be.logger()).deserialize_cuda_engine(plan)
        info = json.loads(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
    except Exception as exc:  # best effort: the manifest still has the network summary
        log.warning("could not inspect the built engine: %s", exc)
        return None
    layers = [layer if isinstance(layer, dict) else {"name": layer} for layer in info.get("Layers", [])]
    return {"num_layers": len(layers), "layers": layers}


def _attach_timing_cache(be: Backend, config: Any, path: str | Path | None) -> tuple[Any, str | None]:
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



# --------------------------------------------------------------------------------------------
# from an export directory (what `llmtrt build` and the pipeline call)
# --------------------------------------------------------------------------------------------
DEFAULT_MAX_PROMPT = 512


def export_profiles(kv_cache: str, max_positions: int, *, max_batch: int = 1, max_prompt: int | None = None,
                    max_kv: int | None = None) -> tuple[Profile, Profile]:
    """Prefill + decode profiles for an exported graph.

    Dynamic cache: prompts up to ``max_prompt`` (default min(512, max_positions)), decode against up
    to ``max_kv`` cached tokens (default max_positions - 1). Static cache: ``max_kv`` is the fixed
    cache length (default max_positions).
    """
    layout = get_layout(kv_cache)
    fixed = layout.fixed_capacity
    kv = max_kv if max_kv is not None else (max_positions if fixed else max_positions - 1)
    prompt = max_prompt if max_prompt is not None else min(DEFAULT_MAX_PROMPT, kv if fixed else max_positions)
    for flag, value in (("--max-batch", max_batch), ("--max-prompt", prompt), ("--max-kv", kv)):
        if value < 1:
            raise LlmtrtUserError(f"{flag} must be >= 1, got {value}")
    return layout.default_profiles(max_batch, prompt, kv)


def _other_lowerings(mode: str, dialect: str) -> str:
    works = {"custom": ["native", "inline"], "standard": ["native"], "decomposed": ["native", "inline"]}
    others = [m for m in works.get(dialect, ["native", "inline"]) if m != mode]
    if not others:
        return f"--lower {mode} is the lowering that should work for --ops {dialect} graphs; see docs/support-matrix.md"
    return (f"this was --lower {mode} on a --ops {dialect} graph; try " + " or ".join(f"`--lower {m}`" for m in others)
            + " (see docs/support-matrix.md)")


def build_from_export(export_dir: str | Path, out_dir: str | Path, *, precision: str | None = None,
                      backend: str | Backend | None = None, lower: str = "native", target_cc: Sequence[str] = (),
                      max_batch: int = 1, max_prompt: int | None = None, max_kv: int | None = None,
                      profiles: Sequence[Profile] | None = None, opt_level: int = 3,
                      workspace_mb: int | None = None, timing_cache: str | Path | None = None,
                      plugins: Sequence[str | Path] = (),
                      progress: Callable[[str], None] | None = None) -> BuildResult:
    """Lower ``export_dir``'s ONNX (read from its manifest.json) to ``out_dir/model.<lower>.onnx`` and
    build ``out_dir/engine.<precision>.plan`` + ``.json``.

    ``precision`` defaults to the export manifest's; a static-cache graph gets its cache length
    pinned in the lowered graph (TensorRT's KV-cache update needs a static sequence axis).
    """
    from llmtrt.pipelines.artifacts import MANIFEST, load_exported, read_manifest
    from llmtrt.pipelines.engine.lowering import LOWERINGS, lower_file

    say = progress or (lambda _msg: None)
    export_dir, out_dir = Path(export_dir), Path(out_dir)
    if lower not in LOWERINGS:
        raise LlmtrtUserError(f"unknown --lower {lower!r}; choose one of {', '.join(LOWERINGS)}")
    be = backend if isinstance(backend, Backend) else get_backend(backend)
    be.check_target_cc(target_cc)  # flags first: before any hashing or loading
    check_out_dir(out_dir)
    raw = read_manifest(export_dir)
    exported = load_exported(export_dir, raw)
    precision = precision or raw.get("precision") or "fp32"
    say(f"checking {exported.onnx_path} against {MANIFEST}")
    digest = onnx_sha256(exported.onnx_path)
    if digest != raw.get("onnx_sha256"):
        raise LlmtrtUserError(f"{exported.onnx_path}: its sha256 differs from {export_dir / MANIFEST} (the file "
                              "changed after export); re-run `llmtrt export`")

    model = onnx.load(str(exported.onnx_path), load_external_data=False)
    check_precision(model, precision)
    max_positions = max_positions_from_model(model) or exported.config.max_position_embeddings
    if profiles is None:
        profiles = export_profiles(exported.kv_cache, max_positions, max_batch=max_batch, max_prompt=max_prompt,
                                   max_kv=max_kv)
    kinds = {p.layout for p in profiles}
    if kinds != {exported.kv_cache}:
        raise LlmtrtUserError(f"{export_dir / MANIFEST} says kv_cache {exported.kv_cache!r}, but the profiles are "
                              f"for a {'/'.join(sorted(kinds))} cache; "
                              + ("give max_cache_length in --profiles" if get_layout(exported.kv_cache).fixed_capacity
                                 else "use past ranges, not max_cache_length, in --profiles"))
    validate_profiles(profiles, max_positions)
    dims = {"max_cache_length": profiles[0].cache} if get_layout(exported.kv_cache).fixed_capacity else {}

    with artifact_dir(out_dir) as tmp:
        lowered = tmp / f"model.{lower}.onnx"
        say(f"lowering {exported.dialect} ops with --lower {lower} -> {out_dir / lowered.name}"
            + (f" (static cache of {dims['max_cache_length']} slots)" if dims else ""))
        t_lower = time.perf_counter()
        lower_file(exported.onnx_path, lowered, lower, supported=be.supports_operator, dims=dims)
        lower_seconds = time.perf_counter() - t_lower
        extra = {
            "export": {"dir": str(export_dir.resolve()), "model_source": raw.get("model_source"),
                       "config_name": exported.config.name, "dialect": exported.dialect, "opset": exported.opset,
                       "kv_cache": exported.kv_cache, "precision": raw.get("precision", "fp32"),
                       "onnx_sha256": raw["onnx_sha256"]},
            "kv_cache": exported.kv_cache,
            "lowering": {"mode": lower, "onnx": lowered.name, "pinned_dims": dims, "seconds": round(lower_seconds, 3)},
            "max_positions": max_positions,
        }
        try:
            result = build_engine(lowered, tmp, precision=precision, backend=be, target_cc=target_cc,
                                  profiles=profiles, opt_level=opt_level, workspace_mb=workspace_mb,
                                  timing_cache=timing_cache, plugins=plugins, max_positions=max_positions,
                                  source={"onnx": str(exported.onnx_path.resolve()), "onnx_sha256": digest},
                                  extra=extra, progress=say)
        except UnsupportedNodesError as exc:
            if not any(f.op_type for f in exc.failures):
                raise
            raise UnsupportedNodesError(lowered.name, exc.failures, _other_lowerings(lower, exported.dialect)) from None
    return BuildResult(out_dir / result.plan_path.name, out_dir / result.manifest_path.name, result.manifest)
