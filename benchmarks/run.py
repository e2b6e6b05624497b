"""Benchmarks: export time and peak memory, ONNX Runtime CPU prefill/decode of our graphs per dialect and
precision, against PyTorch eager, the onnxruntime-genai model builder and the memory-bandwidth bound, in
one run. Prints a table and writes JSON.

    python -m benchmarks.run --quick --json out/bench.json   # tiny + bytes-llama only (CI smoke, < 1 min)
    python -m benchmarks.run --json out/bench.json           # + 1.1B-shaped export, 156M-shaped decode
    python -m benchmarks.run --profile out/profile           # ORT profile of one decode step, ours vs builder

Each export runs in its own subprocess so its peak RSS is its own. Decode: batch 1, a 128-token prompt
(prefill latency), then 128 greedy tokens with the KV cache (tokens/s), 2 threads; medians over
repeats. Our graphs run in ONNX Runtime: fp32 in each dialect, int8-wo and int4-awq (when
llmtrt.pipelines.precision.quantize is importable) of the first dialect. The builder's graphs (onnxruntime-genai in
.venv-bench; -p fp32/int8/int4 -e cpu) run in the onnxruntime-genai runtime, which their shared KV
buffers need; the same builder exports the 1.1B-shaped checkpoint next to ours. Every row's prefill
logits and greedy tokens are checked against our first fp32 graph (same checkpoint, same prompt).
The bandwidth bound is (2-thread read GB/s) / (fp32 bytes read per decoded token: every weight but the
embedding table, plus the KV cache). Benchmark checkpoints (config.json, model.safetensors and a
byte-level tokenizer.json) are written under --work (default /tmp/llmtrt-bench) by
benchmarks.make_checkpoint and are never part of the repo.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import (
    THREADS,
    bench_python,
    ensure_checkpoint,
    genai_build,
    genai_decode,
    median_time,
)
from benchmarks.decode import ort_decode, torch_eager_decode


def memory_bandwidth_gbs(mib: int = 512, repeats: int = 5, threads: int = 2) -> float:
    """Read bandwidth in GB/s: a sum over a large fp32 array on ``threads`` threads, as decode reads
    its weights (a single-thread numpy copy measured about half of this and put "of bound" above 1)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.ones(mib << 18, dtype=torch.float32)
        x.sum()  # first touch
        seconds = median_time(lambda: x.sum(), repeats)
    finally:
        torch.set_num_threads(previous)
    return x.numel() * x.element_size() / seconds / 1e9


# --- export ----------------------------------------------------------------------------------------

def _export_child(spec: str, out: str, dialect: str) -> None:
    """Runs in a subprocess: export one model, print one JSON line with time and peak RSS."""
    from llmtrt.exporter.config import resolve_model
    from llmtrt.exporter.onnx_export import ExportOptions
    from llmtrt.pipelines.artifacts import export_artifact

    t0 = time.perf_counter()
    result = export_artifact(resolve_model(spec), out, ExportOptions(dialect=dialect))  # the build benchmark reads it
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"export_seconds": round(seconds, 2), "peak_rss_bytes": peak,
                      "streaming": result.stats["streaming"], "weights_bytes": result.stats["weights_bytes"]}))


def measure_export(spec: str, out: Path, dialect: str = "custom") -> dict:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--export-child", spec, str(out), dialect],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"export of {spec} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_build(export_dir: Path, out: Path) -> dict:
    """TensorRT-RTX ahead-of-time build (fp32, --lower native, SM89) of an export: seconds and plan size."""
    import logging

    from llmtrt.pipelines.engine.from_export import build_from_export

    logging.getLogger("llmtrt.pipelines.engine.backends").setLevel(logging.ERROR)  # int64-binding notes: in the manifest
    try:
        result = build_from_export(export_dir, out, backend="tensorrt-rtx", lower="native", target_cc=["8.9"])
    except Exception as exc:  # a missing backend or a failed build is a figure too: say why
        return {"model": export_dir.name, "error": str(exc).splitlines()[0]}
    m = result.manifest
    return {"model": export_dir.name, "backend": f"{m['backend']['name']} {m['backend']['version']}",
            "build_seconds": m["stats"]["build_seconds"], "plan_bytes": m["plan_bytes"],
            "network_layers": m["network"]["num_layers"]}


# --- decode ----------------------------------------------------------------------------------------

def bytes_per_token(config, context: int) -> int:
    """fp32 bytes read to decode one token: every weight but the embedding table (one row is
    gathered), plus the K and V cache of ``context`` positions."""
    weights = config.num_parameters - config.vocab_size * config.hidden_size
    cache = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * context
    return 4 * (weights + cache)


# --- the run ---------------------------------------------------------------------------------------

GENAI_PRECISIONS = ("fp32", "int8", "int4")  # the builder's CPU precisions (-p ... -e cpu)
OUR_QUANTIZED = ("int8-wo", "int4-awq")       # llmtrt.pipelines.precision.quantize.quantize() of our fp32 export


def _genai_version() -> str | None:
    """The onnxruntime-genai version importable by .venv-bench's python, else None."""
    if not bench_python().exists():
        return None
    proc = subprocess.run([str(bench_python()), "-c", "import onnxruntime_genai as g; print(g.__version__)"],
                          capture_output=True, text=True, check=False, cwd="/")
    return proc.stdout.strip() if proc.returncode == 0 else None


def _agreement(row: dict, reference: dict) -> None:
    """Same checkpoint, same prompt: max |logit difference| at the prefill's last position, and after how
    many greedy tokens the row's continuation first differs from the reference graph's (all equal: new_tokens)."""
    import numpy as np

    diff = np.max(np.abs(row["_prefill_logits"] - reference["_prefill_logits"]))
    row["max_abs_logit_diff_vs_ref"] = round(float(diff), 6)
    ours, ref = row["_tokens"], reference["_tokens"]
    row["greedy_tokens_equal_ref"] = next((k for k, (a, b) in enumerate(zip(ours, ref, strict=True)) if a != b),
                                          len(ref))


def run(quick: bool, work: Path, repeats: int, dialects: list[str], with_genai: bool = True) -> dict:
    from llmtrt.exporter.config import resolve_model

    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"quick": quick, "threads": THREADS, "repeats": repeats, "cpu_count": os.cpu_count(),
                    "load_average_start": os.getloadavg()}
    report["memory_bandwidth_gbs"] = round(memory_bandwidth_gbs(), 2)
    genai_version = _genai_version() if with_genai and not quick else None
    report["onnxruntime_genai"] = genai_version or (
        "not measured: --quick" if quick else "not measured: --no-genai" if not with_genai else
        "not measured: no .venv-bench with onnxruntime-genai (python -m venv .venv-bench; "
        ".venv-bench/bin/pip install onnxruntime-genai)")

    export_models = ["tiny", "bytes-llama"] + ([] if quick else [str(ensure_checkpoint(work, "1.1b"))])
    report["export"] = []
    for spec in export_models:
        row = {"model": spec, "exporter": "llmtrt", **measure_export(spec, work / "export" / Path(spec).name)}
        fp32_bytes = 4 * resolve_model(spec).config.num_parameters
        row["peak_rss_over_fp32_weights"] = round(row["peak_rss_bytes"] / fp32_bytes, 3)
        report["export"].append(row)
        if genai_version and Path(spec).is_dir():  # the builder needs an HF checkpoint dir with a tokenizer
            out = work / "genai-export" / Path(spec).name
            brow = {"model": spec, "exporter": f"onnxruntime-genai {genai_version}",
                    **genai_build(Path(spec), out, "fp32")}
            shutil.rmtree(out, ignore_errors=True)  # 4.4 GB for the 1.1B shape: keep only the figures
            if "error" not in brow:
                brow["peak_rss_over_fp32_weights"] = round(brow.get("peak_rss_bytes", 0) / fp32_bytes, 3)
                row["seconds_vs_builder"] = round(row["export_seconds"] / brow["export_seconds"], 3)
            report["export"].append(brow)

    report["build"] = [measure_build(work / "export" / name, work / "engines" / name) for name in ("tiny", "bytes-llama")]

    decode_spec = "bytes-llama" if quick else str(ensure_checkpoint(work, "156m"))
    source = resolve_model(decode_spec)
    prompt_len, new_tokens = (32, 32) if quick else (128, 128)
    bound_bytes = bytes_per_token(source.config, prompt_len + new_tokens // 2)
    decode = {"model": decode_spec, "prompt_tokens": prompt_len, "new_tokens": new_tokens,
              "bytes_per_token": bound_bytes,
              "bandwidth_bound_tok_s": round(report["memory_bandwidth_gbs"] * 1e9 / bound_bytes, 2),
              "rows": [], "errors": []}
    from llmtrt.exporter.onnx_export import ExportOptions
    from llmtrt.pipelines.artifacts import export_artifact

    for dialect in dialects:  # exported in this process: only the timings below matter here
        out = work / "decode" / dialect
        export_artifact(source, out, ExportOptions(dialect=dialect))  # quantize() reads it
        decode["rows"].append({"runtime": "onnxruntime", "graph": "llmtrt", "dialect": dialect, "precision": "fp32",
                               **ort_decode(out / "model.onnx", source.config, prompt_len, new_tokens, repeats)})
    decode["rows"].extend(_our_quantized(decode, work, source, dialects[0], prompt_len, new_tokens, repeats, quick))
    if genai_version:
        for precision in GENAI_PRECISIONS:
            out = work / "genai" / precision
            built = genai_build(source.checkpoint_dir, out, precision)
            if "error" in built:
                decode["errors"].append(f"onnxruntime-genai {precision}: {built['error']}")
                continue
            measured = genai_decode(out, prompt_len, new_tokens, repeats)
            if "error" in measured:
                decode["errors"].append(f"onnxruntime-genai {precision} decode: {measured['error']}")
                continue
            decode["rows"].append({"runtime": "onnxruntime-genai", "graph": f"genai-builder {genai_version}",
                                   "dialect": "-", "precision": precision, "build_seconds": built["export_seconds"],
                                   **measured})
    if source.checkpoint_dir is not None and importlib.util.find_spec("transformers") is not None:
        decode["rows"].append({"runtime": "pytorch-eager", "graph": "transformers", "dialect": "-",
                               "precision": "fp32", **torch_eager_decode(source.checkpoint_dir, source.config,
                                                                         prompt_len, new_tokens, repeats)})
    _ratios(decode)
    report["decode"] = decode
    report["load_average_end"] = os.getloadavg()
    return report


QUANTIZE_MEMORY_LIMIT = 16 << 30  # address-space cap of the quantize child: fail it, not the shared machine


def _quantize_child(src: str, out: str, precision: str, lm_head: str = "") -> None:
    """Runs in a subprocess: quantize one export, print one JSON line with seconds and peak RSS."""
    from llmtrt.pipelines.precision.quantize import PrecisionOptions, quantize

    t0 = time.perf_counter()
    quantize(src, out, precision, PrecisionOptions(progress=False, quantize_lm_head=lm_head or None))
    print(json.dumps({"quantize_seconds": round(time.perf_counter() - t0, 2),
                      "quantize_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (QUANTIZE_MEMORY_LIMIT, QUANTIZE_MEMORY_LIMIT))


def quantize_for_bench(src: Path, out: Path, precision: str, lm_head: str | None = None) -> dict:
    """quantize() of ``src`` into ``out`` in a memory-capped subprocess (``lm_head``: its
    ``quantize_lm_head``). A graph quantized earlier from the same source graph (manifest
    source_onnx_sha256 equal to src's onnx_sha256) with the same options is reused, with the seconds its
    manifest recorded."""
    source_sha = json.loads((src / "manifest.json").read_text())["onnx_sha256"]
    manifest = out / "manifest.json"
    if manifest.exists():
        old = json.loads(manifest.read_text())
        if (old.get("precision") == precision and old.get("source_onnx_sha256") == source_sha
                and old.get("precision_options", {}).get("quantize_lm_head") == lm_head):
            return {"quantize_seconds": old["stats"]["quantize_seconds"],
                    "quantized": "reused: an earlier quantize() of this same source graph"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quantize-child", str(src), str(out), precision,
                           lm_head or ""],
                          capture_output=True, text=True, check=False, preexec_fn=_limit_memory)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"killed by signal {-proc.returncode}"])[-1]
        return {"error": f"quantize() exited {proc.returncode} under a {QUANTIZE_MEMORY_LIMIT >> 30} GiB "
                         f"address-space cap: {last[-300:]}"}
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "quantized": "now"}


def _our_quantized(decode: dict, work: Path, source, dialect: str, prompt_len: int, new_tokens: int,
                   repeats: int, quick: bool) -> list[dict]:
    """int8-wo and int4-awq of our fp32 export in ``dialect`` via llmtrt.pipelines.precision.quantize.quantize
    (calibration included in quantize_seconds)."""
    if quick:
        return []
    if importlib.util.find_spec("llmtrt.pipelines.precision.quantize") is None:
        decode["errors"].append("int8/int4 (ours): llmtrt.pipelines.precision.quantize is not in this tree")
        return []
    rows = []
    for precision in OUR_QUANTIZED:
        out = work / "decode" / f"{dialect}-{precision}"
        done = quantize_for_bench(work / "decode" / dialect, out, precision)
        if "error" in done:
            decode["errors"].append(f"{precision} (ours): {done['error']}")
            continue
        rows.append({"runtime": "onnxruntime", "graph": "llmtrt", "dialect": dialect, "precision": precision, **done,
                     **ort_decode(out / "model.onnx", source.config, prompt_len, new_tokens, repeats)})
    return rows


def _ratios(decode: dict) -> None:
    """of_bound, ratios vs PyTorch eager and vs the builder's graph of the same bit width (fp32 -> fp32,
    int8-* -> int8, int4-* -> int4), agreement with our first fp32 graph; drops the private fields."""
    rows = decode["rows"]
    eager = next((r for r in rows if r["runtime"] == "pytorch-eager"), None)
    builder = {r["precision"]: r for r in rows if r["graph"].startswith("genai-builder")}
    reference = next((r for r in rows if r["graph"] == "llmtrt" and r["precision"] == "fp32"), None)
    if reference is not None:
        decode["agreement_reference"] = f"onnxruntime {reference['dialect']} fp32"
    for row in rows:
        row["of_bound"] = round(row["decode_tok_s"] / decode["bandwidth_bound_tok_s"], 3)
        if eager is not None:
            row["decode_vs_eager"] = round(row["decode_tok_s"] / eager["decode_tok_s"], 3)
            row["prefill_vs_eager"] = round(row["prefill_ms"] / eager["prefill_ms"], 3)
        peer = builder.get(row["precision"].split("-")[0])
        if peer is not None:
            row["decode_vs_builder"] = round(row["decode_tok_s"] / peer["decode_tok_s"], 3)
            row["prefill_vs_builder"] = round(row["prefill_ms"] / peer["prefill_ms"], 3)
        if reference is not None and row is not reference and "_tokens" in row:
            _agreement(row, reference)
    for row in rows:
        for key in [k for k in row if k.startswith("_")]:
            del row[key]


def _num(value, spec: str, width: int) -> str:
    return f"{value:>{width}{spec}}" if isinstance(value, int | float) else f"{'-':>{width}}"


def format_table(report: dict) -> str:
    loads = [", ".join(f"{x:.2f}" for x in report[k]) for k in ("load_average_start", "load_average_end") if k in report]
    lines = [f"memory bandwidth (2-thread read): {report['memory_bandwidth_gbs']} GB/s; {report['cpu_count']} cores; "
             f"load average {' -> '.join(loads)}; onnxruntime-genai: {report['onnxruntime_genai']}", "",
             f"{'export':<18} {'exporter':<26} {'seconds':>8} {'peak RSS GB':>11} {'RSS/fp32 w':>10} "
             f"{'vs builder':>10} {'streaming':>9}"]
    for r in report["export"]:
        if "error" in r:
            lines.append(f"{Path(r['model']).name:<18} {r['exporter']:<26} {r['error']}")
            continue
        lines.append(f"{Path(r['model']).name:<18} {r['exporter']:<26} {r['export_seconds']:>8.2f} "
                     f"{_num(r.get('peak_rss_bytes', 0) / 1e9, '.2f', 11)} {_num(r.get('peak_rss_over_fp32_weights'), '.3f', 10)} "
                     f"{_num(r.get('seconds_vs_builder'), '.3f', 10)} {str(r.get('streaming', '-')):>9}")
    lines += ["", f"{'build (fp32, native, SM89)':<28} {'backend':<26} {'seconds':>8} {'plan MB':>8} {'layers':>7}"]
    for r in report.get("build", []):
        if "error" in r:
            lines.append(f"{r['model']:<28} not built: {r['error']}")
            continue
        lines.append(f"{r['model']:<28} {r['backend']:<26} {r['build_seconds']:>8.2f} {r['plan_bytes'] / 1e6:>8.1f} "
                     f"{r['network_layers']:>7}")
    d = report["decode"]
    lines += ["", f"decode: {Path(d['model']).name}, prompt {d['prompt_tokens']}, {d['new_tokens']} new tokens, "
              f"batch 1, {report['threads']} threads; fp32 bandwidth bound {d['bandwidth_bound_tok_s']} tok/s "
              f"({d['bytes_per_token'] / 1e9:.3f} GB/token); agreement vs {d.get('agreement_reference', '-')}",
              f"{'graph':<20} {'dialect':<10} {'precision':<9} {'prefill ms':>10} {'tok/s':>7} {'of bound':>8} "
              f"{'vs eager':>8} {'vs builder':>10} {'pf vs bld':>9} {'max|dlogit|':>11} {'same tok':>8} {'prep s':>7}"]
    for r in d["rows"]:
        graph = r["graph"].replace("genai-builder", "genai")
        lines.append(f"{graph:<20} {r['dialect']:<10} {r['precision']:<9} {r['prefill_ms']:>10.1f} "
                     f"{r['decode_tok_s']:>7.1f} {r['of_bound']:>8.3f} {_num(r.get('decode_vs_eager'), '.3f', 8)} "
                     f"{_num(r.get('decode_vs_builder'), '.3f', 10)} {_num(r.get('prefill_vs_builder'), '.3f', 9)} "
                     f"{_num(r.get('max_abs_logit_diff_vs_ref'), '.2e', 11)} "
                     f"{_num(r.get('greedy_tokens_equal_ref'), 'd', 8)} "
                     f"{_num(r.get('quantize_seconds', r.get('build_seconds')), '.1f', 7)}")
    lines += ["(of bound: decode tok/s over the fp32 bound; prep s: our quantize seconds incl. calibration, or the "
              "builder's build seconds; same tok: greedy tokens equal to the reference before the first difference)"]
    lines += [f"{r['dialect']} {r['precision']}: prep s from the manifest, {r['quantized']}"
              for r in d["rows"] if str(r.get("quantized", "")).startswith("reused")]
    lines += [f"not measured: {e}" for e in d.get("errors", [])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny and bytes-llama only (CI smoke test)")
    ap.add_argument("--json", type=Path, help="also write the report as JSON to this file")
    ap.add_argument("--work", type=Path, default=Path("/tmp/llmtrt-bench"),
                    help="scratch directory for checkpoints and exports (default /tmp/llmtrt-bench)")
    ap.add_argument("--repeats", type=int, default=None, help="repeats per timing (default 1 quick, 3 full)")
    ap.add_argument("--dialects", default="custom,standard,decomposed", help="comma-separated dialects to decode")
    ap.add_argument("--no-genai", action="store_true", help="skip the onnxruntime-genai builder rows")
    ap.add_argument("--profile", type=Path, metavar="DIR",
                    help="only profile one decode step of our graphs and the builder's (benchmarks.profile_decode) "
                         "on the 156M-shaped model and write DIR/profile.json + the summary table")
    ap.add_argument("--export-child", nargs=3, metavar=("SPEC", "OUT", "DIALECT"), help=argparse.SUPPRESS)
    ap.add_argument("--quantize-child", nargs=4, metavar=("SRC", "OUT", "PRECISION", "LM_HEAD"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.export_child:
        _export_child(*args.export_child)
        return 0
    if args.quantize_child:
        _quantize_child(*args.quantize_child)
        return 0
    if args.profile:
        from benchmarks.profile_decode import main as profile_main

        return profile_main(["--work", str(args.work), "--out", str(args.profile)])
    repeats = args.repeats or (1 if args.quick else 3)
    report = run(args.quick, args.work, repeats, args.dialects.split(","), with_genai=not args.no_genai)
    print(format_table(report))
    if args.json:
        from llmtrt.exporter.files import write_json_atomically

        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomically(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
