"""int8 and int4 precisions: each linear-layer group quantized as soon as its statistics exist.

    apply_int4_awq(rw)      # walks the calibration stages; each group's weights read, searched,
                            # quantized and written, then dropped, before the next stage runs

A *group* is the linears sharing one input (q/k/v, gate/up, or one fused qkv_proj / gate_up_proj):
they share a smoothing factor and an activation Q/DQ pair. Activations stay fp32; the lm_head is
kept fp16 (``--quantize-lm-head int8|int4`` quantizes it weight-only), and the embedding table is
stored fp16 (a tied table once, shared by the Gather and the lm_head).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from llmtrt.pipelines.errors import LlmtrtUserError
from llmtrt.pipelines.precision import quant_math as qm
from llmtrt.pipelines.precision.graph import Linear, find_linears, groups_of
from llmtrt.pipelines.precision.rewrite import Rewrite

Scheme = Callable[[Rewrite, list[Linear], Any], None]


# --------------------------------------------------------------------------------------------
# which linears, in which order
# --------------------------------------------------------------------------------------------
def quantizable(rw: Rewrite) -> tuple[list[Linear], Linear | None]:
    """(the linears to quantize, the lm_head when it is left to the lm_head policy)."""
    keep = set(rw.options.keep_fp32)
    chosen, head = [], None
    for lin in find_linears(rw.graph):
        if lin.module in keep or lin.node.name in keep:
            rw.keep(lin.module, "linear", "named in keep_fp32")
            rw.kept_linears[lin.module] = "named in --keep-fp32"
            continue
        if lin.role == "lm_head":
            head = lin  # its own policy: lm_head_and_tables
            continue
        chosen.append(lin)
    return chosen, head


def walk(rw: Rewrite, scheme: Scheme, lins: list[Linear]) -> None:
    """Run ``scheme`` on every group: stage by stage with calibration (rows and weights of one stage
    in memory), else in graph order."""
    groups = groups_of(lins)
    if rw.calibration is None:
        for group in groups:
            scheme(rw, group, None)
        return
    stage_of = {n.name: st.index for st in rw.calibration.plan for n in st.nodes if n.name}
    by_stage: dict[int, list[list[Linear]]] = {}
    for group in groups:
        by_stage.setdefault(max(stage_of.get(lin.node.name, 0) for lin in group), []).append(group)
    rows: dict[str, np.ndarray] = {}
    for result in rw.calibration.stages(until=max(by_stage, default=0)):
        rows.update(result.stats.rows)
        rw.stage_weights = result.weights
        for group in by_stage.pop(result.stage.index, []):
            x = group[0].x.name  # before the scheme puts a Mul or a Q/DQ pair in front of the group
            scheme(rw, group, _Stats(rw.calibration.stats, rows, x))
            rows.pop(x, None)
        rw.stage_weights = {}
    if by_stage:
        raise AssertionError(f"groups left without a calibration stage: {sorted(by_stage)}")


class _Stats:
    """One group's view of the statistics: its input's channel stats and sampled rows."""

    def __init__(self, stats, rows: dict[str, np.ndarray], x: str) -> None:
        self.channel_amax = stats.channel_amax[x]
        self.channel_mean = stats.channel_mean[x]
        self.rows = rows[x]


def block_size_for(rw: Rewrite, rows: int, module: str) -> int:
    """``--block-size``, or for an input width it does not divide (688 = 16 x 43), the largest power of
    two that does: TensorRT only takes whole blocks ("The quantization axis must divide into whole blocks")."""
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


# --------------------------------------------------------------------------------------------
# the schemes
# --------------------------------------------------------------------------------------------
_COLUMN_CHUNK = 1 << 22   # weights quantized at a time: the temporaries of quant_math stay ~100 MB


def _int8_columns(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """quant_math.int8_per_channel over column chunks (per-column: the result is the same)."""
    step = max(1, _COLUMN_CHUNK // max(1, w.shape[0]))
    q = np.empty(w.shape, dtype=np.int8)
    scale = np.empty(w.shape[1], dtype=np.float32)
    for c in range(0, w.shape[1], step):
        q[:, c:c + step], scale[c:c + step] = qm.int8_per_channel(w[:, c:c + step])
    return q, scale


def _int4_columns(w: np.ndarray, block_size: int, amax: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """quant_math.int4_blocked over column chunks (blocks run along the rows: the result is the same)."""
    step = max(1, _COLUMN_CHUNK // max(1, w.shape[0]))
    q = np.empty(w.shape, dtype=np.int8)
    scale = np.empty((qm.num_blocks(w.shape[0], block_size), w.shape[1]), dtype=np.float32)
    for c in range(0, w.shape[1], step):
        q[:, c:c + step], scale[:, c:c + step] = qm.int4_blocked(
            w[:, c:c + step], block_size, None if amax is None else amax[:, c:c + step])
    return q, scale
def int8_wo(rw: Rewrite, group: list[Linear], stats) -> None:
    for lin in group:
        q, scale = _int8_columns(rw.weight(lin))
        rw.record(lin, rw.dequantized_weight(lin, q, scale, 8, None))


def int4_rtn(rw: Rewrite, group: list[Linear], stats) -> None:
    for lin in group:
        w = rw.weight(lin)
        bs = block_size_for(rw, w.shape[0], lin.module)
        q, scale = _int4_columns(w, bs)
        rw.record(lin, {**rw.dequantized_weight(lin, q, scale, 4, bs), "method": "round-to-nearest"})


def int8_sq(rw: Rewrite, group: list[Linear], stats) -> None:
    o = rw.options
    weights = [rw.weight(lin) for lin in group]
    w_rows = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
    s = qm.smoothquant_scales(stats.channel_amax, w_rows, o.alpha)
    observer = o.observer or "max"
    if observer == "max":  # exact from the per-channel maxima: max_j amax_j / s_j
        amax = float(np.max(stats.channel_amax / s))
    else:
        amax = qm.OBSERVERS[observer](np.abs(stats.rows / s[None, :]).reshape(-1))
    x_name = group[0].x.name
    smoothing = rw.smooth(group, s)
    scale = float(qm.symmetric_scale(amax, qm.INT8_MAX))
    activation = rw.activation_qdq(group, scale)
    for lin, w in zip(group, weights, strict=True):
        w *= s[:, None]  # in place: this stage's copy of the weight is not read again
        q, wscale = _int8_columns(w)
        rw.record(lin, rw.dequantized_weight(lin, q, wscale, 8, None), smoothing, activation)
    rw.details.setdefault("activations", {})[x_name] = {
        "amax": amax, "scale": scale, "observer": observer, "smoothing_max": float(s.max()),
        "smoothing_min": float(s.min())}


def int4_awq(rw: Rewrite, group: list[Linear], stats) -> None:
    from llmtrt.pipelines.precision import awq

    o = rw.options
    weights = [rw.weight(lin) for lin in group]
    bs = block_size_for(rw, weights[0].shape[0], group[0].module)
    x = awq.sample_rows(stats.rows, o.awq_rows)
    s, ratio, err, rtn_err = awq.search_scales(x, stats.channel_mean, weights, bs, o.awq_grid)
    smoothing = rw.smooth(group, s) if ratio > 0 else None
    xs = stats.rows / s[None, :] if ratio > 0 else stats.rows  # the clip search sees every sampled row
    clip_err = unclipped = 0.0
    for lin, w in zip(group, weights, strict=True):
        if ratio > 0:
            w *= s[:, None]  # in place: this stage's copy of the weight is not read again
        ws = w
        amax = None
        if o.awq_clip:
            amax, e, e0 = awq.search_clip(xs, ws, bs)
            clip_err, unclipped = clip_err + e, unclipped + e0
        q, scale = _int4_columns(ws, bs, amax)
        rw.record(lin, {**rw.dequantized_weight(lin, q, scale, 4, bs), "method": "awq"}, smoothing)
    rw.details.setdefault("awq", {})[group[0].module] = {
        "layers": [lin.module for lin in group], "ratio": ratio, "scale_error": err, "rtn_error": rtn_err,
        "clip_error": clip_err if o.awq_clip else None, "unclipped_error": unclipped if o.awq_clip else None,
        "rows": int(x.shape[0])}


# --------------------------------------------------------------------------------------------
# lm_head and embedding policy of the quantized precisions
# --------------------------------------------------------------------------------------------
def lm_head_and_tables(rw: Rewrite, head: Linear | None) -> None:
    """The lm_head fp16 between Casts (``--keep-fp32 logits``: fp32; ``--quantize-lm-head``: int8/int4
    weight-only by round-to-nearest); every embedding table fp16 with a Cast after its Gather (a tied
    table is stored once, fp16, read by the Gather and the lm_head)."""
    import onnx_ir as ir

    from llmtrt.pipelines.precision.half import cast_after, half_linear

    F16 = ir.DataType.FLOAT16
    fp32_table = None
    if head is not None:
        if rw.options.quantize_lm_head == "int8":
            int8_wo(rw, [head], None)
        elif rw.options.quantize_lm_head == "int4":
            int4_rtn(rw, [head], None)
        elif "logits" in rw.options.keep_fp32:
            rw.keep(head.module, "linear", "logits: the lm_head MatMul and its output in fp32 (--keep-fp32 logits)")
            rw.kept_linears[head.module] = "lm_head kept fp32 (--keep-fp32 logits)"
            fp32_table = head.weight if head.transposed else None
            rw.record(head, {"scheme": "fp32", "initializers": {"weight": head.weight.name}})
        else:
            half_linear(rw, head, F16)
            rw.kept_linears[head.module] = "lm_head kept fp16 (default; --quantize-lm-head int8|int4 quantizes it)"
            rw.record(head, {"scheme": "fp16", "initializers": {"weight": head.weight.name}})
    for gather in [n for n in rw.graph if n.op_type == "Gather" and n.domain in ("", "ai.onnx")]:
        table = gather.inputs[0]
        if table is None or not table.is_initializer() or len(table.shape or ()) != 2 or table is fp32_table:
            continue
        if table.dtype == ir.DataType.FLOAT:
            if any(u.node.op_type != "Gather" and u.node.outputs[0].dtype != F16 for u in table.uses()):
                continue  # read in fp32 elsewhere too (a kept lm_head): stays fp32, stored once
            rw.convert(table, F16)
        elif table.dtype != F16:
            continue
        gather.outputs[0].dtype = F16
        cast_after(rw.graph, gather, ir.DataType.FLOAT)
        rw.tables[table.name] = {"scheme": "fp16", "node": gather.name, "source": "model.embed_tokens.weight",
                                 "shared_with_lm_head": head is not None and head.transposed and head.weight is table
                                 and rw.options.quantize_lm_head is None}


def fp16_group(rw: Rewrite, group: list[Linear], stats) -> None:
    """Every linear of the group computes in fp16 (input cast in, fp16 weight, output cast back to fp32)."""
    import onnx_ir as ir

    from llmtrt.pipelines.precision.half import half_linear

    for lin in group:
        half_linear(rw, lin, ir.DataType.FLOAT16)
        rw.record(lin, {"scheme": "fp16", "initializers": {"weight": lin.weight.name}})


SCHEMES: dict[str, Scheme] = {"int8-wo": int8_wo, "int8-sq": int8_sq, "int4-rtn": int4_rtn, "int4-awq": int4_awq}
MIX_SCHEMES: dict[str, Scheme] = {**SCHEMES, "fp16": fp16_group}


def mixed(mix) -> Scheme:
    """A scheme that writes each group as ``mix`` (a :class:`~.mix.Mix`) says, recording each linear's scheme."""
    def scheme(rw: Rewrite, group: list[Linear], stats) -> None:
        name = mix.scheme_of(group[0].module)
        MIX_SCHEMES[name](rw, group, stats)
        for lin in group:
            rw.details.setdefault("mix", {})[lin.module] = name

    return scheme
