"""Lower llmtrt custom nodes for TensorRT: ``--lower native | inline | plugin`` (the generic driver).

Each op's own rewrites live in its folder (``plugins/<op>/lowering.py``) and are reached through
its registry entry; this module only walks the graph:

* ``native``: each node with a TensorRT form (``CustomOp.tensorrt``, e.g. GroupQueryAttention ->
  Concat past ++ new + opset-23 Attention) or a standard node with one (``standard_tensorrt``:
  the standard dialect's Attention) is rewritten, and the default-domain opset raised to what the
  emitted ops need. A node whose emitted ops the backend lacks (``supported`` says no) is inlined
  instead.
* ``inline``: every local function is inlined (onnx.inliner), leaving primitive ops only.
* ``plugin``: custom nodes stay, tagged by their op's ``to_plugin`` so the parser routes them to
  the llmtrt plugins; the engine build maps them to registered plugins.

Any mode can also pin symbolic dims to numbers (``dims={"max_cache_length": 512}``): TensorRT's
KV-cache update layer (what the static-cache attention lowers to) refuses a cache whose sequence axis is
dynamic ("The KV cache tensor must have a static sequence length dimension"), so a static-cache
graph is built with its cache length fixed in the graph, not only in the profiles.

Why lowering is not optional: TensorRT's ONNX parser picks importers by op type and ignores the
domain, so ``llmtrt::RotaryEmbedding`` (inputs X, position_ids, cos, sin) is silently imported by
the built-in RotaryEmbedding importer (inputs X, cos, sin, position_ids) and
``llmtrt::GroupQueryAttention`` by the com.microsoft one ("Invalid Node"). Local functions are only
used for op types without a built-in importer (RMSNorm).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx.inliner
from onnx import helper

from llmtrt.pipelines.errors import LlmtrtUserError
from llmtrt.plugins.registry import DOMAIN, registry, tensorrt_rewrites
from llmtrt.plugins.rewrite import Names, TensorRTRewrite

STANDARD_DOMAINS = frozenset({"", "ai.onnx"})


def custom_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Top-level nodes outside the standard ONNX domain."""
    return [n for n in model.graph.node if n.domain not in STANDARD_DOMAINS]


def _set_opset(model: onnx.ModelProto, domain: str, version: int | None) -> None:
    """Set (version), raise to at least (version) or drop (None) a domain's opset import."""
    keep = [o for o in model.opset_import if o.domain != domain and not (domain == "" and o.domain == "ai.onnx")]
    current = [o.version for o in model.opset_import if o.domain == domain or (domain == "" and o.domain == "ai.onnx")]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    if version is not None:
        model.opset_import.append(helper.make_opsetid(domain, max([version, *current])))


def _prune(model: onnx.ModelProto) -> None:
    """Drop local functions and domain imports that no node uses any more."""
    used = {(n.domain, n.op_type) for n in model.graph.node}
    for f in model.functions:
        used |= {(n.domain, n.op_type) for n in f.node}
    keep = [f for f in model.functions if (f.domain, f.name) in used]
    del model.functions[:]
    model.functions.extend(keep)
    domains = {d for d, _ in used}
    for o in list(model.opset_import):
        if o.domain not in STANDARD_DOMAINS and o.domain not in domains:
            _set_opset(model, o.domain, None)


def lower_inline(model: onnx.ModelProto, **_: object) -> onnx.ModelProto:
    """Inline every local function (custom nodes become their primitive-op bodies)."""
    out = onnx.inliner.inline_local_functions(model)
    _prune(out)
    return out


def lower_native(model: onnx.ModelProto, *, supported: Callable[[str], bool] | None = None,
                 decomposable: bool = True, **_: object) -> onnx.ModelProto:
    """Rewrite custom nodes to built-in TensorRT ops; inline those the backend cannot import.

    Inlining happens first, at the model's original opset (the inliner refuses mixed opsets);
    then the rewrites run and the default-domain opset is raised to what the emitted ops need.
    """
    rewrites = tensorrt_rewrites()

    def rewrite_for(node: onnx.NodeProto) -> TensorRTRewrite | None:
        rw = rewrites.get((node.domain if node.domain != "ai.onnx" else "", node.op_type))
        if rw is None or (supported is not None and not all(map(supported, rw.emits))):
            return None
        return rw

    fallback = sorted({n.op_type for n in model.graph.node if n.domain == DOMAIN and rewrite_for(n) is None})
    if fallback:
        out = onnx.inliner.inline_selected_functions(model, [(DOMAIN, t) for t in fallback])
    else:
        out = onnx.ModelProto()
        out.CopyFrom(model)
    names = Names(out)
    new_nodes: list[onnx.NodeProto] = []
    opset = 0
    for node in out.graph.node:
        rw = rewrite_for(node)
        if rw is None:
            new_nodes.append(node)
            continue
        new_nodes.extend(rw.fn(node, names, decomposable=decomposable))
        opset = max(opset, rw.opset)
    if opset:
        _set_opset(out, "", opset)
    del out.graph.node[:]
    out.graph.node.extend(new_nodes)
    _prune(out)
    return out


def lower_plugin(model: onnx.ModelProto, **_: object) -> onnx.ModelProto:
    """Keep custom nodes for plugins, each tagged by its op's ``to_plugin`` (``plugin_namespace``,
    ``aot=1``) so TensorRT's parser routes it to ``llmtrt::<op>``; the build sets the parser's
    plugin-override flag. Ops without a plugin keep their node (and function body) untouched."""
    ops = registry()
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for i, node in enumerate(out.graph.node):
        op = ops.get(node.op_type) if node.domain == DOMAIN else None
        if op is not None and op.to_plugin is not None:
            out.graph.node[i].CopyFrom(op.to_plugin(node))
    return out


LOWERINGS: dict[str, Callable[..., onnx.ModelProto]] = {
    "native": lower_native,
    "inline": lower_inline,
    "plugin": lower_plugin,
}


def pin_dims(model: onnx.ModelProto, dims: dict[str, int]) -> None:
    """Replace symbolic dims named in ``dims`` by those numbers in graph inputs, outputs and value_info."""
    graph = model.graph
    for value in (*graph.input, *graph.output, *graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param in dims:
                dim.dim_value = int(dims[dim.dim_param])  # clears dim_param (oneof)


def lower(model: onnx.ModelProto, mode: str, *, dims: dict[str, int] | None = None,
          **options: object) -> onnx.ModelProto:
    """Apply lowering ``mode`` (native | inline | plugin), pin ``dims``, and return a new model."""
    try:
        fn = LOWERINGS[mode]
    except KeyError:
        raise LlmtrtUserError(f"unknown --lower {mode!r}; choose one of {', '.join(LOWERINGS)}") from None
    out = fn(model, **options)
    if dims:
        pin_dims(out, dims)
    return out


def lower_file(src: str | Path, dst: str | Path, mode: str, *, model: onnx.ModelProto | None = None,
               fuse: bool = False, **options: object) -> Path:
    """``lower_for_build`` without fusing GEMMs by default; returns ``dst``."""
    return lower_for_build(src, dst, mode, model=model, fuse=fuse, **options).path


@dataclass(frozen=True)
class LoweredFile:
    path: Path
    fused_groups: int       # MatMul groups sharing an input that became one MatMul + Split
    fused_bytes: int        # bytes of fused weights written next to ``path``


def lower_for_build(src: str | Path, dst: str | Path, mode: str, *, model: onnx.ModelProto | None = None,
                    fuse: bool = True, **options: object) -> LoweredFile:
    """Lower an ONNX file into ``dst`` for TensorRT without copying its weights: ``dst`` points at them.

    ``model`` is ``src`` as ``onnx_layout.weightless_model`` reads it (default: read here): weights in
    external-data files stay there, and weights stored inline in ``src`` (exports under protobuf's
    2 GB limit) are referenced at their byte offsets inside ``src``. TensorRT's parser refuses
    external-data paths that climb out of the model's directory ("Relative paths to parent (../)
    are not allowed in ONNX external weights"), so files in another directory are hard-linked (or
    symlinked) next to ``dst``. ``fuse`` turns MatMuls sharing an input into one MatMul + Split
    (``fuse_gemms``), their weights written once to ``<dst>.data``: the builder then has no
    concatenated copy to make.
    """
    from llmtrt.exporter.onnx_layout import weightless_model
    from llmtrt.pipelines.engine.fuse_gemms import fuse_shared_input_gemms

    src, dst = Path(src), Path(dst)
    lowered = lower(model if model is not None else weightless_model(src), mode, **options)
    dst.parent.mkdir(parents=True, exist_ok=True)
    _relocate_external_data(lowered, src.parent, dst.parent)
    groups, fused = 0, 0
    if fuse:
        data = dst.with_name(f"{dst.name}.data")
        data.unlink(missing_ok=True)
        report = fuse_shared_input_gemms(lowered, dst.parent, data)
        groups, fused = len(report.groups), report.bytes
    tmp = dst.with_name(f".{dst.name}.partial")
    onnx.save(lowered, str(tmp))
    tmp.replace(dst)
    return LoweredFile(dst, groups, fused)


def _relocate_external_data(model: onnx.ModelProto, src_dir: Path, dst_dir: Path) -> None:
    """Make external-data locations resolve from ``dst_dir`` without '../'."""
    if src_dir.resolve() == dst_dir.resolve():
        return
    for tensor in _all_tensors(model):
        for entry in tensor.external_data:
            if entry.key != "location":
                continue
            source = (src_dir / entry.value).resolve()
            rel = os.path.relpath(source, dst_dir.resolve())
            if not rel.startswith(".."):
                entry.value = rel
                continue
            link = dst_dir / source.name
            if not link.exists():
                try:
                    os.link(source, link)
                except OSError:
                    link.symlink_to(source)
            elif not os.path.samefile(link, source):
                raise LlmtrtUserError(f"{link} exists and is not {source}; lower into another directory")
            entry.value = source.name


def _all_tensors(model: onnx.ModelProto) -> Iterable[onnx.TensorProto]:
    yield from model.graph.initializer
    for node in model.graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                yield a.t
