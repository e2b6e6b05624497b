"""fp16 / bf16 graphs: every node computes in the half type unless it has a reason not to.

    plan = convert_to_half(graph, ir.DataType.FLOAT16, pinned={node: "why"}, kv_cache_io="fp32")
    for target, source in plan.to_half: sink.put_blocks(target, half_blocks(source, ...), ...)

The rule, node by node in graph order:

- a *pinned* node computes in fp32 (``--keep-fp32`` names, ``logits``, tensors calibration saw
  overflow fp16); its fp32 outputs are cast back to half where an unpinned node reads them, so a
  pinned node is an island with Casts at its boundary and never drags its neighbours into fp32;
- a node whose computed float inputs are all fp32 *and* come from an exporter island (a
  ``Cast(to=FLOAT)`` ... ``CastLike`` pair: the decomposed RMSNorm and softmax) stays fp32 inside it;
- every other node computes in half (half weights, half activations).

Reductions that need fp32 get it inside their op, which is why RMSNorm and attention nodes are not
pinned: llmtrt.RMSNorm's body and RMSNormalization(stash_type=1) reduce in fp32, llmtrt
GroupQueryAttention's body and Attention(softmax_precision=FLOAT) run the softmax in fp32. The
``norm`` / ``softmax`` categories make sure of it (stash_type / softmax_precision set, a bare half
Softmax pinned). A float initializer takes the type of the nodes reading it; read in both types it
is stored twice (the fp32 copy keeps its name, the half one gets ``.fp16`` / ``.bf16``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llmtrt.pipelines.precision import quant_math as qm

_TRANSPARENT = ("Cast", "CastLike")


@dataclass
class HalfPlan:
    half: Any                                   # ir.DataType
    label: str                                  # "fp16" / "bf16"
    to_half: list[tuple[Any, Any]] = field(default_factory=list)   # (target value, fp32 source value)
    pinned: dict[str, str] = field(default_factory=dict)            # node name -> reason
    casts: int = 0
    attributes: list[str] = field(default_factory=list)             # attributes set (stash_type, ...)


def label_of(half) -> str:
    import onnx_ir as ir

    return "fp16" if half == ir.DataType.FLOAT16 else "bf16"


def _float_attr_to_half(node, half) -> None:
    """A ConstantOfShape / Constant fill value written in the half type."""
    import onnx_ir as ir

    attr = node.attributes.get("value")
    if attr is not None and attr.type == ir.AttributeType.TENSOR and attr.value.dtype == ir.DataType.FLOAT:
        array = attr.value.numpy().astype(np.float32)
        node.attributes["value"] = ir.AttrTensor("value", half_tensor(array, half, attr.value.name))


def half_tensor(array: np.ndarray, half, name: str | None = None):
    import onnx
    import onnx_ir as ir

    from llmtrt.pipelines.precision.graph import raw_bytes

    proto = onnx.helper.make_tensor(name or "", int(half), list(array.shape), raw_bytes(array, half), raw=True)
    return ir.serde.TensorProtoTensor(proto)


def constants_to_initializers(graph) -> None:
    """Float Constant nodes become initializers, so every float constant is typed by its readers."""
    import onnx_ir as ir

    for node in list(graph):
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or len(node.attributes) != 1:
            continue
        (attr,) = node.attributes.values()
        if attr.name == "value" and attr.value.dtype == ir.DataType.FLOAT:
            array = attr.value.numpy().astype(np.float32)
        elif attr.name in ("value_float", "value_floats"):
            array = np.asarray(attr.value, dtype=np.float32)
        else:
            continue
        out = node.outputs[0]
        value = ir.Value(name=out.name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.FLOAT),
                         const_value=ir.Tensor(array, name=out.name))
        out.name = out.name + ".constant"
        out.replace_all_uses_with(value, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        graph.register_initializer(value)


def convert_to_half(graph, half, *, pinned: dict[Any, str], kv_cache_io: str = "fp32",
                    keep: tuple[str, ...] = ("norm", "softmax")) -> HalfPlan:
    """Retype ``graph`` (an onnx_ir Graph of an fp32 export) to ``half`` in place; the data of the
    initializers to convert is left to the caller (``plan.to_half``), so weights stream."""
    plan = HalfPlan(half, label_of(half))
    constants_to_initializers(graph)
    if "norm" in keep:
        _fp32_norm_reductions(graph, plan)
    if "softmax" in keep:
        _fp32_softmax_attribute(graph, plan)
    pins = dict(pinned)
    for _ in range(3):  # a bare Softmax found in half is pinned, and the types are worked out again
        typing = _Typing(graph, half, pins, kv_cache_io)
        late = {n: "softmax: a Softmax outside an fp32 island, pinned to fp32" for n in typing.nodes
                if "softmax" in keep and n.op_type == "Softmax" and typing.mode.get(n) == half and n not in pins}
        if not late:
            break
        pins.update(late)
    typing.apply(plan)
    plan.pinned = {(n.name or n.outputs[0].name): r for n, r in pins.items()}
    return plan


class _Typing:
    """Pass 1: the type each node computes in and each computed float tensor ends up with."""

    def __init__(self, graph, half, pinned: dict[Any, str], kv_cache_io: str) -> None:
        import onnx_ir as ir

        F = ir.DataType.FLOAT
        self.graph, self.half, self.pinned, self.kv_cache_io = graph, half, dict(pinned), kv_cache_io
        self.flexible = {v for v in graph.initializers.values() if v.dtype == F}
        self.nodes = list(graph)
        self.dtype: dict[Any, Any] = {}
        self.origin: dict[Any, str] = {}      # "half" | "island" | "boundary"
        self.mode: dict[Any, Any] = {}        # node -> F / half / None (Cast, CastLike)
        self.like_type: dict[Any, Any] = {}
        self.uses: dict[Any, set] = {}
        for v in graph.inputs:
            if v.dtype == F:
                half_io = kv_cache_io == "half" and v.name.startswith("past_key_values.")
                self.dtype[v] = half if half_io else F
                self.origin[v] = "half" if half_io else "boundary"
        self._pin_constant_feeders()
        for n in self.nodes:
            self._visit(n)

    def _runtime_float(self, v) -> bool:
        import onnx_ir as ir

        return v is not None and v not in self.flexible and v.dtype == ir.DataType.FLOAT and not v.is_initializer()

    def _pin_constant_feeders(self) -> None:
        """Constant-only nodes (a Transpose of a weight) feeding only pinned nodes stay fp32 with them."""
        changed = True
        while changed:
            changed = False
            for n in self.nodes:
                if n in self.pinned or any(self._runtime_float(i) for i in n.inputs):
                    continue
                if not any(i in self.flexible for i in n.inputs if i is not None):
                    continue
                users = [u.node for o in n.outputs for u in o.uses()]
                if users and all(u in self.pinned for u in users):
                    self.pinned[n] = "feeds only fp32 nodes"
                    changed = True

    def _use(self, v, t) -> None:
        if v is not None and v in self.flexible:
            self.uses.setdefault(v, set()).add(t)

    def _visit(self, n) -> None:
        import onnx_ir as ir

        F, half = ir.DataType.FLOAT, self.half
        if n.op_type == "Cast":
            self.mode[n] = None
            out_t = ir.DataType(n.attributes["to"].value)
            self._use(n.inputs[0], F)
            origin = "island" if out_t == F else "half"
        elif n.op_type == "CastLike":
            self.mode[n] = None
            like = n.inputs[1]
            out_t = half if like in self.flexible else self.dtype.get(like, like.dtype)
            self.like_type[n] = out_t
            self._use(n.inputs[0], F)
            self._use(like, out_t)
            origin = "island" if out_t == F else "half"
        else:
            computed = [(self.dtype[i], self.origin[i]) for i in n.inputs if self._runtime_float(i) and i in self.dtype]
            if n in self.pinned:
                m = F
            elif computed and all(t == F for t, _ in computed) and any(o == "island" for _, o in computed):
                m = F
            else:
                m = half
            self.mode[n] = out_t = m
            for i in n.inputs:
                self._use(i, m)
            origin = "boundary" if n in self.pinned else ("island" if m == F else "half")
        for o in n.outputs:
            if o.dtype == F:
                self.dtype[o] = out_t if out_t in (F, half) else F
                self.origin[o] = origin

    # --- pass 2 ---------------------------------------------------------------------------------
    def apply(self, plan: HalfPlan) -> None:
        import onnx_ir as ir

        F, half, label = ir.DataType.FLOAT, self.half, plan.label
        copies = {}
        for v in self.flexible:
            u = self.uses.get(v, set())
            if half not in u:
                continue
            if F in u:
                copy = ir.Value(name=f"{v.name}.{label}", shape=v.shape, type=ir.TensorType(half))
                self.graph.register_initializer(_placeholder(copy, v))
                copies[v] = copy
                plan.to_half.append((copy, v))
            else:
                plan.to_half.append((v, v))
        casts: dict[tuple[Any, Any], Any] = {}
        for n in self.nodes:
            m = self.mode[n]
            for pos, v in enumerate(n.inputs):
                if v is None:
                    continue
                if v in self.flexible:
                    want = m if m is not None else (self.like_type[n] if n.op_type == "CastLike" and pos == 1 else F)
                    if want == half and v in copies:
                        n.replace_input_with(pos, copies[v])
                elif m is not None and self._runtime_float(v) and self.dtype.get(v, F) != m:
                    key = (v, m)
                    if key not in casts:
                        names = {F: "fp32", half: label}
                        out = ir.Value(name=f"{v.name}.{names[m]}", shape=v.shape, type=ir.TensorType(m))
                        cast = ir.Node("", "Cast", [v], [ir.AttrInt64("to", int(m))], outputs=[out],
                                       name=f"/precision/{v.name}/Cast_to_{names[m]}")
                        self.graph.insert_before(n, cast)
                        casts[key] = out
                    n.replace_input_with(pos, casts[key])
            if m == half:
                _float_attr_to_half(n, half)
        for v, t in self.dtype.items():
            if not v.is_graph_input():
                v.dtype = t
            elif t == half:
                v.dtype = half
        for v, _ in plan.to_half:
            v.dtype = half
        plan.casts = len(casts)
        self._outputs(plan)

    def _outputs(self, plan: HalfPlan) -> None:
        """logits stay fp32; present.* follow kv_cache_io; a Cast named after the output where needed."""
        import onnx_ir as ir

        F, half = ir.DataType.FLOAT, self.half
        for k, out in enumerate(list(self.graph.outputs)):
            have = out.dtype
            if have not in (F, half):
                continue
            want = half if self.kv_cache_io == "half" and out.name.startswith("present.") else F
            if have == want:
                continue
            name = out.name
            out.name = f"{name}.{label_of(have) if have == half else 'fp32'}"
            new = ir.Value(name=name, shape=out.shape, type=ir.TensorType(want))
            cast = ir.Node("", "Cast", [out], [ir.AttrInt64("to", int(want))], outputs=[new],
                           name=f"/precision/{name}/Cast_to_{label_of(want) if want == half else 'fp32'}")
            self.graph.append(cast)
            self.graph.outputs[k] = new
            plan.casts += 1


def _placeholder(value, like):
    """``value`` registered as an initializer whose data will come from ``like`` (converted later)."""
    value.const_value = like.const_value
    return value


def _fp32_norm_reductions(graph, plan: HalfPlan) -> None:
    for n in graph:
        if n.op_type == "RMSNormalization" and n.domain in ("", "ai.onnx"):
            stash = n.attributes.get("stash_type")
            if stash is not None and stash.value != 1:
                import onnx_ir as ir

                n.attributes["stash_type"] = ir.AttrInt64("stash_type", 1)
                plan.attributes.append(f"{n.name}: stash_type=1")


def _fp32_softmax_attribute(graph, plan: HalfPlan) -> None:
    import onnx_ir as ir

    for n in graph:
        if n.op_type == "Attention" and n.domain in ("", "ai.onnx"):
            sp = n.attributes.get("softmax_precision")
            if sp is None or sp.value != int(ir.DataType.FLOAT):
                n.attributes["softmax_precision"] = ir.AttrInt64("softmax_precision", int(ir.DataType.FLOAT))
                plan.attributes.append(f"{n.name}: softmax_precision=FLOAT")


# --------------------------------------------------------------------------------------------
# one linear in half precision inside an fp32 graph (the quantized precisions' lm_head)
# --------------------------------------------------------------------------------------------
def cast_after(graph, node, to) -> Any:
    """Cast ``node``'s first output to ``to`` under its own name (the node's value is renamed)."""
    import onnx_ir as ir

    out = node.outputs[0]
    name = out.name
    have = out.dtype
    out.name = f"{name}.{_names(have)}"
    new = ir.Value(name=name, shape=out.shape, type=ir.TensorType(to))
    out.replace_all_uses_with(new, replace_graph_outputs=True)
    cast = ir.Node("", "Cast", [out], [ir.AttrInt64("to", int(to))], outputs=[new],
                   name=f"{node.name or name}/Cast_to_{_names(to)}")
    graph.insert_after(node, cast)
    return new


def _names(t) -> str:
    import onnx_ir as ir

    return {ir.DataType.FLOAT: "fp32", ir.DataType.FLOAT16: "fp16", ir.DataType.BFLOAT16: "bf16"}.get(t, str(t))


def half_linear(rw, lin, half) -> None:
    """``lin`` computes in ``half``: its input cast in, its weight stored half (a tied table too, read
    through its Transpose), its output cast back to fp32 under its own name."""
    import onnx_ir as ir

    from llmtrt.pipelines.precision.graph import node_prefix

    x = lin.x
    xh = ir.Value(name=f"{x.name}.{_names(half)}", shape=x.shape, type=ir.TensorType(half))
    rw.graph.insert_before(lin.node, ir.Node("", "Cast", [x], [ir.AttrInt64("to", int(half))], outputs=[xh],
                                             name=f"{node_prefix(lin.node)}/input/Cast_to_{_names(half)}"))
    lin.node.replace_input_with(0, xh)
    rw.convert(lin.weight, half)
    if lin.transposed:
        lin.node.inputs[1].dtype = half
    lin.node.outputs[0].dtype = half
    cast_after(rw.graph, lin.node, ir.DataType.FLOAT)


# --------------------------------------------------------------------------------------------
# the data
# --------------------------------------------------------------------------------------------
def half_blocks(source, half, counter: list[int] | None = None):
    """The fp32 initializer ``source`` as blocks for the half type (fp16: finite values clamped to
    +-65504, counted in ``counter[0]``; bf16: round to nearest even)."""
    import onnx_ir as ir

    from llmtrt.pipelines.precision.graph import iter_rows

    for block in iter_rows(source):
        block = block.astype(np.float32, copy=False)
        if half == ir.DataType.FLOAT16:
            out, clamped = qm.to_fp16(block)
            if counter is not None:
                counter[0] += clamped
            yield out
        else:
            yield block  # raw_bytes rounds to bf16
