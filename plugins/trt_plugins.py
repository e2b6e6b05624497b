"""TensorRT plugins for the custom ops: manifest, registration, and the Triton AOT compile step.

Each ``plugins/<op>/trt_plugin.py`` defines one plugin through TensorRT's Python plugin API
(``tensorrt.plugin``, "quickly deployable plugins", TensorRT >= 10.7; ahead-of-time kernels >= 10.9):

* ``output_shapes`` / ``output_dtypes``: pure-Python shape and type inference, used by the
  ``@trtp.register`` function and unit-tested against the torch fake implementations;
* ``aot_kernel``: which Triton kernel, signature, constexprs and launch grid the AOT implementation
  compiles (``compile_aot`` turns it into PTX; this needs triton but no GPU);
* ``define(trtp, trt)``: the decorators themselves (register / autotune / impl / aot_impl).

Nothing here imports tensorrt or triton at module level. ``register_all(trt)`` raises a
``LlmtrtUserError`` naming the missing piece when the backend has no ``plugin`` submodule
(TensorRT-RTX 1.7.1 has none: measured, see docs/plugins.md).

ONNX nodes reach a plugin when their op type is the plugin name, they carry the string attribute
``plugin_namespace = "llmtrt"`` and, for the AOT implementation, the int attribute ``aot = 1``
(``plugin_node_attributes``); the parser must run with ``ENABLE_PLUGIN_OVERRIDE`` because our
nodes also carry ONNX local functions.
"""

from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from llmtrt.exporter.errors import LlmtrtUserError

NAMESPACE = "llmtrt"
PLUGIN_MODULES = ("llmtrt.plugins.rms_norm.trt_plugin", "llmtrt.plugins.rotary_embedding.trt_plugin",
                  "llmtrt.plugins.gqa_attention.trt_plugin")
_PLUGINS_DIR = Path(__file__).resolve().parent
SHARED_CODE = ("launch.py", "trt_plugins.py")       # code every plugin runs, part of each checksum
DEFAULT_TARGET = ("cuda", 90, 32)                   # (backend, compute capability, warp size) for CPU checks
AOT_TARGET: tuple | None = None   # None: compile for the GPU the engine is built on; set to test without one

# TensorRT DataType name -> Triton pointer element type
TRITON_TYPES = {"FLOAT": "fp32", "HALF": "fp16", "BF16": "bf16", "INT64": "i64", "INT32": "i32"}


@dataclass(frozen=True)
class AotKernel:
    """Everything an ``@trtp.aot_impl`` needs besides the compiled code."""

    kernel: str                       # attribute name of the @triton.jit function in the op's kernel.py
    signature: dict[str, str]         # argument -> triton type ("*fp16", "i32", "constexpr")
    constexprs: dict[str, Any]
    num_warps: int
    grid: tuple                       # up to 3 dims, ints or symbolic shape expressions
    extra_args: tuple                 # int32 scalar arguments, in kernel order (ints or shape expressions)
    notes: dict[str, Any] = field(default_factory=dict)


def triton_type(dtype: Any) -> str:
    """Triton element type for a TensorRT DataType (or its name)."""
    name = getattr(dtype, "name", str(dtype)).upper()
    if name not in TRITON_TYPES:
        raise ValueError(f"no Triton type for TensorRT dtype {name}; supported: {', '.join(TRITON_TYPES)}")
    return TRITON_TYPES[name]


def kernel_function(op_module: str, name: str) -> Any:
    """The @triton.jit function ``name`` of ``plugins.<op>.kernel`` (imports triton)."""
    return getattr(importlib.import_module(op_module.rsplit(".", 1)[0] + ".kernel"), name)


def compile_aot(op_module: str, spec: AotKernel, target: tuple | None = None) -> tuple[bytes, bytes, dict]:
    """Compile ``spec`` to PTX: (kernel name, PTX, metadata).

    ``target`` = (backend, compute capability, warp size), e.g. DEFAULT_TARGET; None = the GPU this
    process sees (an engine build). With an explicit target no GPU is needed.
    """
    import triton
    from triton.backends.compiler import GPUTarget

    target = target or AOT_TARGET
    target = GPUTarget(*target) if target is not None else triton.runtime.driver.active.get_current_target()

    src = triton.compiler.ASTSource(fn=kernel_function(op_module, spec.kernel), signature=spec.signature,
                                    constexprs=spec.constexprs)
    compiled = triton.compile(src, target=target, options={"num_warps": spec.num_warps})
    meta = {"num_warps": compiled.metadata.num_warps, "shared": compiled.metadata.shared,
            "block_x": compiled.metadata.num_warps * 32}
    return compiled.metadata.name.encode(), compiled.asm["ptx"].encode(), meta


def plugin_node_attributes(aot: bool = True) -> dict[str, Any]:
    """Attributes a custom node needs so TensorRT's ONNX parser routes it to our plugin."""
    return {"plugin_namespace": NAMESPACE, **({"aot": 1} if aot else {})}


def _plugin_modules() -> list[ModuleType]:
    return [importlib.import_module(m) for m in PLUGIN_MODULES]


def code_checksum(files: list[Path]) -> str:
    """sha256 over (relative path, sha256 of content) of each file, in the given order."""
    h = hashlib.sha256()
    for path in files:
        h.update(str(path.relative_to(_PLUGINS_DIR.parent)).encode() + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).hexdigest().encode() + b"\n")
    return h.hexdigest()


def plugin_manifest() -> list[dict[str, Any]]:
    """One entry per plugin: name, namespace, version, op, code files and their checksum.

    Imports neither tensorrt nor triton, so ``llmtrt build`` can record it on any machine.
    """
    entries = []
    for mod in _plugin_modules():
        files = [_PLUGINS_DIR / mod.OP_DIR / f for f in mod.CODE_FILES] + [_PLUGINS_DIR / f for f in SHARED_CODE]
        entries.append({
            "name": mod.PLUGIN_NAME, "namespace": NAMESPACE, "plugin_id": f"{NAMESPACE}::{mod.PLUGIN_NAME}",
            "version": mod.PLUGIN_VERSION, "onnx_op": f"{NAMESPACE}::{mod.PLUGIN_NAME}",
            "implementations": list(mod.IMPLEMENTATIONS),
            "code_files": [str(f.relative_to(_PLUGINS_DIR.parent)) for f in files],
            "code_sha256": code_checksum(files),
        })
    return entries


def plugin_api(backend_module: ModuleType) -> ModuleType:
    """``<backend>.plugin`` (``tensorrt.plugin``), or a user error saying why plugins cannot work."""
    name = backend_module.__name__
    try:
        return importlib.import_module(f"{name}.plugin")
    except ImportError as exc:
        version = getattr(backend_module, "__version__", "unknown")
        raise LlmtrtUserError(
            f"{name} {version} has no Python plugin API ({name}.plugin: {exc}); llmtrt's plugins need "
            "NVIDIA TensorRT >= 10.9 (pip install 'llmtrt[tensorrt]'). With this backend use "
            "--lower native or --lower inline instead of --lower plugin") from None


_REGISTERED: dict[str, list[str]] = {}


def register_all(backend_module: ModuleType) -> list[str]:
    """Register every plugin with ``backend_module``'s plugin API; returns the plugin ids.

    Idempotent per backend module (``tensorrt.plugin`` refuses a second registration of a name).
    """
    key = backend_module.__name__
    if key in _REGISTERED:
        return list(_REGISTERED[key])
    trtp = plugin_api(backend_module)
    ids = []
    for mod in _plugin_modules():
        mod.define(trtp, backend_module)
        ids.append(f"{NAMESPACE}::{mod.PLUGIN_NAME}")
    _REGISTERED[key] = ids
    return list(ids)


# --------------------------------------------------------------------------------------------
# helpers shared by the plugin definitions (work on ints and on tensorrt.plugin ShapeExprs)
# --------------------------------------------------------------------------------------------
FLOAT_TYPES = ("FLOAT", "HALF", "BF16")


def const_dim(expr: Any, what: str) -> int:
    """A dimension that must be known when the engine is built (hidden size, heads, head_dim)."""
    if isinstance(expr, int):
        return expr
    if getattr(expr, "is_fake", False) or not expr.is_constant:
        raise ValueError(f"{what} must be a build-time constant (it is fixed by the model's weights)")
    return int(expr.constant_value())


def check_dtypes(op: str, names: list[str], dtypes: list[Any], same: list[str]) -> str:
    """All ``same`` inputs share one float dtype; returns its TensorRT name."""
    by_name = {n: getattr(d, "name", str(d)).upper() for n, d in zip(names, dtypes, strict=True)}
    first = by_name[same[0]]
    if first not in FLOAT_TYPES:
        raise ValueError(f"{op}: {same[0]} must be one of {', '.join(FLOAT_TYPES)}, got {first}")
    bad = [f"{n}={by_name[n]}" for n in same if by_name[n] != first]
    if bad:
        raise ValueError(f"{op}: inputs {', '.join(same)} must share {same[0]}'s dtype {first}; got {', '.join(bad)}")
    return first


def autotune_types(positions: list[str]) -> str:
    """AutoTuneCombination type string: 'T' positions take FP32|FP16|BF16, others are fixed."""
    names = {"FLOAT": "FP32", "HALF": "FP16", "BF16": "BF16"}
    cols = []
    for p in positions:
        cols.append("|".join(names[t] for t in FLOAT_TYPES) if p == "T" else "|".join([p] * len(FLOAT_TYPES)))
    return ", ".join(cols)


def aot_result(trtp: Any, op_module: str, spec: AotKernel, target: tuple | None = None) -> tuple:
    """The 4-tuple an ``@trtp.aot_impl`` returns: (name, PTX, KernelLaunchParams, SymIntExprs)."""
    name, ptx, meta = compile_aot(op_module, spec, target)
    params = trtp.KernelLaunchParams()
    for axis, dim in zip("xyz", spec.grid, strict=False):
        setattr(params, f"grid_{axis}", dim)
    params.block_x = meta["block_x"]
    params.shared_mem = meta["shared"]
    extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in spec.extra_args])
    return name, ptx, params, extra
