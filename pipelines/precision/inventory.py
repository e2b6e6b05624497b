"""What a graph computes in, read from the graph itself: the per-op precision inventory.

    from llmtrt.pipelines.precision.inventory import inventory
    inv = inventory(onnx.load("out/fp16/model.onnx", load_external_data=False))
    print(inv.summary())
    problem = inv.contradicts("fp16")        # None, or one line saying what is not fp16
    manifest["precision_inventory"] = inv.to_dict()

A pure function of the ``ModelProto``: element types come from ONNX type inference over the written
graph (initializer data is never read, so an 8B graph loaded without its external data works), and
each linear layer's scheme from the nodes feeding it. Nothing is taken from names or intentions,
except one recorded decision: ``metadata_props["llmtrt.precision.kept"]``, a JSON object
``{linear module: reason}`` of the linears the user (``--keep-fp32``) or the lm_head policy kept out
of the precision. They are listed like every other linear, and left out of :meth:`contradicts`.

A *linear* is a MatMul or Gemm whose second input is a 2-D weight: an initializer reached through
Transpose / Reshape / Cast / Identity (an fp32 or half weight, or a tied embedding table) or through
a DequantizeLinear of an int8/int4 initializer (a quantized weight). Its label (``precision``):

==========  ===================================================================================
fp32 ...    float weight and activation, MatMul computing in that type (fp32, fp16, bf16)
int8        int8 weight (DequantizeLinear) and int8 activation (QuantizeLinear -> DequantizeLinear)
int8-wo     int8 weight, float activation
int4        int4 weight (blocked or per channel), float activation
==========  ===================================================================================

Attention nodes (llmtrt GroupQueryAttention[Static], standard Attention, a bare Softmax of the
decomposed dialect) report their input/output types and the type their softmax runs in; RMSNorm
nodes (and bare ReduceMean) the type of their sum of squares.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

KEPT_METADATA = "llmtrt.precision.kept"
MIN_SHARE = 0.9
DTYPE_NAMES = {1: "fp32", 10: "fp16", 16: "bf16", 11: "fp64", 2: "uint8", 3: "int8", 21: "uint4", 22: "int4",
               6: "int32", 7: "int64", 9: "bool", 17: "fp8e4m3", 19: "fp8e5m2", 23: "fp4e2m1"}
_BITS = {2: 8, 3: 8, 21: 4, 22: 4, 17: 8, 19: 8, 23: 4}
_ELEMENT_BYTES = {1: 4, 10: 2, 16: 2, 11: 8, 2: 1, 3: 1, 21: 0.5, 22: 0.5, 6: 4, 7: 8, 9: 1}
_TRANSPARENT = ("Transpose", "Reshape", "Cast", "Identity", "Squeeze", "Unsqueeze")
_ATTENTION_OPS = ("GroupQueryAttention", "GroupQueryAttentionStatic", "Attention")
_NORM_OPS = ("RMSNorm", "RMSNormalization", "SimplifiedLayerNormalization")
# a requested precision -> the linear labels that satisfy it
ACCEPTS = {
    "fp32": ("fp32",), "fp16": ("fp16",), "bf16": ("bf16",),
    "int8": ("int8", "int8-wo"), "int8-sq": ("int8",), "int8-wo": ("int8-wo",),
    "int4": ("int4",), "int4-awq": ("int4",), "int4-rtn": ("int4",),
}


# --------------------------------------------------------------------------------------------
# what the inventory holds
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Linear:
    module: str               # "model.layers.0.self_attn.q_proj" (from the weight's name, else the node's)
    node: str                 # "/model/layers/0/self_attn/q_proj/MatMul"
    role: str                 # "linear" or "lm_head" (its output is a graph output)
    precision: str            # label, see the module doc
    activation: str           # "fp16", or "int8 per-tensor"
    weight: dict[str, Any]    # {"initializer", "storage", "scheme", ["bits", "axis", "block_size", "scale"]}
    output: str               # type the node writes
    in_features: int
    out_features: int
    flops_per_token: int      # 2 * in * out
    weight_bytes: int         # stored bytes of the weight (+ its scales)
    kept: str | None = None   # reason, when recorded as kept out of the precision


@dataclass(frozen=True)
class Attention:
    node: str
    op: str
    inputs: str               # type of Q (or of the Softmax input)
    output: str
    softmax: str              # type the softmax runs in


@dataclass(frozen=True)
class Norm:
    node: str
    op: str
    input: str
    reduction: str            # type of the sum of squares


@dataclass(frozen=True)
class Inventory:
    linears: tuple[Linear, ...]
    attention: tuple[Attention, ...] = ()
    norms: tuple[Norm, ...] = ()
    other_matmuls: tuple[dict[str, str], ...] = ()   # MatMuls without a weight (decomposed attention)
    kept: dict[str, str] = field(default_factory=dict)

    # --- shares ------------------------------------------------------------------------------
    def shares(self, linears: Iterable[Linear] | None = None) -> dict[str, dict[str, float]]:
        """{"flops": {label: share}, "weight_bytes": {label: share}} over ``linears`` (default: all)."""
        rows = list(self.linears if linears is None else linears)
        flops = sum(x.flops_per_token for x in rows) or 1
        nbytes = sum(x.weight_bytes for x in rows) or 1
        out: dict[str, dict[str, float]] = {"flops": {}, "weight_bytes": {}}
        for x in rows:
            out["flops"][x.precision] = out["flops"].get(x.precision, 0.0) + x.flops_per_token / flops
            out["weight_bytes"][x.precision] = out["weight_bytes"].get(x.precision, 0.0) + x.weight_bytes / nbytes
        return {k: {p: round(v, 6) for p, v in sorted(d.items())} for k, d in out.items()}

    def linear(self, module: str) -> Linear | None:
        return next((x for x in self.linears if x.module == module), None)

    # --- the checks ---------------------------------------------------------------------------
    def contradicts(self, precision: str, min_share: float = MIN_SHARE) -> str | None:
        """None when at least ``min_share`` of the FLOPs of the linears not recorded as kept run in
        ``precision`` (a quantize precision or an engine precision); else one line saying why not."""
        if precision not in ACCEPTS:
            raise ValueError(f"unknown precision {precision!r}; one of {', '.join(ACCEPTS)}")
        if not self.linears:
            return f"{precision}: the graph has no linear layer (MatMul on a 2-D weight) to check"
        counted = [x for x in self.linears if x.kept is None]
        if not counted:
            return None  # every linear was kept on purpose; the summary says so
        accepted = ACCEPTS[precision]
        total = sum(x.flops_per_token for x in counted)
        share = sum(x.flops_per_token for x in counted if x.precision in accepted) / total
        if share >= min_share:
            return None
        wrong = [x for x in counted if x.precision not in accepted]
        worst = max(wrong, key=lambda x: x.flops_per_token)
        labels = ", ".join(f"{p} {s:.1%}" for p, s in self.shares(counted)["flops"].items())
        return (f"only {share:.1%} of linear-layer FLOPs are {precision} (at least {min_share:.0%} needed; "
                f"{labels}); {len(wrong)} of {len(counted)} linears are not, e.g. {worst.module} computes "
                f"{worst.precision} (activation {worst.activation}, weight {worst.weight['storage']} "
                f"{worst.weight['scheme']})")

    def contradicts_mix(self, expected: dict[str, str]) -> str | None:
        """None when every linear named in ``expected`` (module -> label) has that label in the graph (a
        mixed precision: each group its own scheme); else one line naming the linears that do not."""
        if not expected:
            return "the mix names no linear layer"
        wrong = []
        for module, label in expected.items():
            found = self.linear(module)
            if found is None or found.precision != label:
                wrong.append(f"{module} is {found.precision if found else 'missing'}, not {label}")
        if not wrong:
            return None
        return f"{len(wrong)} of {len(expected)} linears differ from the mix: " + "; ".join(wrong[:3])

    # --- reports ------------------------------------------------------------------------------
    def summary(self) -> str:
        lines = []
        flops = sum(x.flops_per_token for x in self.linears)
        nbytes = sum(x.weight_bytes for x in self.linears)
        lines.append(f"linear layers: {len(self.linears)}, {flops / 1e6:.4g} MFLOP per token, "
                     f"{nbytes / 1e6:.4g} MB of weights")
        shares = self.shares()
        for label, share in sorted(shares["flops"].items(), key=lambda kv: -kv[1]):
            count = sum(1 for x in self.linears if x.precision == label)
            lines.append(f"  {label:8s} {100 * share:6.2f}% of FLOPs  {100 * shares['weight_bytes'][label]:6.2f}% "
                         f"of weight bytes  ({count} linears)")
        for x in self.linears:
            if x.role == "lm_head":
                name = "lm_head" if x.module == "lm_head" else f"lm_head ({x.module})"
                lines.append(f"{name}: {x.precision} (weight {x.weight['storage']} {x.weight['scheme']}, "
                             f"output {x.output})")
        for what, rows, attr in (("attention softmax", self.attention, "softmax"), ("norm reduction", self.norms,
                                                                                     "reduction")):
            if rows:
                counts: dict[str, int] = {}
                for r in rows:
                    counts[getattr(r, attr)] = counts.get(getattr(r, attr), 0) + 1
                lines.append(f"{what}: " + ", ".join(f"{t} ({n} nodes)" for t, n in sorted(counts.items())))
        for module, reason in self.kept.items():
            lines.append(f"kept: {module} ({reason})")
        return "\n".join(lines)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Inventory:
        """The inventory a manifest recorded (``to_dict``'s output)."""
        return cls(tuple(Linear(**x) for x in d.get("linears", [])), tuple(Attention(**x) for x in d.get("attention", [])),
                   tuple(Norm(**x) for x in d.get("norms", [])), tuple(d.get("other_matmuls", [])),
                   dict(d.get("kept", {})))

    def to_dict(self) -> dict[str, Any]:
        return {"linears": [asdict(x) for x in self.linears], "shares": self.shares(),
                "attention": [asdict(x) for x in self.attention], "norms": [asdict(x) for x in self.norms],
                "other_matmuls": [dict(x) for x in self.other_matmuls], "kept": dict(self.kept)}


# --------------------------------------------------------------------------------------------
# reading the graph
# --------------------------------------------------------------------------------------------
def infer_types(model) -> dict[str, int]:
    """Element type of every tensor of the main graph, by ONNX type inference on a weight-free copy."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(without_weights(model), check_type=False, strict_mode=False)
    g = inferred.graph
    types = {t.name: t.data_type for t in g.initializer}
    for v in (*g.input, *g.value_info, *g.output):
        if v.type.tensor_type.elem_type:
            types[v.name] = v.type.tensor_type.elem_type
    return types


def without_weights(model):
    """A copy of ``model`` whose initializers over 1 KiB are data-less external references (the
    weights themselves are never copied)."""
    import onnx

    light = onnx.ModelProto()
    light.ir_version, light.producer_name, light.producer_version = (model.ir_version, model.producer_name,
                                                                       model.producer_version)
    light.domain, light.model_version, light.doc_string = model.domain, model.model_version, model.doc_string
    for name in ("opset_import", "metadata_props", "functions"):
        getattr(light, name).extend(getattr(model, name))
    g, lg = model.graph, light.graph
    lg.name = g.name
    for name in ("node", "input", "output", "value_info", "sparse_initializer", "metadata_props"):
        getattr(lg, name).extend(getattr(g, name))
    for t in g.initializer:
        stub = lg.initializer.add()
        if len(t.raw_data) > 1024 or len(t.float_data) > 256 or len(t.int32_data) > 256:
            stub.name, stub.data_type = t.name, t.data_type
            stub.dims.extend(t.dims)
            stub.data_location = onnx.TensorProto.EXTERNAL
            entry = stub.external_data.add()
            entry.key, entry.value = "location", "stripped-for-type-inference"
        else:
            stub.CopyFrom(t)
    return light


class _Graph:
    """Lookups over one GraphProto: producers, consumers, initializers, types."""

    def __init__(self, model) -> None:
        g = model.graph
        self.model = model
        self.inits = {t.name: t for t in g.initializer}
        self.producer = {o: n for n in g.node for o in n.output if o}
        self.consumers: dict[str, list[Any]] = {}
        for n in g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.outputs = {o.name for o in g.output}
        self.types = infer_types(model)
        self.functions = {(f.domain, f.name): f for f in model.functions}

    def dtype(self, name: str) -> str:
        t = self.types.get(name)
        return DTYPE_NAMES.get(t, f"type{t}") if t else "unknown"


def _attr(node, name: str, default: Any = None) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _trace_weight(g: _Graph, name: str) -> dict[str, Any] | None:
    """Where a MatMul's second input comes from, or None when it is not a weight."""
    casts: list[str] = []
    transposed = False
    while name not in g.inits:
        node = g.producer.get(name)
        if node is None:
            return None
        if node.op_type == "DequantizeLinear":
            return _quantized_weight(g, node, casts)
        if node.op_type == "Constant":
            return None
        if node.op_type not in _TRANSPARENT or not node.input:
            return None
        if node.op_type == "Cast":
            casts.append(g.dtype(node.output[0]))
        transposed ^= node.op_type == "Transpose"
        name = node.input[0]
    t = g.inits[name]
    if len(t.dims) != 2:
        return None
    storage = DTYPE_NAMES.get(t.data_type, f"type{t.data_type}")
    return {"initializer": name, "storage": storage, "scheme": "cast to " + casts[-1] if casts else "as stored",
            "dims": list(t.dims), "transposed": transposed, "bytes": int(_numel(t.dims) * _ELEMENT_BYTES.get(
                t.data_type, 4))}


def _quantized_weight(g: _Graph, dq, casts: list[str]) -> dict[str, Any] | None:
    values = g.inits.get(dq.input[0])
    scale = g.inits.get(dq.input[1]) if len(dq.input) > 1 else None
    if values is None or len(values.dims) != 2 or values.data_type not in _BITS:
        return None
    bits = _BITS[values.data_type]
    block = _attr(dq, "block_size", 0)
    axis = _attr(dq, "axis", 1)
    scale_bytes = int(_numel(scale.dims) * _ELEMENT_BYTES.get(scale.data_type, 4)) if scale is not None else 0
    scheme = (f"int{bits} blocked along axis {axis}, block {block}" if block else
              f"int{bits} per-channel along axis {axis}" if scale is not None and _numel(scale.dims) > 1 else
              f"int{bits} per-tensor")
    return {"initializer": values.name, "storage": DTYPE_NAMES[values.data_type], "scheme": scheme, "bits": bits,
            "axis": axis, "block_size": block, "scale": scale.name if scale is not None else None,
            "scale_type": DTYPE_NAMES.get(scale.data_type, "?") if scale is not None else None,
            "dims": list(values.dims), "transposed": False,
            "bytes": int(_numel(values.dims) * bits / 8) + scale_bytes}


def _activation(g: _Graph, name: str) -> str:
    node = g.producer.get(name)
    if node is not None and node.op_type == "DequantizeLinear":
        q = g.producer.get(node.input[0])
        if q is not None and q.op_type == "QuantizeLinear":
            zp = g.inits.get(q.input[2]) if len(q.input) > 2 else None
            qtype = zp.data_type if zp is not None else _attr(q, "output_dtype", 2) or 2
            return f"int{_BITS.get(qtype, 8)} per-tensor"
    return g.dtype(name)


def _label(activation: str, weight: dict[str, Any], compute: str) -> str:
    if "bits" in weight:
        if weight["bits"] == 4:
            return "int4"
        return "int8" if activation.startswith("int8") else "int8-wo"
    return compute


def _is_graph_output(g: _Graph, name: str) -> bool:
    seen = 0
    while seen < 8:
        if name in g.outputs:
            return True
        users = g.consumers.get(name, [])
        if len(users) != 1 or users[0].op_type not in ("Cast", "Identity"):
            return False
        name = users[0].output[0]
        seen += 1
    return False


def _module(node, weight: dict[str, Any]) -> str:
    init = weight["initializer"]
    for suffix in (".weight_t.int8", ".weight_t.int4", ".weight_t"):
        base = init.split(suffix)[0] if suffix in init else None
        if base:
            return base
    scope = [p for p in node.name.split("/") if p][:-1]
    return ".".join(scope) if scope else node.name or init


def _numel(dims) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


# --------------------------------------------------------------------------------------------
# the inventory
# --------------------------------------------------------------------------------------------
def inventory(model) -> Inventory:
    """The precision inventory of ``model`` (an onnx.ModelProto; its weights need not be loaded)."""
    g = _Graph(model)
    kept = _kept(model)
    linears, others = [], []
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
            continue
        weight = _trace_weight(g, node.input[1])
        if weight is None:
            others.append({"node": node.name, "a": g.dtype(node.input[0]), "b": g.dtype(node.input[1]),
                           "output": g.dtype(node.output[0])})
            continue
        rows, cols = weight["dims"]
        in_f, out_f = (cols, rows) if weight.pop("transposed") ^ (node.op_type == "Gemm" and _attr(node, "transB", 0)) \
            else (rows, cols)
        weight.pop("dims")
        nbytes = weight.pop("bytes")
        activation = _activation(g, node.input[0])
        compute = g.dtype(node.input[0]) if g.dtype(node.input[0]) == g.dtype(node.input[1]) else "mixed"
        module = _module(node, weight)
        linears.append(Linear(module, node.name, "lm_head" if _is_graph_output(g, node.output[0]) else "linear",
                              _label(activation, weight, compute), activation, weight, g.dtype(node.output[0]),
                              in_f, out_f, 2 * in_f * out_f, nbytes, kept.get(module)))
    return Inventory(tuple(linears), tuple(_attention(g)), tuple(_norms(g)), tuple(others), kept)


def _kept(model) -> dict[str, str]:
    for prop in model.metadata_props:
        if prop.key == KEPT_METADATA:
            try:
                value = json.loads(prop.value)
            except json.JSONDecodeError:
                return {}
            return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}
    return {}


def _attention(g: _Graph) -> list[Attention]:
    out = []
    for node in g.model.graph.node:
        if node.op_type in _ATTENTION_OPS:
            q, y = g.dtype(node.input[0]), g.dtype(node.output[0])
            if node.domain in ("", "ai.onnx"):
                sp = _attr(node, "softmax_precision")
                softmax = DTYPE_NAMES.get(sp, f"type{sp}") if sp else q
            else:
                softmax = _function_type(g, node, "Softmax")
            out.append(Attention(node.name, node.op_type, q, y, softmax))
        elif node.op_type == "Softmax" and node.domain in ("", "ai.onnx"):
            t = g.dtype(node.input[0])
            out.append(Attention(node.name, "Softmax", t, g.dtype(node.output[0]), t))
    return out


def _norms(g: _Graph) -> list[Norm]:
    out = []
    for node in g.model.graph.node:
        if node.op_type in _NORM_OPS:
            x = g.dtype(node.input[0])
            if node.domain in ("", "ai.onnx"):
                stash = _attr(node, "stash_type", 1)
                reduction = DTYPE_NAMES.get(stash, f"type{stash}")
            else:
                reduction = _function_type(g, node, "ReduceMean")
            out.append(Norm(node.name, node.op_type, x, reduction))
        elif node.op_type == "ReduceMean" and node.domain in ("", "ai.onnx"):
            t = g.dtype(node.input[0])
            out.append(Norm(node.name, "ReduceMean", t, t))
    return out


def _function_type(g: _Graph, node, op_type: str) -> str:
    """The input type of the first ``op_type`` node in ``node``'s function body, given the node's input types."""
    fn = g.functions.get((node.domain, node.op_type))
    if fn is None:
        return "unknown"
    types = body_types(fn, [g.types.get(i) for i in node.input])
    inner = next((n for n in fn.node if n.op_type == op_type), None)
    if inner is None:
        return "unknown"
    t = types.get(inner.input[0])
    return DTYPE_NAMES.get(t, "unknown") if t else "unknown"


def body_types(fn, input_types: list[int | None]) -> dict[str, int]:
    """Element types inside a function body from its inputs' (enough for Cast islands: Cast sets,
    CastLike copies, Shape gives int64, Constant its value's type, every other op its first float input's)."""
    from onnx import TensorProto

    types: dict[str, int] = {n: t for n, t in zip(fn.input, input_types, strict=False) if t}
    floats = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)
    for n in fn.node:
        if n.op_type == "Cast":
            out = _attr(n, "to")
        elif n.op_type == "CastLike":
            out = types.get(n.input[1])
        elif n.op_type in ("Shape", "Size"):
            out = TensorProto.INT64
        elif n.op_type == "Constant":
            a = n.attribute[0]
            out = (TensorProto.FLOAT if a.name.startswith("value_float") else
                   TensorProto.INT64 if a.name.startswith("value_int") else a.t.data_type if a.name == "value" else None)
        else:
            known = [types[i] for i in n.input if i in types]
            out = next((t for t in known if t in floats), known[0] if known else None)
        for o in n.output:
            if out:
                types[o] = out
    return types
