"""Lower llmtrt custom nodes for TensorRT: ``--lower native | inline | plugin``.

* ``native``: each custom node becomes the ops TensorRT has built-in importers for:
  RMSNorm -> opset-23 RMSNormalization; RotaryEmbedding -> opset-23 RotaryEmbedding (inputs
  reordered); GroupQueryAttention -> two Concats (present = past ++ new) + opset-23 Attention
  without past, marked ``TRT_decomposable=1``. That attribute is TensorRT's, not ONNX's: without it
  TensorRT-RTX 1.7 refuses fp32 attention and fp16 attention with head_dim 8 ("Attention operation
  was not supported by a dedicated kernel"); with it fused kernels are still used where they exist.
  The result is a TensorRT-only graph (onnx.checker and ONNX Runtime reject the attribute).
  A node whose native op the backend lacks (``supported`` says no) is inlined instead.
* ``inline``: every local function is inlined (onnx.inliner), leaving primitive ops only.
* ``plugin``: custom nodes stay; the engine build maps them to registered plugins.

Any mode can also pin symbolic dims to numbers (``dims={"max_cache_length": 512}``): TensorRT's
KV-cache update (``TensorScatter`` / ``TRT_KVCacheUpdate``) refuses a cache whose sequence axis is
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

DOMAIN = "llmtrt"
STANDARD_DOMAINS = frozenset({"", "ai.onnx"})

Rewrite = Callable[..., list[onnx.NodeProto]]  # (node, names, **options) -> replacement nodes


class _Names:
    """Fresh tensor names that collide with nothing in the graph."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.used = {v for n in model.graph.node for v in (*n.input, *n.output)}
        self.used |= {v.name for v in (*model.graph.input, *model.graph.output, *model.graph.initializer)}

    def fresh(self, base: str) -> str:
        name, i = base, 0
        while name in self.used:
            i += 1
            name = f"{base}_{i}"
        self.used.add(name)
        return name


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    if default is None:
        raise LlmtrtUserError(f"node {node.name!r} ({node.op_type}) lacks attribute {name!r}; re-export the model")
    return default


def _base(node: onnx.NodeProto) -> str:
    return node.name or f"{node.op_type}_{node.output[0]}"


def native_rmsnorm(node: onnx.NodeProto, names: _Names, **_: object) -> list[onnx.NodeProto]:
    """RMSNorm(X, scale; epsilon) -> RMSNormalization(X, scale; axis=-1, epsilon) (stash fp32)."""
    eps = float(_attr(node, "epsilon", 1e-6))
    return [helper.make_node("RMSNormalization", list(node.input[:2]), [node.output[0]],
                             name=_base(node), axis=-1, epsilon=eps)]


def native_rotary(node: onnx.NodeProto, names: _Names, **_: object) -> list[onnx.NodeProto]:
    """RotaryEmbedding(X, position_ids, cos, sin) -> opset-23 RotaryEmbedding(X, cos, sin, position_ids)."""
    x, pos, cos, sin = node.input[:4]
    return [helper.make_node("RotaryEmbedding", [x, cos, sin, pos], [node.output[0]], name=_base(node),
                             interleaved=int(_attr(node, "interleaved", 0)))]


def _attention(base: str, q: str, k: str, v: str, mask: str, y: str, scale: float | None,
               decomposable: bool) -> onnx.NodeProto:
    """TensorRT-importable Attention: no past inputs, one output, no softmax_precision/softcap."""
    attrs: dict[str, object] = {} if scale is None else {"scale": float(scale)}
    if decomposable:
        attrs["TRT_decomposable"] = 1
    return helper.make_node("Attention", [q, k, v] + ([mask] if mask else []), [y], name=f"{base}/attention", **attrs)


def native_gqa(node: onnx.NodeProto, names: _Names, *, decomposable: bool = True, **_: object) -> list[onnx.NodeProto]:
    """GroupQueryAttention -> Concat(past, new) for K and V, then Attention(Q, K_all, V_all, mask)."""
    q, k, v, mask, past_k, past_v = node.input[:6]
    y, present_k, present_v = (list(node.output) + ["", "", ""])[:3]
    base = _base(node)
    present_k = present_k or names.fresh(f"{base}/present_key")
    present_v = present_v or names.fresh(f"{base}/present_value")
    return [
        helper.make_node("Concat", [past_k, k], [present_k], name=f"{base}/concat_key", axis=2),
        helper.make_node("Concat", [past_v, v], [present_v], name=f"{base}/concat_value", axis=2),
        _attention(base, q, present_k, present_v, mask, y, _attr(node, "scale"), decomposable),
    ]


def native_gqa_static(node: onnx.NodeProto, names: _Names, *, decomposable: bool = True,
                      **_: object) -> list[onnx.NodeProto]:
    """GroupQueryAttentionStatic -> opset-24 TensorScatter into each cache, Attention over the whole cache."""
    q, k, v, mask, key_cache, value_cache, write_indices = node.input[:7]
    y, present_k, present_v = (list(node.output) + ["", "", ""])[:3]
    base = _base(node)
    present_k = present_k or names.fresh(f"{base}/present_key")
    present_v = present_v or names.fresh(f"{base}/present_value")
    return [
        helper.make_node("TensorScatter", [key_cache, k, write_indices], [present_k], name=f"{base}/key_update",
                         axis=2, mode="linear"),
        helper.make_node("TensorScatter", [value_cache, v, write_indices], [present_v], name=f"{base}/value_update",
                         axis=2, mode="linear"),
        _attention(base, q, present_k, present_v, mask, y, _attr(node, "scale"), decomposable),
    ]


def native_attention(node: onnx.NodeProto, names: _Names, *, decomposable: bool = True,
                     **_: object) -> list[onnx.NodeProto]:
    """Standard opset-23 Attention (e.g. ``--ops standard``) -> the form TensorRT imports.

    TensorRT refuses past_key/past_value inputs, more than one output and softmax_precision, so
    the past is concatenated outside; the 4th output (qk_matmul_output) cannot be expressed.
    """
    ins = (list(node.input) + [""] * 7)[:7]
    outs = (list(node.output) + [""] * 4)[:4]
    if outs[3] or ins[6] or any(a.name in ("softcap", "qk_matmul_output_mode") and helper.get_attribute_value(a)
                                for a in node.attribute):
        return [node]  # nothing TensorRT can do with it; the parser will name the node
    q, k, v, mask, past_k, past_v = ins[:6]
    base = _base(node)
    nodes = []
    for past, new, present, kind in ((past_k, k, outs[1], "key"), (past_v, v, outs[2], "value")):
        if past:
            present = present or names.fresh(f"{base}/present_{kind}")
            nodes.append(helper.make_node("Concat", [past, new], [present], name=f"{base}/concat_{kind}", axis=2))
            new = present
        elif present:
            nodes.append(helper.make_node("Identity", [new], [present], name=f"{base}/present_{kind}"))
        if kind == "key":
            k = new
        else:
            v = new
    scale = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "scale"), None)
    causal = any(a.name == "is_causal" and helper.get_attribute_value(a) for a in node.attribute)
    attention = _attention(base, q, k, v, mask, outs[0], scale, decomposable)
    if causal:
        attention.attribute.append(helper.make_attribute("is_causal", 1))
    return nodes + [attention]


@dataclass(frozen=True)
class NativeRewrite:
    """How one op becomes TensorRT built-ins: the rewrite, the ops it emits, the opset it needs."""

    fn: Rewrite
    emits: tuple[str, ...]
    opset: int


# (domain, op type) -> rewrite.
NATIVE_REWRITES: dict[tuple[str, str], NativeRewrite] = {
    (DOMAIN, "RMSNorm"): NativeRewrite(native_rmsnorm, ("RMSNormalization",), 23),
    (DOMAIN, "RotaryEmbedding"): NativeRewrite(native_rotary, ("RotaryEmbedding",), 23),
    (DOMAIN, "GroupQueryAttention"): NativeRewrite(native_gqa, ("Attention",), 23),
    (DOMAIN, "GroupQueryAttentionStatic"): NativeRewrite(native_gqa_static, ("TensorScatter", "Attention"), 24),
    ("", "Attention"): NativeRewrite(native_attention, ("Attention",), 23),
}


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
    def rewrite_for(node: onnx.NodeProto) -> NativeRewrite | None:
        rw = NATIVE_REWRITES.get((node.domain if node.domain != "ai.onnx" else "", node.op_type))
        if rw is None or (supported is not None and not all(map(supported, rw.emits))):
            return None
        return rw

    fallback = sorted({n.op_type for n in model.graph.node if n.domain == DOMAIN and rewrite_for(n) is None})
    if fallback:
        out = onnx.inliner.inline_selected_functions(model, [(DOMAIN, t) for t in fallback])
    else:
        out = onnx.ModelProto()
        out.CopyFrom(model)
    names = _Names(out)
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
    """Keep custom nodes for plugins, tagged so TensorRT's parser routes them to the llmtrt::<op>
    plugins (``plugin_namespace``) and their ahead-of-time kernels (``aot=1``); the build sets the
    parser's plugin-override flag."""
    from llmtrt.plugins.trt_plugins import plugin_manifest, plugin_node_attributes

    with_plugins = {entry["name"] for entry in plugin_manifest()}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for node in out.graph.node:
        if node.domain == DOMAIN and node.op_type in with_plugins:
            present = {a.name for a in node.attribute}
            for name, value in plugin_node_attributes(aot=True).items():
                if name not in present:
                    node.attribute.append(helper.make_attribute(name, value))
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


def lower_file(src: str | Path, dst: str | Path, mode: str, **options: object) -> Path:
    """Lower an ONNX file without loading its external weights; ``dst`` keeps pointing at them.

    TensorRT's parser refuses external-data paths that climb out of the model's directory
    ("Relative paths to parent (../) are not allowed in ONNX external weights"), so weights in
    another directory are hard-linked (or symlinked) next to ``dst``.
    """
    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src), load_external_data=False)
    lowered = lower(model, mode, **options)
    dst.parent.mkdir(parents=True, exist_ok=True)
    _relocate_external_data(lowered, src.parent, dst.parent)
    tmp = dst.with_name(f".{dst.name}.partial")
    onnx.save(lowered, str(tmp))
    tmp.replace(dst)
    return dst


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
