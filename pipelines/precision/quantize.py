"""``llmtrt quantize``: precision made explicit in the ONNX graph.

    out = quantize("out/onnx", "out/int8-sq", "int8-sq", PrecisionOptions(calib_text="configs/text/calib.txt"))

TensorRT 11 and TensorRT-RTX have no fp16/int8 builder flags and no INT8 calibrator: an engine
runs in the types its graph spells out. Each entry of :data:`PRECISIONS` rewrites an fp32 export
(``llmtrt export``) into one such graph, written with a manifest of the export's schema:

=========  =====================================================================================
fp16/bf16  weights and activations half; fp32 kept for RMSNorm, attention softmax and the final
           logits (``keep_fp32``), and for any tensor whose calibration range overflows fp16.
           Graph IO stays fp32 (``kv_cache_io="half"`` makes the KV cache half).
int8-sq    SmoothQuant W8A8: per-input-channel smoothing (alpha), int8 per-output-channel
           weights + DequantizeLinear, per-tensor static int8 activations (QuantizeLinear ->
           DequantizeLinear) in front of every linear layer.
int8-wo    int8 per-output-channel weights + DequantizeLinear; activations fp32.
int4-awq   int4 weights blocked along the input axis (DequantizeLinear-21 ``block_size``), with
           AWQ's activation-aware per-channel scales searched on calibration data.
int4-rtn   the same int4 layout by plain round-to-nearest: the baseline AWQ must beat.
=========  =====================================================================================

Linear layers are found by name: a MatMul whose weight is the initializer ``<module>.weight_t``
[in, out]. Layers that share an input (q/k/v, gate/up) share one smoothing factor and one
activation Q/DQ pair. A smoothing factor ``s`` is folded into the RMSNorm weight that produces the
shared input when that norm feeds nothing else, otherwise applied by a ``Mul`` by ``1/s``.
The lm_head is tied to the embedding in the models this project ships and is kept fp32 ("logits").
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmtrt.pipelines.errors import LlmtrtUserError
from llmtrt.pipelines.precision import quant_math as qm

KEEP_CATEGORIES = ("norm", "softmax", "logits")
FP16_HEADROOM = 0.5  # a tensor whose calibrated |x| exceeds half the fp16 range stays fp32
_EXTERNAL_DATA_THRESHOLD = 1 << 30


@dataclass(frozen=True)
class PrecisionOptions:
    """Options of the precision step; each precision reads the ones it needs (see ``llmtrt quantize --help``)."""

    calib_text: str | None = None          # default: configs/text/calib.txt
    calib_samples: int = 16
    calib_seq_len: int = 128
    observer: str | None = None            # max | percentile | entropy; default per precision
    alpha: float = 0.5                     # SmoothQuant migration strength
    block_size: int = 128                  # int4 block along the input axis
    keep_fp32: tuple[str, ...] = KEEP_CATEGORIES  # categories and/or module / node names
    kv_cache_io: str = "fp32"              # fp16/bf16: "fp32" or "half" past_key_values/present
    awq_grid: int = 20                     # AWQ ratios tried: 0, 1/grid, ..., 1
    awq_clip: bool = True                  # AWQ's per-block clipping search after the scale search
    progress: bool = True

    def check(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise LlmtrtUserError(f"--alpha must lie in [0, 1], got {self.alpha}")
        if self.block_size < 2 or self.block_size % 2:
            raise LlmtrtUserError(f"--block-size must be an even number >= 2 (e.g. 32, 64, 128), got {self.block_size}")
        if self.observer is not None and self.observer not in qm.OBSERVERS:
            raise LlmtrtUserError(f"--observer {self.observer!r}: choose from {', '.join(qm.OBSERVERS)}")
        if self.kv_cache_io not in ("fp32", "half"):
            raise LlmtrtUserError(f"--kv-cache-io {self.kv_cache_io!r}: choose fp32 or half")
        if self.awq_grid < 1:
            raise LlmtrtUserError("awq_grid must be positive")


@dataclass(frozen=True)
class Precision:
    """One entry of the registry: how to rewrite an fp32 graph, and what the engine will be."""

    name: str
    engine_precision: str        # what `llmtrt build --precision` checks
    summary: str
    calibrated: bool             # needs activation statistics
    observer: str | None         # default observer for activation scales (None: no activation quantization)
    min_opset: int
    apply: Callable[[Rewrite], None]


# --------------------------------------------------------------------------------------------
# the graph being rewritten
# --------------------------------------------------------------------------------------------
@dataclass
class Linear:
    node: Any              # the MatMul NodeProto
    module: str            # "model.layers.0.self_attn.q_proj"
    weight: str            # initializer name "<module>.weight_t"


@dataclass
class Rewrite:
    """An fp32 ModelProto being rewritten in place, plus what the rewrite reports."""

    model: Any
    options: PrecisionOptions
    stats: Any = None                       # calibration.CalibrationStats or None
    fp32_kept: list[dict[str, str]] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    pending: dict[str, list[Any]] = field(default_factory=dict)  # anchor output -> nodes to insert before it

    # --- edits ----------------------------------------------------------------------------
    def insert_before(self, anchor, *new_nodes) -> None:
        """Queue ``new_nodes`` right before ``anchor``; :meth:`flush` applies them.

        Rebuilding the node list copies every NodeProto, so it happens once, after the rewrite,
        while the rewrite keeps editing the nodes it holds.
        """
        self.pending.setdefault(anchor.output[0], []).extend(new_nodes)

    def flush(self) -> None:
        if not self.pending:
            return
        nodes = []
        for n in self.model.graph.node:
            nodes.extend(self.pending.get(n.output[0], []) if n.output else [])
            nodes.append(n)
        del self.model.graph.node[:]
        self.model.graph.node.extend(nodes)
        self.pending = {}

    # --- lookups ---------------------------------------------------------------------------
    def initializer(self, name: str):
        return next((t for t in self.model.graph.initializer if t.name == name), None)

    def array(self, name: str) -> np.ndarray:
        from onnx import numpy_helper

        return numpy_helper.to_array(self.initializer(name))

    def set_array(self, name: str, value: np.ndarray) -> None:
        from onnx import numpy_helper

        t = self.initializer(name)
        t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value), name))

    def add_initializer(self, tensor) -> str:
        self.model.graph.initializer.append(tensor)
        return tensor.name

    def consumers(self, tensor: str) -> list[Any]:
        return [n for n in self.model.graph.node if tensor in n.input]

    def producer(self, tensor: str):
        return next((n for n in self.model.graph.node if tensor in n.output), None)

    def keep(self, what: str, kind: str, reason: str) -> None:
        self.fp32_kept.append({"name": what, "kind": kind, "reason": reason})

    def linears(self) -> list[Linear]:
        """Linear layers (MatMul on a 2-D ``*.weight_t`` initializer), minus those ``keep_fp32`` names."""
        inits = {t.name: t for t in self.model.graph.initializer}
        found = []
        for node in self.model.graph.node:
            if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
                continue
            w = node.input[1]
            if not w.endswith(".weight_t") or w not in inits or len(inits[w].dims) != 2:
                continue
            module = w[: -len(".weight_t")]
            if module in self.options.keep_fp32 or node.name in self.options.keep_fp32:
                self.keep(module, "linear", "named in keep_fp32")
                continue
            found.append(Linear(node, module, w))
        return found

    def groups(self) -> list[list[Linear]]:
        """Linear layers grouped by their shared input tensor, in graph order."""
        by_input: dict[str, list[Linear]] = {}
        for lin in self.linears():
            by_input.setdefault(lin.node.input[0], []).append(lin)
        return list(by_input.values())

    def report_logits(self) -> None:
        if self.producer("logits") is not None and self.producer("logits").op_type == "MatMul":
            node = self.producer("logits")
            if not node.input[1].endswith(".weight_t"):
                self.keep(node.name, "linear", "lm_head: its weight is tied to the token embedding (shared with "
                          "the Gather); quantizing it would change the embedding too")

    def smooth(self, group: list[Linear], s: np.ndarray) -> None:
        """Divide the group's shared input by ``s`` (folded into an exclusive RMSNorm weight, or a Mul)."""
        x = group[0].node.input[0]
        users = self.consumers(x)
        producer = self.producer(x)
        members = {id(lin.node) for lin in group}
        folded = False
        if producer is not None and all(id(u) in members for u in users) and x not in _graph_outputs(self.model):
            weight = _norm_weight(self, producer, len(s))
            if weight is not None:
                self.set_array(weight, (self.array(weight) / s).astype(np.float32))
                folded = True
        if not folded:
            from onnx import helper, numpy_helper

            inv = self.add_initializer(numpy_helper.from_array((1.0 / s).astype(np.float32),
                                                               f"{group[0].module}.smooth_inv"))
            out = f"{x}.smoothed"
            mul = helper.make_node("Mul", [x, inv], [out], name=f"{_node_prefix(group[0].node)}/Smooth")
            self.insert_before(group[0].node, mul)
            for lin in group:
                lin.node.input[0] = out
        self.details.setdefault("smoothing", {})[group[0].module] = "folded into norm weight" if folded else "Mul"
        for lin in group:
            self.set_array(lin.weight, (self.array(lin.weight) * s[:, None]).astype(np.float32))


def _graph_outputs(model) -> list[str]:
    return [o.name for o in model.graph.output]


def _node_prefix(node) -> str:
    return node.name.rsplit("/", 1)[0] if "/" in node.name else node.name


def _norm_weight(rw: Rewrite, node, width: int) -> str | None:
    """The [width] weight of an RMSNorm-like producer that only this node reads, else None."""
    inits = {t.name: t for t in rw.model.graph.initializer}
    if node.op_type in ("RMSNorm", "RMSNormalization", "Mul"):
        for name in node.input:
            t = inits.get(name)
            if t is not None and list(t.dims) == [width] and len(rw.consumers(name)) == 1:
                return name
    return None


# --------------------------------------------------------------------------------------------
# weight-only and W8A8
# --------------------------------------------------------------------------------------------
def _dequantized_weight(rw: Rewrite, lin: Linear, q: np.ndarray, scale: np.ndarray, bits: int,
                        block_size: int | None) -> None:
    """Replace ``lin``'s fp32 weight by an int initializer and a DequantizeLinear feeding the MatMul."""
    from onnx import TensorProto, helper, numpy_helper

    base = lin.weight
    if bits == 8:
        qt = numpy_helper.from_array(q.astype(np.int8), f"{base}.int8")
    else:
        qt = helper.make_tensor(f"{base}.int4", TensorProto.INT4, list(q.shape), qm.pack_int4(q), raw=True)
    st = numpy_helper.from_array(scale.astype(np.float32), f"{base}.scale")
    attrs = {"axis": 1} if block_size is None else {"axis": 0, "block_size": block_size}
    dq = helper.make_node("DequantizeLinear", [qt.name, st.name], [f"{base}.dequantized"],
                          name=f"{_node_prefix(lin.node)}/weight/DequantizeLinear", **attrs)
    rw.add_initializer(qt)
    rw.add_initializer(st)
    _remove_initializer(rw.model, base)
    rw.insert_before(lin.node, dq)
    lin.node.input[1] = dq.output[0]


def _remove_initializer(model, name: str) -> None:
    """Delete one initializer in place (rebuilding the list would copy every tensor, each time)."""
    inits = model.graph.initializer
    for i, t in enumerate(inits):
        if t.name == name:
            del inits[i]
            return


def apply_int8_wo(rw: Rewrite) -> None:
    for lin in rw.linears():
        q, scale = qm.int8_per_channel(rw.array(lin.weight))
        _dequantized_weight(rw, lin, q, scale, 8, None)
    rw.report_logits()


def _activation_amax(rw: Rewrite, x: str, s: np.ndarray) -> float:
    observer = rw.options.observer or "max"
    if observer == "max":  # exact from the per-channel maxima: max_j amax_j / s_j
        return float(np.max(rw.stats.channel_amax[x] / s))
    return qm.OBSERVERS[observer](np.abs(rw.stats.rows[x] / s[None, :]).reshape(-1))


def apply_int8_sq(rw: Rewrite) -> None:
    from onnx import helper, numpy_helper

    alpha = rw.options.alpha
    acts = {}
    for group in rw.groups():
        x = group[0].node.input[0]
        weights = [rw.array(lin.weight) for lin in group]
        w_rows = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        s = qm.smoothquant_scales(rw.stats.channel_amax[x], w_rows, alpha)
        amax = _activation_amax(rw, x, s)
        rw.smooth(group, s)
        xs = group[0].node.input[0]
        scale = float(qm.symmetric_scale(amax, qm.INT8_MAX))
        prefix = f"{group[0].module}.input"
        sc = rw.add_initializer(numpy_helper.from_array(np.array(scale, dtype=np.float32), f"{prefix}.scale"))
        zp = rw.add_initializer(numpy_helper.from_array(np.array(0, dtype=np.int8), f"{prefix}.zero_point"))
        name = _node_prefix(group[0].node)
        qn = helper.make_node("QuantizeLinear", [xs, sc, zp], [f"{prefix}.int8"], name=f"{name}/input/QuantizeLinear")
        dq = helper.make_node("DequantizeLinear", [qn.output[0], sc, zp], [f"{prefix}.dequantized"],
                              name=f"{name}/input/DequantizeLinear")
        rw.insert_before(group[0].node, qn, dq)
        for lin in group:
            lin.node.input[0] = dq.output[0]
            q, wscale = qm.int8_per_channel(rw.array(lin.weight))
            _dequantized_weight(rw, lin, q, wscale, 8, None)
        acts[x] = {"amax": amax, "scale": scale, "observer": rw.options.observer or "max",
                   "smoothing_max": float(s.max()), "smoothing_min": float(s.min())}
    rw.details["activations"] = acts
    rw.details["alpha"] = alpha
    rw.report_logits()


# --------------------------------------------------------------------------------------------
# int4
# --------------------------------------------------------------------------------------------
def _block_size_for(rw: Rewrite, rows: int, module: str) -> int:
    """``block_size``, or for a layer whose input width it does not divide (688 = 16 x 43), the largest
    power of two that does: TensorRT only accepts whole blocks ("The quantization axis must divide
    into whole blocks")."""
    bs = rw.options.block_size
    if rows % bs == 0:
        return bs
    fit = 2
    while fit * 2 <= bs and rows % (fit * 2) == 0:
        fit *= 2
    if rows % fit:
        raise LlmtrtUserError(f"{module}: input width {rows} is odd; int4 blocks need an even width")
    rw.details.setdefault("block_size_adjusted", {})[module] = fit
    return fit


def apply_int4_rtn(rw: Rewrite) -> None:
    for lin in rw.linears():
        w = rw.array(lin.weight)
        bs = _block_size_for(rw, w.shape[0], lin.module)
        q, scale = qm.int4_blocked(w, bs)
        _dequantized_weight(rw, lin, q, scale, 4, bs)
    rw.details["block_size"] = rw.options.block_size
    rw.report_logits()


def awq_search(gram: np.ndarray, channel_mean: np.ndarray, weights: list[np.ndarray], block_size: int,
               grid: int) -> tuple[np.ndarray, float, float, float]:
    """AWQ: the ratio r in 0, 1/grid, ..., 1 whose scales ``mean|x|^r`` minimize the group's output error.

    Error: ``sum ||x @ W_q - x @ W||^2`` over the calibration rows and the group's layers, from the
    Gram matrix ``gram = x^T x``. Returns (scales, best ratio, its error, the error at ratio 0, i.e.
    round-to-nearest).
    """
    best = (np.ones(gram.shape[0], dtype=np.float32), 0.0, np.inf)
    rtn_err = np.inf
    for k in range(grid + 1):
        s = qm.awq_scales(channel_mean, k / grid) if k else np.ones(gram.shape[0], dtype=np.float32)
        err = 0.0
        for w in weights:
            wq = qm.fake_int4_blocked(w * s[:, None], block_size) / s[:, None]
            err += float(qm.output_error(gram, wq - w).sum())
        if k == 0:
            rtn_err = err
        if err < best[2]:
            best = (s, k / grid, err)
    return best[0], best[1], best[2], rtn_err


def apply_int4_awq(rw: Rewrite) -> None:
    o = rw.options
    searched = {}
    for group in rw.groups():
        x = group[0].node.input[0]
        rows = rw.stats.rows[x].astype(np.float64)
        gram = (rows.T @ rows).astype(np.float32)  # float32 products, float64 sums: errors are only compared
        weights = [rw.array(lin.weight) for lin in group]
        bs = _block_size_for(rw, weights[0].shape[0], group[0].module)
        s, ratio, err, rtn_err = awq_search(gram, rw.stats.channel_mean[x], weights, bs, o.awq_grid)
        if ratio > 0:
            rw.smooth(group, s)
        gram_scaled = (gram / np.outer(s, s)).astype(np.float32)
        clip_err = 0.0
        for lin in group:
            w = rw.array(lin.weight)
            amax = qm.awq_clip(gram_scaled, w, bs) if o.awq_clip else None
            clip_err += float(qm.output_error(gram_scaled, qm.fake_int4_blocked(w, bs, amax) - w).sum())
            q, scale = qm.int4_blocked(w, bs, amax)
            _dequantized_weight(rw, lin, q, scale, 4, bs)
        searched[group[0].module] = {"layers": [lin.module for lin in group], "ratio": ratio,
                                     "error": clip_err, "scale_error": err, "rtn_error": rtn_err}
    rw.details["awq"] = searched
    rw.details["block_size"] = o.block_size
    rw.report_logits()


# --------------------------------------------------------------------------------------------
# fp16 / bf16
# --------------------------------------------------------------------------------------------
_PINNED_OPS = {
    "norm": (("llmtrt", "RMSNorm"), ("", "RMSNormalization")),
    "softmax": (("llmtrt", "GroupQueryAttention"), ("", "Softmax")),
}
_REASONS = {
    "norm": "norm: RMSNorm (its sum of squares) in fp32",
    "softmax": "softmax: attention scores and softmax in fp32",
    "logits": "logits: the lm_head MatMul and its output in fp32",
}


def _to_half_array(value: np.ndarray, half_type: int) -> tuple[bytes, int]:
    """fp32 values as fp16 (finite values clamped to +-65504) or bf16 (round to nearest even) raw bytes,
    and how many finite values had to be clamped."""
    from onnx import TensorProto

    v = np.asarray(value, dtype=np.float32)
    if half_type == TensorProto.FLOAT16:
        finite = np.isfinite(v)
        clamped = int(np.count_nonzero(finite & (np.abs(v) > qm.FP16_MAX)))
        v = np.where(finite, np.clip(v, -qm.FP16_MAX, qm.FP16_MAX), v)
        return v.astype("<f2").tobytes(), clamped
    bits = v.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    rounded = np.where(np.isnan(v), np.uint16(0x7FC0), rounded)
    return rounded.astype("<u2").tobytes(), 0


def _half_initializer(tensor, half_type: int, name: str):
    from onnx import helper, numpy_helper

    raw, clamped = _to_half_array(numpy_helper.to_array(tensor), half_type)
    return helper.make_tensor(name, half_type, list(tensor.dims), raw, raw=True), clamped


def _constants_to_initializers(model) -> None:
    """Float Constant nodes become initializers, so every float constant is handled the same way."""
    from onnx import TensorProto, helper, numpy_helper

    kept = []
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.attribute) == 1:
            attr = node.attribute[0]
            value = None
            if attr.name == "value" and attr.t.data_type == TensorProto.FLOAT:
                value = numpy_helper.to_array(attr.t)
            elif attr.name in ("value_float", "value_floats"):
                value = np.asarray(helper.get_attribute_value(attr), dtype=np.float32)
            if value is not None:
                model.graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), node.output[0]))
                continue
        kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)


def convert_to_half(rw: Rewrite, half_type: int, label: str) -> None:
    """Rewrite every float tensor to ``half_type`` except the pinned fp32 nodes, with Casts between.

    A node runs in fp32 when pinned (``keep_fp32`` categories or names, fp16-overflowing tensors)
    or when every computed float input it has is fp32 (the exporter's own fp32 islands: a
    ``Cast(to=FLOAT)`` ... ``CastLike`` pair around a norm); otherwise in half. Float initializers
    take the type of the node that reads them (two copies when both read them).
    """
    import onnx
    from onnx import TensorProto, helper

    F = TensorProto.FLOAT
    model, opts = rw.model, rw.options
    graph = model.graph
    _constants_to_initializers(model)
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type
             for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    inits = {t.name: t for t in graph.initializer}
    flexible = {n: True for n, t in inits.items() if t.data_type == F}
    nodes = list(graph.node)
    consumers: dict[str, list[int]] = {}
    for k, n in enumerate(nodes):
        for i in n.input:
            consumers.setdefault(i, []).append(k)

    def runtime_float(name: str) -> bool:
        return bool(name) and name not in flexible and types.get(name) == F

    pinned: dict[int, str] = {}
    for k, n in enumerate(nodes):
        for cat, ops in _PINNED_OPS.items():
            if cat in opts.keep_fp32 and (n.domain if n.domain != "ai.onnx" else "", n.op_type) in ops:
                pinned[k] = _REASONS[cat]
        if "logits" in opts.keep_fp32 and "logits" in n.output:
            pinned[k] = _REASONS["logits"]
        if n.name and n.name in opts.keep_fp32:
            pinned[k] = "named in keep_fp32"
    overflow = {}
    limit = qm.FP16_MAX * FP16_HEADROOM if half_type == TensorProto.FLOAT16 else np.inf
    if rw.stats is not None:
        for k, n in enumerate(nodes):
            if not any(runtime_float(i) for i in n.input):
                continue  # computed from constants only (e.g. the -inf fill of a mask): clamped instead
            for o in n.output:
                amax = rw.stats.amax.get(o)
                if amax is not None and amax > limit:
                    overflow[o] = amax
                    reason = f"overflow: {o} reaches |x| = {amax:.4g} in calibration, above {limit:g}"
                    for j in (k, *consumers.get(o, [])):
                        pinned.setdefault(j, reason)
    changed = True
    while changed:  # constant-only nodes (Transpose of a weight) that feed only fp32 nodes stay fp32 too
        changed = False
        for k, n in enumerate(nodes):
            if k in pinned or any(runtime_float(i) for i in n.input) or not any(i in flexible for i in n.input):
                continue
            users = [j for o in n.output for j in consumers.get(o, [])]
            if users and all(j in pinned for j in users):
                pinned[k] = "feeds only fp32 nodes"
                changed = True

    # pass 1: the type every node computes in, and the type of every computed float tensor
    dtype: dict[str, int] = {}
    for inp in graph.input:
        if types.get(inp.name) == F:
            half_io = opts.kv_cache_io == "half" and inp.name.startswith("past_key_values.")
            dtype[inp.name] = half_type if half_io else F
            inp.type.tensor_type.elem_type = dtype[inp.name]
    mode: dict[int, int | None] = {}   # None: type-transparent (Cast, CastLike)
    uses: dict[str, dict[int, bool]] = {}
    like_type: dict[int, int] = {}
    for k, n in enumerate(nodes):
        default = F if k in pinned else half_type
        if n.op_type == "Cast":
            mode[k] = None
            out_type = helper.get_attribute_value(next(a for a in n.attribute if a.name == "to"))
            for i in n.input:
                if i in flexible:
                    uses.setdefault(i, {})[F] = True
        elif n.op_type == "CastLike":
            mode[k] = None
            like = n.input[1]
            out_type = default if like in flexible else dtype.get(like, types.get(like))
            like_type[k] = out_type
            for i in n.input:
                if i in flexible:
                    uses.setdefault(i, {})[out_type if i == like else F] = True
        else:
            computed = [dtype[i] for i in n.input if runtime_float(i) and i in dtype]
            if k in pinned:
                m = F
            elif computed and all(t == F for t in computed):
                m = F
            else:
                m = half_type
            mode[k] = out_type = m
            for i in n.input:
                if i in flexible:
                    uses.setdefault(i, {})[m] = True
        for o in n.output:
            if types.get(o) == F:
                dtype[o] = out_type if out_type in (F, half_type) else F

    # initializers: converted in place when only half readers, a second copy when both
    def init_name(name: str, t: int) -> str:
        return name if t == F or F not in uses.get(name, {}) else f"{name}.{label}"

    clamped_total = 0
    new_inits = []
    for t in graph.initializer:
        u = uses.get(t.name, {})
        if t.name in flexible and half_type in u:
            half, clamped = _half_initializer(t, half_type, init_name(t.name, half_type))
            clamped_total += clamped
            if F in u:
                new_inits.append(t)
            new_inits.append(half)
        else:
            new_inits.append(t)
    del graph.initializer[:]
    graph.initializer.extend(new_inits)

    # pass 2: wire it up, with one Cast per (tensor, type) where a reader needs the other type
    names = {F: "fp32", half_type: label}
    casts: dict[tuple[str, int], str] = {}
    out_nodes = []
    for k, n in enumerate(nodes):
        m = mode[k]
        for pos, i in enumerate(n.input):
            if i in flexible:
                if m is None:
                    want = like_type[k] if n.op_type == "CastLike" and pos == 1 else F
                else:
                    want = m
                n.input[pos] = init_name(i, want)
            elif m is not None and runtime_float(i) and dtype.get(i, F) != m:
                key = (i, m)
                if key not in casts:
                    casts[key] = f"{i}.{names[m]}"
                    out_nodes.append(helper.make_node("Cast", [i], [casts[key]], to=m,
                                                      name=f"/precision/{i}/Cast_to_{names[m]}"))
                n.input[pos] = casts[key]
        if m == half_type:
            for a in n.attribute:
                if a.name == "value" and a.t.data_type == F:  # ConstantOfShape fill value
                    a.t.CopyFrom(_half_initializer(a.t, half_type, a.t.name)[0])
        out_nodes.append(n)

    # graph outputs: logits stays fp32; present.* follows kv_cache_io
    for out in graph.output:
        if types.get(out.name) != F:
            continue
        want = half_type if opts.kv_cache_io == "half" and out.name.startswith("present.") else F
        have = dtype.get(out.name, F)
        if have != want:
            inner = f"{out.name}.{names[have]}"
            for n in out_nodes:
                n.output[:] = [inner if o == out.name else o for o in n.output]
                n.input[:] = [inner if i == out.name else i for i in n.input]
            out_nodes.append(helper.make_node("Cast", [inner], [out.name], to=want,
                                              name=f"/precision/{out.name}/Cast_to_{names[want]}"))
        out.type.tensor_type.elem_type = want
    del graph.node[:]
    graph.node.extend(out_nodes)
    del graph.value_info[:]

    for k in sorted(pinned):
        n = nodes[k]
        rw.keep(n.name or n.output[0], "node", pinned[k])
    for name, amax in overflow.items():
        rw.keep(name, "tensor", f"calibrated max |x| = {amax:.6g} exceeds {limit:g} (half the fp16 range)")
    rw.details.update({"half_type": label, "casts_inserted": len(casts), "fp32_nodes": len(pinned),
                       "overflowing_tensors": list(overflow), "clamped_constants": clamped_total,
                       "kv_cache_io": opts.kv_cache_io, "logits_io": "fp32",
                       "norm_reduction": "fp32 (kept node)" if "norm" in opts.keep_fp32 else
                       "fp32 inside the op where its definition does it (stash_type=1 / Cast island)"})


def _half(label: str) -> Callable[[Rewrite], None]:
    def apply(rw: Rewrite) -> None:
        from onnx import TensorProto

        convert_to_half(rw, TensorProto.FLOAT16 if label == "fp16" else TensorProto.BFLOAT16, label)

    return apply


# --------------------------------------------------------------------------------------------
# the registry
# --------------------------------------------------------------------------------------------
PRECISIONS: dict[str, Precision] = {p.name: p for p in (
    Precision("fp16", "fp16", "weights and activations fp16; fp32 norm, softmax, logits and overflowing tensors",
              True, None, 0, _half("fp16")),
    Precision("bf16", "bf16", "weights and activations bf16; fp32 norm, softmax and logits",
              False, None, 0, _half("bf16")),
    Precision("int8-sq", "int8", "SmoothQuant W8A8: int8 per-channel weights, static per-tensor int8 activations",
              True, "max", 13, apply_int8_sq),
    Precision("int8-wo", "int8", "int8 per-channel weights, fp32 activations", False, None, 13, apply_int8_wo),
    Precision("int4-awq", "int4", "int4 blocked weights with AWQ activation-aware scales", True, None, 21,
              apply_int4_awq),
    Precision("int4-rtn", "int4", "int4 blocked weights, round-to-nearest (AWQ's baseline)", False, None, 21,
              apply_int4_rtn),
)}


# --------------------------------------------------------------------------------------------
# opset, writing, the step
# --------------------------------------------------------------------------------------------
_REDUCE_AXES_INPUT_AT_18 = ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
                            "ReduceMin", "ReduceProd", "ReduceSumSquare")


def raise_opset(model, target: int) -> int:
    """Raise the default-domain opset (graph and local functions) to at least ``target``; returns it.

    Between 17 and 21 the only change to ops these graphs use is opset 18 moving Reduce* ``axes``
    from an attribute to an input, done here; the rest only widened type lists.
    """
    from onnx import helper, numpy_helper

    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if current >= target:
        return current
    if current < 17:
        raise LlmtrtUserError(f"graph opset {current} is too old to raise to {target}; re-export with --opset 17 or newer")

    def fix(nodes, add_const) -> None:
        for n in nodes:
            if current < 18 and n.op_type in _REDUCE_AXES_INPUT_AT_18:
                axes = next((a for a in n.attribute if a.name == "axes"), None)
                if axes is not None:
                    name = add_const(n, np.asarray(helper.get_attribute_value(axes), dtype=np.int64))
                    n.attribute.remove(axes)
                    n.input.append(name)

    counter = [0]

    def graph_const(node, value):
        counter[0] += 1
        t = numpy_helper.from_array(value, f"/precision/reduce_axes_{counter[0]}")
        model.graph.initializer.append(t)
        return t.name

    fix(model.graph.node, graph_const)
    for fn in model.functions:
        extra = []

        def fn_const(node, value, extra=extra):
            counter[0] += 1
            out = f"reduce_axes_{counter[0]}"
            extra.append((node, helper.make_node("Constant", [], [out], value=numpy_helper.from_array(value))))
            return out

        fix(fn.node, fn_const)
        for node, const in extra:
            body = list(fn.node)
            body.insert(next(i for i, n in enumerate(body) if n is node), const)
            del fn.node[:]
            fn.node.extend(body)
        for o in fn.opset_import:
            if o.domain in ("", "ai.onnx"):
                o.version = target
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = target
    return target


def _write_onnx(model, out_dir: Path, name: str = "model.onnx") -> Path:
    """Write model.onnx (+ model.onnx.data past 1 GiB of weights) into the fresh directory ``out_dir``."""
    import onnx

    large = sum(len(t.raw_data) for t in model.graph.initializer) > _EXTERNAL_DATA_THRESHOLD
    path = out_dir / name
    if large:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=f"{name}.data", size_threshold=1024)
    else:
        onnx.save(model, str(path))
    onnx.checker.check_model(str(path))  # from the file: a proto over 2 GB cannot be checked in memory
    return path


def quantize(src_dir: str | Path, out_dir: str | Path, precision: str,
             options: PrecisionOptions = PrecisionOptions()) -> Path:  # noqa: B008 (frozen, immutable)
    """Rewrite the fp32 export in ``src_dir`` to ``precision``; writes out_dir/model.onnx + manifest.json.

    Returns ``out_dir``. Calibrated precisions also leave calibration_cache.json (+ rows) in it, reused
    next time when the source graph, text, tokenizer, samples and sequence length are unchanged.
    """
    from llmtrt.exporter.files import artifact_dir, check_out_dir
    from llmtrt.pipelines.artifacts import load_exported as load
    from llmtrt.pipelines.artifacts import onnx_sha256, read_manifest
    from llmtrt.pipelines.precision.calibration import CACHE_FILE, ROWS_FILE

    t0 = time.perf_counter()
    if precision not in PRECISIONS:
        raise LlmtrtUserError(f"--to {precision!r}: unknown precision; choose from {', '.join(PRECISIONS)}")
    entry = PRECISIONS[precision]
    options.check()
    unknown = [k for k in options.keep_fp32 if k not in KEEP_CATEGORIES and not ("." in k or "/" in k)]
    if unknown:
        raise LlmtrtUserError(f"--keep-fp32 {unknown[0]!r}: give a category ({', '.join(KEEP_CATEGORIES)}), a module "
                              "name (model.layers.0.mlp.down_proj) or a node name (/lm_head/MatMul)")
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    raw = read_manifest(src_dir)
    if raw.get("precision", "fp32") != "fp32":
        raise LlmtrtUserError(f"{src_dir}: is already {raw['precision']}; quantize the fp32 export written by "
                              "`llmtrt export`")
    exported = load(src_dir)
    if out_dir.resolve() == src_dir.resolve():
        raise LlmtrtUserError(f"--out {out_dir}: is the export directory itself; give a new directory")
    check_out_dir(out_dir)
    source_sha = raw.get("onnx_sha256") or onnx_sha256(exported.onnx_path)
    with artifact_dir(out_dir, carry=(CACHE_FILE, ROWS_FILE)) as tmp:
        _quantize_into(tmp, exported, raw, entry, options, source_sha, t0)
    return out_dir


def _quantize_into(out_dir: Path, exported, raw: dict[str, Any], entry: Precision, options: PrecisionOptions,
                   source_sha: str, t0: float) -> None:
    import onnx

    from llmtrt.exporter.kv_cache import get_layout
    from llmtrt.pipelines.artifacts import write_export_manifest

    # Calibrate first, from the graph alone (ONNX Runtime reads the weights itself), so the weights
    # are held once at a time: by the calibration session, then by the rewrite.
    stats, calibration = None, None
    if entry.calibrated:
        from llmtrt.pipelines.precision.calibration import DEFAULT_CALIB_TEXT, calibrate
        from llmtrt.pipelines.runtime.tokenizer import load_tokenizer

        text = Path(options.calib_text) if options.calib_text else DEFAULT_CALIB_TEXT
        scout = Rewrite(onnx.load(str(exported.onnx_path), load_external_data=False), options)
        linear_inputs = list(dict.fromkeys(lin.node.input[0] for lin in scout.linears()))
        stats = calibrate(exported.onnx_path, source_sha, out_dir, text, load_tokenizer(exported.onnx_path.parent),
                          options.calib_samples, options.calib_seq_len, linear_inputs, progress=options.progress)
        calibration = {**stats.summary(), "observer": options.observer or entry.observer or "max"}
    model = onnx.load(str(exported.onnx_path))
    rw = Rewrite(model, options, stats=stats)
    opset = raise_opset(model, entry.min_opset) if entry.min_opset else exported.opset
    try:
        entry.apply(rw)
    finally:
        rw.flush()
    path = _write_onnx(model, out_dir)

    half = entry.name in ("fp16", "bf16") and options.kv_cache_io == "half"
    io = get_layout(exported.kv_cache).io_spec(
        exported.config, cache_dtype={"fp16": "float16", "bf16": "bfloat16"}[entry.name]) if half else exported.io
    stats = {"quantize_seconds": round(time.perf_counter() - t0, 3), "source_stats": exported.stats}
    result = dataclasses.replace(exported, onnx_path=path, opset=opset, io=io, stats=stats)
    write_export_manifest(result, raw, extra={
        "precision": entry.name,
        "engine_precision": entry.engine_precision,
        "source_onnx": str(exported.onnx_path.resolve()),
        "source_onnx_sha256": source_sha,
        "precision_options": _options_dict(options),
        "calibration": calibration,
        "fp32_kept": rw.fp32_kept,
        "precision_details": _jsonable(rw.details),
    })


def _options_dict(options: PrecisionOptions) -> dict[str, Any]:
    d = dataclasses.asdict(options)
    d.pop("progress")
    d["keep_fp32"] = list(options.keep_fp32)
    return d


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
