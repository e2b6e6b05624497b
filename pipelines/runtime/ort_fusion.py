"""ONNX Runtime's contrib kernels for a standard-dialect graph: the form ONNX Runtime runs fastest.

    proto, fused = fuse_for_ort(onnx.load(path, load_external_data=False))
    fused.attention, fused.norms   # how many nodes became GroupQueryAttention / SkipSimplifiedLayerNormalization

Per layer, the standard dialect writes (``exporter/dialects.py``)::

    qkv = MatMul(x, W_qkv)                      # fused projections ([batch, seq, (N + 2 Nkv) H])
    Reshape -> Transpose -> Split(q+k, v) -> RotaryEmbedding(q+k) -> Split(q, k)
    Attention(q, k, v, bias, past_k, past_v) -> Transpose -> Reshape -> o_proj
    h = Add(h, o_proj(...)); n = RMSNormalization(h)

and this pass rewrites it to ONNX Runtime's com.microsoft kernels, which work on [batch, seq, heads *
head_dim] directly (no Reshape/Transpose), attend to a grouped KV cache without expanding it, and add the
residual inside the norm::

    Split(qkv -> q, k, v); RotaryEmbedding(q), RotaryEmbedding(k)       # com.microsoft, per-token positions
    GroupQueryAttention(q, k, v, past_k, past_v, seqlens_k, total_len, attention_bias=bias)
    n, _, _, h = SkipSimplifiedLayerNormalization(h, o_proj(...), gamma)

Same numbers: rotary stays a separate node fed the graph's own ``position_ids`` (GroupQueryAttention's
built-in rotary takes only the first position of a prompt, which a left-padded row breaks), and the
graph's additive attention bias (causal + padding mask) goes in as ``attention_bias`` with
``seqlens_k = total - 1`` for every row, so padding is masked exactly as the standard Attention masks it.
Only what matches the pattern is rewritten; anything else (a static cache's TensorScatter, unfused q/k/v)
is left standard, and ``Fused`` says what was done. The KV-cache IO (past in, past + seq out) is unchanged.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

MS = "com.microsoft"
_STD = ("", "ai.onnx")


@dataclass
class Fused:
    attention: int = 0   # Attention chains -> GroupQueryAttention
    norms: int = 0       # Add + RMSNormalization -> SkipSimplifiedLayerNormalization
    skipped: str = ""    # why an Attention was left as it was (the first reason seen)

    def __str__(self) -> str:
        return f"{self.attention} GroupQueryAttention, {self.norms} SkipSimplifiedLayerNormalization"


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


class _Graph:
    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.producer = {o: n for n in graph.node for o in n.output if o}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for n in graph.node:
            for i in n.input:
                if i:
                    self.consumers[i].append(n)
        self.outputs = {o.name for o in graph.output}
        self.constants = {t.name: t for t in graph.initializer}

    def only(self, name: str, op: str) -> onnx.NodeProto | None:
        """The producer of ``name`` if it is a default-domain ``op`` whose outputs have one consumer each."""
        node = self.producer.get(name)
        if node is None or node.op_type != op or node.domain not in _STD:
            return None
        if any(len(self.consumers[o]) != 1 or o in self.outputs for o in node.output if o):
            return None
        return node

    def single_consumer(self, name: str, op: str) -> onnx.NodeProto | None:
        users = self.consumers[name]
        if len(users) != 1 or name in self.outputs or users[0].op_type != op or users[0].domain not in _STD:
            return None
        return users[0]

    def ints(self, name: str) -> list[int] | None:
        """The values of an int64 initializer or Constant."""
        if name in self.constants:
            return [int(v) for v in numpy_helper.to_array(self.constants[name]).reshape(-1)]
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            value = _attr(node, "value")
            if value is not None:
                return [int(v) for v in numpy_helper.to_array(value).reshape(-1)]
        return None


def _split_sizes(g: _Graph, node: onnx.NodeProto) -> list[int] | None:
    return g.ints(node.input[1]) if len(node.input) > 1 and node.input[1] else None


def _match_attention(g: _Graph, att: onnx.NodeProto) -> tuple[dict, str]:
    """The nodes of one standard attention chain, or ({}, why not)."""
    ins = list(att.input) + [""] * 7
    outs = list(att.output) + [""] * 4
    if not (ins[4] and ins[5] and outs[1] and outs[2]) or ins[6] or outs[3]:
        return {}, "an Attention without past/present KV inputs and outputs (or with nonpad_kv_seqlen)"
    if not ins[3]:
        return {}, "an Attention without an attention mask"
    if _attr(att, "is_causal", 0) or _attr(att, "softcap", 0.0):
        return {}, "an Attention with is_causal or softcap"
    q_split = g.only(ins[0], "Split")
    if q_split is None or q_split.output[1] != ins[1] or len(q_split.output) != 2:
        return {}, "q and k do not come from one Split (unfused q/k/v: export with --fuse)"
    rotary = g.only(q_split.input[0], "RotaryEmbedding")
    if rotary is None or _attr(rotary, "rotary_embedding_dim", 0) or len(rotary.input) < 4:
        return {}, "q+k do not come from one full-width RotaryEmbedding"
    kv_split = g.only(rotary.input[0], "Split")
    if kv_split is None or kv_split.output[1] != ins[2] or len(kv_split.output) != 2:
        return {}, "q+k and v do not come from one Split"
    transpose = g.only(kv_split.input[0], "Transpose")
    if transpose is None or list(_attr(transpose, "perm", [])) != [0, 2, 1, 3]:
        return {}, "the heads split does not follow a [0, 2, 1, 3] Transpose"
    reshape = g.only(transpose.input[0], "Reshape")
    if reshape is None:
        return {}, "the projection is not reshaped into heads"
    out_t = g.single_consumer(outs[0], "Transpose")
    out_r = g.single_consumer(out_t.output[0], "Reshape") if out_t is not None else None
    if out_r is None or list(_attr(out_t, "perm", [])) != [0, 2, 1, 3]:
        return {}, "the attention output is not transposed and reshaped back to [batch, seq, hidden]"
    heads, kv_heads = _attr(att, "q_num_heads"), _attr(att, "kv_num_heads")
    if _split_sizes(g, kv_split) != [heads + kv_heads, kv_heads] or _split_sizes(g, q_split) != [heads, kv_heads]:
        return {}, "the q/k/v split sizes are not [heads + kv_heads, kv_heads] and [heads, kv_heads]"
    return {"att": att, "q_split": q_split, "rotary": rotary, "kv_split": kv_split, "transpose": transpose,
            "reshape": reshape, "out_t": out_t, "out_r": out_r, "heads": heads, "kv_heads": kv_heads}, ""


def _head_dim(g: _Graph, rotary: onnx.NodeProto) -> int | None:
    cos = g.constants.get(rotary.input[1])
    return 2 * int(cos.dims[1]) if cos is not None and len(cos.dims) == 2 else None


_PREFIX = "/llmtrt_ort"
_TOTAL = f"{_PREFIX}/total_sequence_length"   # int32 scalar: the attention mask's width
_SEQLENS = f"{_PREFIX}/seqlens_k"             # int32 [batch]: total - 1 for every row (the bias masks padding)
_QUERY_LENS = f"{_PREFIX}/query_seqlens"      # int32 [batch]: the new tokens, all valid


def fuse_for_ort(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, Fused]:
    """Rewrite ``proto`` (a standard-dialect graph, any precision) in place for ONNX Runtime; see the module doc."""
    fused = Fused()
    original = _custom_to_standard(proto)  # the custom op set: its nodes' standard forms first
    g = _Graph(proto.graph)
    replace: dict[int, list[onnx.NodeProto]] = {}  # id(node) -> what takes its place
    drop: set[int] = set()
    matches = []
    for att in [n for n in proto.graph.node if n.op_type == "Attention" and n.domain in _STD]:
        m, why = _match_attention(g, att)
        if m:
            m["head_dim"] = _head_dim(g, m["rotary"])
        if m and m["head_dim"] is None:
            m, why = {}, "the rotary cos table is not a 2-D initializer"
        if not m:
            fused.skipped = fused.skipped or why
            continue
        matches.append(m)
    if original is not None and (fused.skipped or not matches):  # a custom graph this cannot fully rewrite
        del proto.graph.node[:]
        proto.graph.node.extend(original)
        return proto, Fused(skipped=fused.skipped or "no attention to rewrite")
    shared = _shared_inputs(proto) if matches else []
    for m in matches:
        replace[id(m["att"])] = _attention_nodes(proto, m, m["head_dim"])
        drop.update(id(m[key]) for key in ("q_split", "rotary", "kv_split", "transpose", "reshape", "out_t", "out_r"))
        fused.attention += 1
    for norm in [n for n in proto.graph.node if n.op_type == "RMSNormalization" and n.domain in _STD]:
        add = g.producer.get(norm.input[0])
        if add is None or add.op_type != "Add" or add.domain not in _STD or id(add) in drop:
            continue
        if _attr(norm, "axis", -1) != -1 or _attr(norm, "stash_type", 1) != 1 or len(norm.input) != 2:
            continue
        users = [u for u in g.consumers[add.output[0]] if u is not norm]
        total = add.output[0] if users or add.output[0] in g.outputs else ""
        replace[id(add)] = [helper.make_node(
            "SkipSimplifiedLayerNormalization", [add.input[0], add.input[1], norm.input[1]],
            [norm.output[0], "", "", total], name=norm.name.rsplit("/", 1)[0] + "/skip_simplified_layer_norm",
            domain=MS, epsilon=float(_attr(norm, "epsilon", 1e-5)))]
        drop.add(id(norm))
        fused.norms += 1
    if not (fused.attention or fused.norms):
        return proto, fused
    nodes = list(shared)
    for node in proto.graph.node:
        if id(node) in replace:
            nodes.extend(replace[id(node)])
        elif id(node) not in drop:
            nodes.append(node)
    if original is not None:
        nodes = [_simplified_norm(n) if n.op_type == "RMSNormalization" and n.domain in _STD else n for n in nodes]
    del proto.graph.node[:]
    proto.graph.node.extend(_live(nodes, {o.name for o in proto.graph.output}))
    _drop_stale_value_info(proto)
    _drop_unused_initializers(proto)
    if not any(o.domain == MS for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(MS, 1))
    return proto, fused


def _custom_to_standard(proto: onnx.ModelProto) -> list[onnx.NodeProto] | None:
    """A custom-op-set graph (llmtrt RMSNorm / RotaryEmbedding / GroupQueryAttention nodes with function
    bodies) rewritten in place to the standard op types the matcher knows (each op's own ``to_standard``);
    returns copies of the original nodes to restore, or None for a graph without llmtrt nodes (or with
    others, such as the static cache's attention: left alone)."""
    from llmtrt.exporter import dialects
    from llmtrt.plugins.registry import DOMAIN

    custom = [n for n in proto.graph.node if n.domain == DOMAIN]
    if not custom or any(n.op_type not in ("RMSNorm", "RotaryEmbedding", "GroupQueryAttention") for n in custom):
        return None
    original = [onnx.NodeProto.FromString(n.SerializeToString()) for n in proto.graph.node]
    dialects.get("standard").apply(proto, 0)  # the export's own custom -> standard pass (opset unused)
    return original


def _simplified_norm(node: onnx.NodeProto) -> onnx.NodeProto:
    """RMSNormalization (opset 23) as ONNX Runtime's SimplifiedLayerNormalization (same math, registered
    in the default domain from opset 1): what a custom graph's lone norms become below opset 23."""
    return helper.make_node("SimplifiedLayerNormalization", list(node.input), list(node.output), name=node.name,
                            axis=int(_attr(node, "axis", -1)), epsilon=float(_attr(node, "epsilon", 1e-5)),
                            stash_type=int(_attr(node, "stash_type", 1)))


def _shared_inputs(proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Nodes computing GroupQueryAttention's length inputs once for all layers, from the graph inputs."""
    p = _PREFIX
    one = numpy_helper.from_array(np.array(1, np.int32), f"{p}/one")
    axis = numpy_helper.from_array(np.array(1, np.int64), f"{p}/mask_axis")
    proto.graph.initializer.extend([one, axis])
    i32 = onnx.TensorProto.INT32
    return [
        helper.make_node("Shape", ["attention_mask"], [f"{p}/mask_shape"], name=f"{p}/mask_shape"),
        helper.make_node("Gather", [f"{p}/mask_shape", axis.name], [f"{p}/total_i64"], name=f"{p}/total", axis=0),
        helper.make_node("Cast", [f"{p}/total_i64"], [_TOTAL], name=f"{p}/total_i32", to=i32),
        helper.make_node("Shape", ["attention_mask"], [f"{p}/batch"], name=f"{p}/batch", start=0, end=1),
        helper.make_node("Sub", [_TOTAL, one.name], [f"{p}/last"], name=f"{p}/last"),
        helper.make_node("Expand", [f"{p}/last", f"{p}/batch"], [_SEQLENS], name=f"{p}/seqlens_k"),
        helper.make_node("Shape", ["input_ids"], [f"{p}/seq"], name=f"{p}/seq", start=1, end=2),
        helper.make_node("Cast", [f"{p}/seq"], [f"{p}/seq_i32"], name=f"{p}/seq_i32", to=i32),
        helper.make_node("Expand", [f"{p}/seq_i32", f"{p}/batch"], [_QUERY_LENS], name=f"{p}/query_seqlens"),
    ]


def _attention_nodes(proto: onnx.ModelProto, m: dict, head_dim: int) -> list[onnx.NodeProto]:
    """Split q/k/v, rotate q and k, GroupQueryAttention: what replaces one matched chain."""
    att, rotary = m["att"], m["rotary"]
    base = att.name.rsplit("/", 1)[0] if "/" in att.name else att.name
    heads, kv_heads = m["heads"], m["kv_heads"]
    sizes = numpy_helper.from_array(np.array([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], np.int64),
                                    f"{base}/qkv_sizes")
    proto.graph.initializer.append(sizes)
    q, k, v = (f"{base}/{x}" for x in ("q", "k", "v"))
    cos, sin, positions = rotary.input[1], rotary.input[2], rotary.input[3]
    interleaved = int(_attr(rotary, "interleaved", 0))
    attrs = {"num_heads": heads, "kv_num_heads": kv_heads, "do_rotary": 0}
    if _attr(att, "scale") is not None:
        attrs["scale"] = float(_attr(att, "scale"))
    gqa_inputs = [q + "_rot", k + "_rot", v, att.input[4], att.input[5], _SEQLENS, _TOTAL, "", "", "",
                  att.input[3], "", "", "", "", "", _QUERY_LENS]  # cos/sin/position_ids unused: rotary is done
    return [
        helper.make_node("Split", [m["reshape"].input[0], sizes.name], [q, k, v], name=f"{base}/split_qkv", axis=2),
        helper.make_node("RotaryEmbedding", [q, positions, cos, sin], [q + "_rot"], name=f"{base}/rotary_q",
                         domain=MS, interleaved=interleaved),
        helper.make_node("RotaryEmbedding", [k, positions, cos, sin], [k + "_rot"], name=f"{base}/rotary_k",
                         domain=MS, interleaved=interleaved),
        helper.make_node("GroupQueryAttention", gqa_inputs, [m["out_r"].output[0], att.output[1], att.output[2]],
                         name=f"{base}/group_query_attention", domain=MS, **attrs),
    ]


def _live(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """``nodes`` less those whose outputs nothing reads (the reshape shapes the rewrite left unused)."""
    needed = set(outputs)
    keep = []
    for node in reversed(nodes):
        if any(o in needed for o in node.output if o):
            keep.append(node)
            needed.update(i for i in node.input if i)
    return keep[::-1]


def _drop_stale_value_info(proto: onnx.ModelProto) -> None:
    produced = {o for n in proto.graph.node for o in n.output}
    keep = [v for v in proto.graph.value_info if v.name in produced]
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(keep)


def _drop_unused_initializers(proto: onnx.ModelProto) -> None:
    used = {i for n in proto.graph.node for i in n.input} | {o.name for o in proto.graph.output}
    keep = [t for t in proto.graph.initializer if t.name in used]
    if len(keep) != len(proto.graph.initializer):
        del proto.graph.initializer[:]
        proto.graph.initializer.extend(keep)
