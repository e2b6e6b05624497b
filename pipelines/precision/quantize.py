"""``llmtrt quantize``: precision made explicit in the ONNX graph, streamed layer by layer.

    out = quantize("out/onnx", "out/int8-sq", "int8-sq", PrecisionOptions(calib_text="configs/text/calib.txt"))

TensorRT 11 and TensorRT-RTX have no fp16/int8 builder flags and no INT8 calibrator: an engine
runs in the types its graph spells out. Each entry of :data:`PRECISIONS` rewrites an fp32 export
(``llmtrt export``) into one such graph, written with a manifest of the export's schema:

=========  =====================================================================================
fp16/bf16  every linear (and every other op) in half; fp32 only inside the ops that need it (the
           RMSNorm reduction, the softmax), for ``--keep-fp32`` names and for tensors whose
           calibrated range overflows fp16, with Casts at those islands' boundaries. Graph IO fp32
           (``kv_cache_io="half"`` makes the KV cache half).
int8-sq    SmoothQuant W8A8: per-input-channel smoothing (alpha), int8 per-output-channel
           weights + DequantizeLinear, per-tensor static int8 activations (Q -> DQ).
int8-wo    int8 per-output-channel weights + DequantizeLinear; activations fp32.
int4-awq   int4 weights blocked along the input axis (DequantizeLinear-21 ``block_size``), with
           AWQ's activation-aware scales and clipping searched on calibration rows.
int4-rtn   the same int4 layout by plain round-to-nearest: the baseline AWQ must beat.
=========  =====================================================================================

In the int8/int4 precisions the lm_head stays fp16 (``--quantize-lm-head int8|int4`` opts in) and
the embedding table is stored fp16 (a tied one once). The source is read through onnx_ir (weights
stay on disk until used), calibration runs one stage at a time, each group of linears is quantized
and written to ``model.onnx.data`` as soon as its statistics exist: memory stays about one layer.
The written graph's precision inventory (:mod:`.inventory`) is checked against the request before
anything is kept: a contradicting artifact is refused (:class:`PrecisionContradiction`, exit 1).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmtrt.pipelines.errors import LlmtrtUserError
from llmtrt.pipelines.precision import quant_math as qm
from llmtrt.pipelines.precision.rewrite import Rewrite

KEEP_CATEGORIES = ("norm", "softmax", "logits")
DEFAULT_KEEP = ("norm", "softmax")
LM_HEAD_FORMATS = ("int8", "int4")
FP16_HEADROOM = 0.5  # a tensor whose calibrated |x| exceeds half the fp16 range stays fp32


class PrecisionContradiction(RuntimeError):
    """The graph written does not compute in the precision asked for (the CLI exits 1)."""


@dataclass(frozen=True)
class PrecisionOptions:
    """Options of the precision step; each precision reads the ones it needs (see ``llmtrt quantize --help``)."""

    calib_text: str | None = None          # default: configs/text/calib.txt
    calib_samples: int = 16
    calib_seq_len: int = 128
    calib_rows: int = 256                  # rows of each linear input sampled for AWQ and the observers
    observer: str | None = None            # max | percentile | entropy; default per precision
    alpha: float = 0.5                     # SmoothQuant migration strength
    block_size: int = 128                  # int4 block along the input axis
    keep_fp32: tuple[str, ...] = DEFAULT_KEEP  # categories and/or module / node names
    kv_cache_io: str = "fp32"              # fp16/bf16: "fp32" or "half" past_key_values/present
    awq_grid: int = 20                     # AWQ ratios tried: 0, 1/grid, ..., 1
    awq_clip: bool = True                  # AWQ's per-block clipping search after the scale search
    awq_rows: int = 128                    # of the sampled rows, how many the AWQ searches use
    quantize_lm_head: str | None = None    # int8 / int4: quantize the lm_head too (default: fp16)
    add_bos: bool | None = None            # calibration windows start with BOS: None as the checkpoint says, False never
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
        if self.calib_rows < 1 or self.awq_rows < 1:
            raise LlmtrtUserError(f"--calib-rows must be at least 1, got {self.calib_rows}")
        if self.quantize_lm_head not in (None, *LM_HEAD_FORMATS):
            raise LlmtrtUserError(f"--quantize-lm-head {self.quantize_lm_head!r}: choose int8 or int4")
        unknown = [k for k in self.keep_fp32 if k not in KEEP_CATEGORIES and not ("." in k or "/" in k)]
        if unknown:
            raise LlmtrtUserError(f"--keep-fp32 {unknown[0]!r}: give a category ({', '.join(KEEP_CATEGORIES)}), a "
                                  "module name (model.layers.0.mlp.down_proj) or a node name (/lm_head/MatMul)")


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
# fp16 / bf16
# --------------------------------------------------------------------------------------------
def _half(label: str) -> Callable[[Rewrite], None]:
    def apply(rw: Rewrite) -> None:
        import onnx_ir as ir

        from llmtrt.pipelines.precision.graph import find_linears
        from llmtrt.pipelines.precision.half import convert_to_half

        half = ir.DataType.FLOAT16 if label == "fp16" else ir.DataType.BFLOAT16
        if rw.calibration is not None:
            for _ in rw.calibration.stages():
                pass  # every stage's ranges, before the types are chosen
        pinned = _pinned(rw, half)
        plan = convert_to_half(rw.graph, half, pinned=pinned, kv_cache_io=rw.options.kv_cache_io,
                               keep=tuple(k for k in rw.options.keep_fp32 if k in ("norm", "softmax")))
        for target, source in plan.to_half:
            rw.to_half.append((target, source, half))
        for lin in find_linears(rw.graph):
            weight = lin.node.inputs[1]
            scheme = label if lin.node.inputs[0].dtype == half else "fp32"
            rw.record(lin, {"scheme": scheme, "initializers": {"weight": _root(weight).name}})
        for name, reason in plan.pinned.items():
            rw.keep(name, "node", reason)
        for category in ("norm", "softmax"):
            if category in rw.options.keep_fp32:
                rw.keep(category, "category", _CATEGORY_REASONS[category])
        rw.details.update({"half_type": label, "casts_inserted": plan.casts, "fp32_nodes": len(plan.pinned),
                           "attributes_set": plan.attributes, "kv_cache_io": rw.options.kv_cache_io,
                           "logits_io": "fp32", "overflowing_tensors": rw.details.get("overflowing_tensors", [])})

    return apply


_CATEGORY_REASONS = {
    "norm": "norm: the RMSNorm sum of squares in fp32 inside the op (llmtrt.RMSNorm body / RMSNormalization "
            "stash_type=1 / the decomposed Cast island); the node itself runs in half",
    "softmax": "softmax: the attention softmax in fp32 inside the op (GroupQueryAttention body / Attention "
               "softmax_precision=FLOAT / the decomposed Cast island); its GEMMs and the KV cache run in half",
}


def _root(value):
    while not value.is_initializer() and value.producer() is not None and value.producer().inputs:
        value = value.producer().inputs[0]
    return value


def _pinned(rw: Rewrite, half) -> dict[Any, str]:
    """Nodes kept fp32: --keep-fp32 names, logits, and the producers/readers of overflowing tensors."""
    import onnx_ir as ir

    from llmtrt.pipelines.precision.graph import find_linears

    keep = set(rw.options.keep_fp32)
    pinned: dict[Any, str] = {}
    for lin in find_linears(rw.graph):
        if lin.module in keep or lin.node.name in keep:
            pinned[lin.node] = "named in keep_fp32"
            rw.kept_linears[lin.module] = "named in --keep-fp32"
        if lin.role == "lm_head" and "logits" in keep:
            pinned[lin.node] = "logits: the lm_head MatMul and its output in fp32 (--keep-fp32 logits)"
            rw.kept_linears[lin.module] = "lm_head kept fp32 (--keep-fp32 logits)"
    for node in rw.graph:
        if node.name and node.name in keep:
            pinned[node] = "named in keep_fp32"
    stats = rw.calibration.stats if rw.calibration is not None else None
    if stats is None or half != ir.DataType.FLOAT16:
        return pinned
    limit = qm.FP16_MAX * FP16_HEADROOM
    overflow = {}
    for node in rw.graph:
        if not any(v is not None and not v.is_initializer() and v.dtype == ir.DataType.FLOAT for v in node.inputs):
            continue  # computed from constants only: clamped to the fp16 range instead
        for out in node.outputs:
            amax = stats.amax.get(out.name)
            if amax is not None and amax > limit:
                overflow[out.name] = amax
                reason = f"overflow: {out.name} reaches |x| = {amax:.4g} in calibration, above {limit:g}"
                for n in (node, *(u.node for u in out.uses())):
                    pinned.setdefault(n, reason)
    for name, amax in overflow.items():
        rw.keep(name, "tensor", f"calibrated max |x| = {amax:.6g} exceeds {limit:g} (half the fp16 range)")
    rw.details["overflowing_tensors"] = list(overflow)
    return pinned


# --------------------------------------------------------------------------------------------
# int8 / int4
# --------------------------------------------------------------------------------------------
def _quantized(name: str) -> Callable[[Rewrite], None]:
    def apply(rw: Rewrite) -> None:
        from llmtrt.pipelines.precision import schemes

        lins, head = schemes.quantizable(rw)
        schemes.walk(rw, schemes.mixed(rw.mix) if rw.mix is not None else schemes.SCHEMES[name], lins)
        schemes.lm_head_and_tables(rw, head)
        if name.startswith("int4"):
            rw.details["block_size"] = rw.options.block_size
        if name == "int8-sq":
            rw.details["alpha"] = rw.options.alpha

    return apply


PRECISIONS: dict[str, Precision] = {p.name: p for p in (
    Precision("fp16", "fp16", "every linear fp16; fp32 inside RMSNorm and softmax, and for overflowing tensors",
              True, None, 0, _half("fp16")),
    Precision("bf16", "bf16", "every linear bf16; fp32 inside RMSNorm and softmax", False, None, 0, _half("bf16")),
    Precision("int8-sq", "int8", "SmoothQuant W8A8: int8 per-channel weights, static per-tensor int8 activations",
              True, "max", 13, _quantized("int8-sq")),
    Precision("int8-wo", "int8", "int8 per-channel weights, fp32 activations", False, None, 13, _quantized("int8-wo")),
    Precision("int4-awq", "int4", "int4 blocked weights with AWQ activation-aware scales", True, None, 21,
              _quantized("int4-awq")),
    Precision("int4-rtn", "int4", "int4 blocked weights, round-to-nearest (AWQ's baseline)", False, None, 21,
              _quantized("int4-rtn")),
)}


# --------------------------------------------------------------------------------------------
# the step
# --------------------------------------------------------------------------------------------
@dataclass
class _Inputs:
    """Everything checked before the heavy work starts."""

    src_dir: Path
    raw: dict[str, Any]
    exported: Any
    entry: Precision
    windows: np.ndarray | None
    text: Path | None
    tokenizer_name: str | None
    bos_id: int | None = None     # first token of every calibration window, when the tokenizer adds one


def quantize(src_dir: str | Path, out_dir: str | Path, precision: str,
             options: PrecisionOptions = PrecisionOptions(),  # noqa: B008 (frozen, immutable)
             started: Callable[[], None] | None = None, *, mix: Any = None, cache_from: Path | None = None,
             extra_manifest: dict[str, Any] | None = None, extra_files: dict[str, bytes] | None = None) -> Path:
    """Rewrite the fp32 export in ``src_dir`` to ``precision``; writes out_dir/model.onnx (+ data) and
    manifest.json. Returns ``out_dir``. Calibrated precisions also leave calibration_cache.json (+ rows),
    reused next time when the source graph, text, tokenizer, samples, length and rows are unchanged.
    Raises LlmtrtUserError on bad input (before any heavy work; ``started`` is called once the inputs
    passed their checks) and PrecisionContradiction when the written graph is not what was asked for;
    ``out_dir`` is then left as it was.

    ``mix`` (:class:`~.mix.Mix`, base ``precision``) writes each group of linears in its own scheme;
    ``cache_from`` is a directory whose calibration cache may be reused (an artifact of the same source
    and text); ``extra_manifest`` / ``extra_files`` are added to the manifest / the directory."""
    from llmtrt.exporter.files import artifact_dir
    from llmtrt.pipelines.precision.calibration import CACHE_FILE, ROWS_FILE

    t0 = time.perf_counter()
    inputs = _check(Path(src_dir), Path(out_dir), precision, options)
    if mix is not None:
        mix.check()
        if mix.base != precision:
            raise ValueError(f"mix {mix.name!r} is based on {mix.base}, not {precision}")
    if started is not None:
        started()
    with artifact_dir(out_dir, carry=(CACHE_FILE, ROWS_FILE)) as tmp:
        for name in (CACHE_FILE, ROWS_FILE) if cache_from is not None else ():
            if (Path(cache_from) / name).is_file() and not (tmp / name).exists():
                shutil.copyfile(Path(cache_from) / name, tmp / name)
        _quantize_into(tmp, inputs, options, t0, mix, extra_manifest or {})
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
    return Path(out_dir)


def _check(src_dir: Path, out_dir: Path, precision: str, options: PrecisionOptions) -> _Inputs:
    from llmtrt.exporter.files import check_out_dir
    from llmtrt.pipelines.artifacts import load_exported, load_graph, read_manifest

    if precision not in PRECISIONS:
        raise LlmtrtUserError(f"--to {precision!r}: unknown precision; choose from {', '.join(PRECISIONS)}")
    entry = PRECISIONS[precision]
    options.check()
    raw = read_manifest(src_dir)
    if raw.get("precision", "fp32") != "fp32":
        raise LlmtrtUserError(f"{src_dir}: is already {raw['precision']}; quantize the fp32 export written by "
                              "`llmtrt export`")
    exported = load_exported(src_dir, raw)
    if out_dir.resolve() == src_dir.resolve():
        raise LlmtrtUserError(f"--out {out_dir}: is the export directory itself; give a new directory")
    check_out_dir(out_dir)
    load_graph(exported.onnx_path)  # a truncated graph fails here, not half-way
    windows = text = name = bos_id = None
    if entry.calibrated:
        from llmtrt.pipelines.precision.calibration import DEFAULT_CALIB_TEXT, calibration_windows
        from llmtrt.pipelines.runtime.tokenizer import load_tokenizer

        text = Path(options.calib_text) if options.calib_text else DEFAULT_CALIB_TEXT
        tokenizer = load_tokenizer(src_dir, add_bos=options.add_bos)
        bos_id = tokenizer.bos_id if tokenizer.add_bos else None
        from llmtrt.pipelines.engine.profiles import max_positions_from_file

        # a window longer than the graph's rotary table cannot run (ONNX Runtime: "Updating cos_cache and
        # sin_cache in RotaryEmbedding is not currently supported"): an export with --max-positions 64
        # calibrates on windows of 64 tokens
        positions = max_positions_from_file(exported.onnx_path)
        seq_len = min(options.calib_seq_len, positions) if positions else options.calib_seq_len
        windows = calibration_windows(text, tokenizer, options.calib_samples, seq_len, bos_id=bos_id)
        name = getattr(tokenizer, "name", type(tokenizer).__name__)
    return _Inputs(src_dir, raw, exported, entry, windows, text, name, bos_id)


def _quantize_into(out_dir: Path, inputs: _Inputs, options: PrecisionOptions, t0: float, mix: Any,
                   extra_manifest: dict[str, Any]) -> None:
    import onnx

    from llmtrt.pipelines.precision.graph import Source, TensorSink
    from llmtrt.pipelines.precision.inventory import inventory

    entry, exported, raw = inputs.entry, inputs.exported, inputs.raw
    source = Source.open(inputs.src_dir, exported.onnx_path, raw, exported)
    sink = TensorSink(out_dir, source.external)
    rw = Rewrite(source, options, sink, mix=mix)
    try:
        if entry.calibrated:
            rw.calibration = _calibration(rw, inputs, out_dir)
        entry.apply(rw)
        proto = _finish(rw, entry)
    finally:
        sink.close()
    inv = inventory(proto)
    if mix is None:
        name, problem = entry.name, inv.contradicts(entry.name)
    else:
        from llmtrt.pipelines.precision.mix import LABELS

        name = mix.name
        problem = inv.contradicts_mix({m: LABELS[s] for m, s in rw.details.get("mix", {}).items()})
    if problem:
        raise PrecisionContradiction(f"refusing to write a {name} artifact: {problem}. Nothing was written; "
                                     "--keep-fp32 MODULE keeps named linears out of the precision on purpose")
    path = out_dir / "model.onnx"
    onnx.save(proto, str(path))
    onnx.checker.check_model(str(path))
    from llmtrt.pipelines.precision.mix import effective_bits

    extra_manifest = {**extra_manifest, "weight_bits": effective_bits(inv.to_dict())}
    if mix is not None:
        extra_manifest["mix"] = {**mix.record, "base": mix.base, "linears": rw.details.pop("mix", {})}
    _write_manifest(rw, inputs, path, proto, inv, t0, name, extra_manifest)


def _calibration(rw: Rewrite, inputs: _Inputs, out_dir: Path):
    from llmtrt.pipelines.precision.calibration import Calibration, cache_key
    from llmtrt.pipelines.precision.graph import find_linears

    # fp16 only needs each tensor's range; int8/int4 also the linear inputs' channels and sampled rows
    linear_inputs = [] if inputs.entry.name in ("fp16", "bf16") else list(dict.fromkeys(
        lin.x.name for lin in find_linears(rw.graph)))
    source_sha = inputs.raw.get("onnx_sha256")
    if not source_sha:
        from llmtrt.pipelines.artifacts import onnx_sha256

        source_sha = onnx_sha256(inputs.exported.onnx_path)
    key = cache_key(source_sha, inputs.text, inputs.tokenizer_name, inputs.windows, linear_inputs,
                    rw.options.calib_rows, bos_id=inputs.bos_id)
    return Calibration(rw.source, inputs.windows, linear_inputs, out_dir, key, rw.options.calib_rows,
                       progress=rw.options.progress)


def _finish(rw: Rewrite, entry: Precision):
    """Write the converted tables and changed norms, carry the rest; the ModelProto (weights external)."""
    import onnx_ir as ir

    from llmtrt.pipelines.precision.half import half_blocks
    from llmtrt.pipelines.precision.inventory import KEPT_METADATA

    clamped = [0]
    for target, source, half in rw.to_half:
        shape = tuple(int(d) for d in source.shape)
        rw.sink.put_blocks(target, half_blocks(source, half, clamped), half, shape)
    for name, array in rw.modified.items():
        rw.sink.put(rw.graph.initializers[name], array.astype(np.float32), ir.DataType.FLOAT)
    if clamped[0]:
        rw.details["clamped_values"] = clamped[0]
    rw.source.model.metadata_props[KEPT_METADATA] = json.dumps(rw.kept_linears, sort_keys=True)
    proto = rw.sink.finish(rw.source.model)
    if entry.min_opset:
        from llmtrt.pipelines.precision.opset import raise_opset

        rw.details["opset"] = raise_opset(proto, entry.min_opset)
    return proto


def _write_manifest(rw: Rewrite, inputs: _Inputs, path: Path, proto, inv, t0: float, name: str,
                    extra: dict[str, Any]) -> None:
    from llmtrt.exporter.kv_cache import get_layout
    from llmtrt.pipelines.artifacts import peak_rss_bytes, write_export_manifest

    entry, exported, options = inputs.entry, inputs.exported, rw.options
    half = entry.name in ("fp16", "bf16") and options.kv_cache_io == "half"
    io = get_layout(exported.kv_cache).io_spec(
        exported.config, cache_dtype={"fp16": "float16", "bf16": "bfloat16"}[entry.name]) if half else exported.io
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    stats = {"quantize_seconds": round(time.perf_counter() - t0, 3), "peak_rss_bytes": peak_rss_bytes(),
             "weights_bytes": rw.sink.written, "external_data": rw.sink.external, "source_stats": exported.stats}
    result = dataclasses.replace(exported, onnx_path=path, opset=opset, io=io, stats=stats)
    calibration = None
    if rw.calibration is not None:
        calibration = {**rw.calibration.stats.summary(), "observer": options.observer or entry.observer or "max"}
    write_export_manifest(result, inputs.raw, extra={
        **_jsonable(extra),
        "precision": name,
        "engine_precision": entry.engine_precision,
        "source_onnx": str(exported.onnx_path.resolve()),
        "source_onnx_sha256": inputs.raw.get("onnx_sha256"),
        "precision_options": _options_dict(options),
        "calibration": calibration,
        "fp32_kept": rw.fp32_kept,
        "precision_details": _jsonable(rw.details),
        "precision_inventory": inv.to_dict(),
        "weight_map": {"linears": _jsonable(rw.weight_map), "tables": rw.tables,
                       "norms": {n: {"scheme": "fp32", "source": n, "changed": "divided by a smoothing factor"}
                                 for n in rw.modified}},
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
