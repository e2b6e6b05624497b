"""``llmtrt quantize``: an fp32 export rewritten to fp16, bf16, int8 or int4 with the precision in the graph."""

from __future__ import annotations

import json
import sys
import time

import click

from llmtrt.pipelines.cli import main, user_errors

__all__ = ["quantize"]

# Names only, so `--help` needs no numpy/onnx; checked against llmtrt.pipelines.precision.quantize.PRECISIONS by a test.
PRECISION_NAMES = ("fp16", "bf16", "int8-sq", "int8-wo", "int4-awq", "int4-rtn")
KEEP_CATEGORIES = ("norm", "softmax", "logits")
EXIT_CONTRADICTION = 1


def _keep_fp32(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...] | None:
    if not value:
        return None
    items = [v.strip() for chunk in value for v in chunk.split(",") if v.strip()]
    return () if items == ["none"] else tuple(items)


@main.command()
@click.argument("export_dir", type=click.Path(file_okay=False))
@click.option("--to", "precision", required=True, type=click.Choice(PRECISION_NAMES),
              help="fp16 / bf16: every linear layer in half (fp32 inside RMSNorm and softmax, for --keep-fp32 "
                   "names and where calibration sees fp16 overflow); int8-sq: SmoothQuant W8A8 (int8 weights per "
                   "channel, static int8 activations, Q/DQ nodes); int8-wo: int8 weights only; int4-awq: int4 "
                   "weights in blocks with AWQ scales searched on the calibration text; int4-rtn: int4 by plain "
                   "rounding (the baseline AWQ must beat). int8/int4 keep the lm_head fp16.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output directory: model.onnx, manifest.json and, for calibrated precisions, "
                   "calibration_cache.json (+ calibration_rows.npz), reused when nothing changed.")
@click.option("--calib-text", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="UTF-8 text like the model's inputs, for fp16, int8-sq and int4-awq "
                   "(default: configs/text/calib.txt). Tokenized with the model's tokenizer.json, or bytes "
                   "for the byte-level built-in model.")
@click.option("--calib-samples", type=int, default=16, show_default=True,
              help="Calibration windows, evenly spaced over the text.")
@click.option("--calib-seq-len", type=int, default=128, show_default=True, help="Tokens per calibration window (at most the graph's positions, --max-positions of the export).")
@click.option("--calib-rows", type=int, default=256, show_default=True,
              help="Rows (tokens) of each linear layer's input sampled for the AWQ searches and the "
                   "percentile/entropy observers; the maxima and means use every row.")
@click.option("--observer", type=click.Choice(["max", "percentile", "entropy"]), default=None,
              help="How int8-sq turns activation samples into a range: max (default; exact after smoothing), "
                   "percentile (99.99th) or entropy (TensorRT's KL-divergence calibration).")
@click.option("--alpha", type=float, default=0.5, show_default=True,
              help="int8-sq: SmoothQuant migration strength, 0 (all range on activations) .. 1 (on weights).")
@click.option("--block-size", type=int, default=128, show_default=True,
              help="int4: input rows per scale block (DequantizeLinear-21 block_size).")
@click.option("--keep-fp32", "keep_fp32", multiple=True, callback=_keep_fp32, metavar="WHAT[,WHAT]",
              help="Kept in fp32: categories norm (the RMSNorm sum of squares, inside the op), softmax (the "
                   "attention softmax, inside the op) -- the default --, logits (the lm_head MatMul), and/or "
                   "module names (model.layers.0.mlp.down_proj) or node names (/lm_head/MatMul); `none` for "
                   "nothing. Repeatable; giving any replaces the default. Named linears are recorded as kept "
                   "and left out of the precision check.")
@click.option("--quantize-lm-head", type=click.Choice(["int8", "int4"]), default=None,
              help="int8/int4 precisions: quantize the lm_head too (weight-only, round-to-nearest). Default: "
                   "the lm_head stays fp16, as AutoAWQ and ModelOpt keep it; the logits output stays fp32.")
@click.option("--kv-cache-io", type=click.Choice(["fp32", "half"]), default="fp32", show_default=True,
              help="fp16 / bf16: type of past_key_values.* / present.* (logits always stay fp32).")
@click.option("--sensitivity", is_flag=True,
              help="int4-awq / int4-rtn: also measure each group of linears' sensitivity (mean KL of the logits "
                   "from fp32 with that group alone quantized, on the calibration windows); writes "
                   "OUT/sensitivity.md, .json and .png (with matplotlib) and records it in the manifest.")
@click.option("--max-ppl-increase", type=float, default=None, metavar="PCT",
              help="int4-awq / int4-rtn: an accuracy budget instead of a uniform precision: the most sensitive "
                   "groups fall back to int8-wo, then fp16, until the calibration-set perplexity is at most PCT "
                   "percent above fp32. Exit 1, nothing written, when no mix meets it.")
@click.option("--max-kl", type=float, default=None, metavar="X",
              help="Like --max-ppl-increase, for the mean KL divergence of the logits from fp32 (nats per token).")
@click.option("--no-bos", is_flag=True,
              help="Calibration windows without the BOS token. Default: each window starts with BOS when the "
                   "checkpoint's tokenizer adds one (tokenizer_config.json add_bos_token), as prompts do.")
@click.option("--json", "as_json", is_flag=True, help="Print only the machine-readable summary.")
@user_errors
def quantize(export_dir: str, precision: str, out_dir: str, calib_text: str | None, calib_samples: int,
             calib_seq_len: int, calib_rows: int, observer: str | None, alpha: float, block_size: int,
             keep_fp32: tuple[str, ...] | None, quantize_lm_head: str | None, kv_cache_io: str,
             sensitivity: bool, max_ppl_increase: float | None, max_kl: float | None, no_bos: bool,
             as_json: bool) -> None:
    """Rewrite the fp32 export in EXPORT_DIR to another precision, explicitly in the ONNX graph.

    TensorRT 11 and TensorRT-RTX build what the graph says (no fp16/int8 builder flags, no INT8
    calibrator), so this is the step that makes an fp16, int8 or int4 engine possible. The result
    runs in ONNX Runtime as it is and is built with `llmtrt build OUT --precision ...`.
    OUT/manifest.json records the precision, the source ONNX's sha256, the options, a calibration
    summary, every tensor or node kept in fp32 with the reason, the weight map (where each linear's
    weight came from and how) and the precision inventory of the written graph. An artifact whose
    inventory contradicts --to (e.g. an fp16 graph with under 90% of linear FLOPs in fp16) is
    refused: exit 1, nothing written.

    \b
    Examples:
      llmtrt export --model bytes-llama --out out/onnx
      llmtrt quantize out/onnx --to fp16 --out out/fp16
      llmtrt quantize out/onnx --to int8-sq --out out/int8-sq --calib-text my_prompts.txt --alpha 0.6
      llmtrt quantize out/onnx --to int4-awq --out out/int4-awq --block-size 64
      llmtrt build out/int4-awq --out out/engines/int4          (an int4-awq engine)
    """
    from llmtrt.pipelines.artifacts import read_manifest
    from llmtrt.pipelines.precision.inventory import Inventory
    from llmtrt.pipelines.precision.quantize import PrecisionContradiction, PrecisionOptions
    from llmtrt.pipelines.precision.quantize import quantize as run

    kwargs = {} if keep_fp32 is None else {"keep_fp32": keep_fp32}
    options = PrecisionOptions(calib_text=calib_text, calib_samples=calib_samples, calib_seq_len=calib_seq_len,
                               calib_rows=calib_rows, observer=observer, alpha=alpha, block_size=block_size,
                               kv_cache_io=kv_cache_io, quantize_lm_head=quantize_lm_head, progress=not as_json,
                               add_bos=False if no_bos else None, **kwargs)
    t0 = time.perf_counter()
    try:  # the inputs are checked before the first line of progress
        if sensitivity or max_ppl_increase is not None or max_kl is not None:
            if not as_json:
                click.echo(f"quantizing {export_dir} to {precision} within an accuracy budget", err=True)
            out = _to_budget(export_dir, out_dir, precision, options, max_ppl_increase, max_kl)
        else:
            out = run(export_dir, out_dir, precision, options, started=None if as_json else lambda: click.echo(
                f"quantizing {export_dir} to {precision}", err=True))
    except PrecisionContradiction as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_CONTRADICTION)
    manifest = read_manifest(out)
    inventory = Inventory.from_dict(manifest["precision_inventory"])
    summary = {"onnx": str(out / manifest["onnx"]), "manifest": str(out / "manifest.json"),
               "precision": precision, "engine_precision": manifest["engine_precision"],
               "opset": manifest["opset"], "onnx_sha256": manifest["onnx_sha256"],
               "source_onnx_sha256": manifest["source_onnx_sha256"], "calibration": manifest["calibration"],
               "fp32_kept": manifest["fp32_kept"], "inventory": inventory.shares(),
               "seconds": round(time.perf_counter() - t0, 3)}
    for key in ("weight_bits", "mix", "sensitivity"):
        if manifest.get(key) is not None:
            summary[key] = manifest[key]
    summary["precision"] = manifest["precision"]
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    _print_mix(manifest)
    cal = manifest["calibration"]
    if cal:
        click.echo(f"calibration: {cal['windows']} windows x {cal['seq_len']} tokens of {cal['calib_text']} "
                   f"({cal['cache']}, observer {cal['observer']})")
    for kept in manifest["fp32_kept"]:
        click.echo(f"fp32 kept: {kept['name']} ({kept['reason']})")
    click.echo(inventory.summary())
    click.echo(f"wrote {summary['onnx']} ({manifest['precision']}, opset {manifest['opset']}) in "
               f"{summary['seconds']:.1f} s; build it with `llmtrt build {out} --out DIR`")


def _to_budget(export_dir: str, out_dir: str, precision: str, options, max_ppl_increase: float | None,
               max_kl: float | None):
    """The sensitivity / budget path (llmtrt.pipelines.precision.mixed); exit 1 when no mix meets the budget."""
    from llmtrt.pipelines.precision.budget import Budget, BudgetNotMet
    from llmtrt.pipelines.precision.mixed import quantize_to_budget

    budget = None if max_ppl_increase is None and max_kl is None else Budget(max_ppl_increase, max_kl)
    try:
        out, _ = quantize_to_budget(export_dir, out_dir, precision, options, budget)
    except BudgetNotMet as exc:
        click.echo(f"error: {exc}", err=True)
        for step in exc.result.steps[-3:]:
            click.echo(f"  tried: {step['moves']} groups moved (last {step['last']}): "
                       f"ppl {100 * step['ppl_increase']:+.3f}% KL {step['mean_kl']:.3e}", err=True)
        sys.exit(EXIT_CONTRADICTION)
    return out


def _print_mix(manifest: dict) -> None:
    sens = manifest.get("sensitivity")
    if sens:
        click.echo(f"sensitivity to {sens['target']} ({sens['windows']}), most sensitive first:")
        for row in sens["groups"][:5]:
            click.echo(f"  {row['rank']:2d}. {row['group']:40s} KL {row['mean_kl']:.3e}  "
                       f"ppl {100 * row['ppl_increase']:+.3f}%")
    mix = manifest.get("mix")
    if mix:
        cal, search = mix["calibration"], mix["search"]
        counts: dict[str, int] = {}
        for scheme in mix["groups"].values():
            counts[scheme] = counts.get(scheme, 0) + 1
        click.echo(f"mix {manifest['precision']}: " + ", ".join(f"{n} groups {s}" for s, n in counts.items())
                   + f"; calibration ppl {100 * cal['ppl_increase']:+.3f}%, KL {cal['mean_kl']:.3e}; "
                   f"{search['evaluations']} evaluations in {search['evaluation_seconds']:.1f} s")
    bits = manifest.get("weight_bits")
    if bits:
        click.echo(f"effective bits per linear weight: {bits['bits_per_weight']:.3f} ({bits['counted']})")

