"""Benchmarks: export time and peak memory, ONNX Runtime CPU prefill/decode per dialect against PyTorch
eager and the memory-bandwidth bound, in one run. Prints a table and writes JSON.

    python -m benchmarks.run --quick --json out/bench.json   # tiny + bytes-llama only (CI smoke, < 1 min)
    python -m benchmarks.run --json out/bench.json           # + 1.1B-shaped export, 156M-shaped decode

Each export runs in its own subprocess so its peak RSS is its own. Decode: batch 1, a 128-token prompt
(prefill latency), then 128 greedy tokens with the KV cache (tokens/s), ONNX Runtime on 2 threads;
medians over repeats. The bandwidth bound is (numpy copy GB/s) / (bytes read per decoded token:
every weight but the embedding table, plus the KV cache). Benchmark checkpoints are written under
--work (default /tmp/llmtrt-bench) by benchmarks.make_checkpoint and are never part of the repo.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

THREADS = 2


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def memory_bandwidth_gbs(mib: int = 256, repeats: int = 5) -> float:
    """Copy bandwidth (bytes read + written per second) of a numpy array copy, in GB/s."""
    import numpy as np

    src = np.ones(mib << 18, dtype=np.float32)
    dst = np.empty_like(src)
    seconds = _median_time(lambda: np.copyto(dst, src), repeats)
    return 2 * src.nbytes / seconds / 1e9


# --- export ----------------------------------------------------------------------------------------

def _export_child(spec: str, out: str, dialect: str) -> None:
    """Runs in a subprocess: export one model, print one JSON line with time and peak RSS."""
    from exporter.config import resolve_model
    from exporter.onnx_export import ExportOptions, export

    t0 = time.perf_counter()
    result = export(resolve_model(spec), out, ExportOptions(dialect=dialect))
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


# --- decode ----------------------------------------------------------------------------------------

def _prompt(vocab: int, n: int):
    import numpy as np

    return (np.arange(n, dtype=np.int64) * 7919 % vocab)[None]


def ort_decode(onnx_path: Path, config, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    layers, kv, d = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
    out_names = [o.name for o in sess.get_outputs()]

    def step(ids, start, past):
        n = ids.shape[1]
        feeds = {"input_ids": ids, "position_ids": np.arange(start, start + n, dtype=np.int64)[None],
                 "attention_mask": np.ones((1, start + n), dtype=np.int64)}
        for i in range(layers):
            feeds[f"past_key_values.{i}.key"], feeds[f"past_key_values.{i}.value"] = past[2 * i], past[2 * i + 1]
        outs = sess.run(out_names, feeds)
        return outs[0], outs[1:]

    empty = [np.zeros((1, kv, 0, d), np.float32) for _ in range(2 * layers)]
    prompt = _prompt(config.vocab_size, prompt_len)
    step(prompt, 0, empty)  # warm-up
    prefill = _median_time(lambda: step(prompt, 0, empty), repeats)

    def decode():
        logits, past = step(prompt, 0, empty)
        t0 = time.perf_counter()
        for k in range(new_tokens):
            token = logits[:, -1:].argmax(-1).astype(np.int64)
            logits, past = step(token, prompt_len + k, past)
        return time.perf_counter() - t0

    seconds = statistics.median(decode() for _ in range(repeats))
    return {"prefill_ms": round(1000 * prefill, 2), "decode_tok_s": round(new_tokens / seconds, 2)}


def torch_eager_decode(checkpoint_dir: Path, config, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(THREADS)
    model = LlamaForCausalLM.from_pretrained(str(checkpoint_dir), torch_dtype=torch.float32).eval()
    prompt = torch.from_numpy(_prompt(config.vocab_size, prompt_len))

    def prefill():
        with torch.no_grad():
            return model(prompt, use_cache=True)

    prefill()
    prefill_s = _median_time(prefill, repeats)

    def decode():
        out = prefill()
        t0 = time.perf_counter()
        with torch.no_grad():
            for _ in range(new_tokens):
                token = out.logits[:, -1:].argmax(-1)
                out = model(token, past_key_values=out.past_key_values, use_cache=True)
        return time.perf_counter() - t0

    seconds = statistics.median(decode() for _ in range(repeats))
    return {"prefill_ms": round(1000 * prefill_s, 2), "decode_tok_s": round(new_tokens / seconds, 2)}


def bytes_per_token(config, context: int) -> int:
    """fp32 bytes read to decode one token: every weight but the embedding table (one row is
    gathered), plus the K and V cache of ``context`` positions."""
    weights = config.num_parameters - config.vocab_size * config.hidden_size
    cache = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * context
    return 4 * (weights + cache)


# --- the run ---------------------------------------------------------------------------------------

def _ensure_checkpoint(work: Path, shape: str) -> Path:
    from benchmarks.make_checkpoint import write_checkpoint

    path = work / f"llama-{shape}"
    if not (path / "model.safetensors").exists():
        print(f"writing the {shape}-shaped checkpoint to {path} ...", flush=True)
        write_checkpoint(path, shape)
    return path


def run(quick: bool, work: Path, repeats: int, dialects: list[str]) -> dict:
    from exporter.config import resolve_model

    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"quick": quick, "threads": THREADS, "repeats": repeats, "cpu_count": os.cpu_count(),
                    "load_average": os.getloadavg()}
    report["memory_bandwidth_gbs"] = round(memory_bandwidth_gbs(), 2)

    export_models = ["tiny", "bytes-llama"] + ([] if quick else [str(_ensure_checkpoint(work, "1.1b"))])
    report["export"] = []
    for spec in export_models:
        row = {"model": spec, **measure_export(spec, work / "export" / Path(spec).name)}
        row["peak_rss_over_fp32_weights"] = round(row["peak_rss_bytes"] / (4 * resolve_model(spec).config.num_parameters), 3)
        report["export"].append(row)

    decode_spec = "bytes-llama" if quick else str(_ensure_checkpoint(work, "156m"))
    source = resolve_model(decode_spec)
    prompt_len, new_tokens = (32, 32) if quick else (128, 128)
    bound_bytes = bytes_per_token(source.config, prompt_len + new_tokens // 2)
    decode = {"model": decode_spec, "prompt_tokens": prompt_len, "new_tokens": new_tokens,
              "bytes_per_token": bound_bytes,
              "bandwidth_bound_tok_s": round(report["memory_bandwidth_gbs"] * 1e9 / bound_bytes, 2),
              "rows": []}
    from exporter.onnx_export import ExportOptions, export

    for dialect in dialects:  # exported in this process: only the timings below matter here
        out = work / "decode" / dialect
        export(source, out, ExportOptions(dialect=dialect))
        row = {"runtime": "onnxruntime", "dialect": dialect, "precision": "fp32",
               **ort_decode(out / "model.onnx", source.config, prompt_len, new_tokens, repeats)}
        decode["rows"].append(row)
    if importlib.util.find_spec("pipelines.precision") is None:
        decode["quantized"] = "skipped: pipelines.precision is not in this tree yet"
    if source.checkpoint_dir is not None and importlib.util.find_spec("transformers") is not None:
        decode["rows"].append({"runtime": "pytorch-eager", "dialect": "-", "precision": "fp32",
                               **torch_eager_decode(source.checkpoint_dir, source.config, prompt_len,
                                                    new_tokens, repeats)})
    decode["onnxruntime_genai"] = _genai_status()
    eager = next((r for r in decode["rows"] if r["runtime"] == "pytorch-eager"), None)
    for row in decode["rows"]:
        row["of_bound"] = round(row["decode_tok_s"] / decode["bandwidth_bound_tok_s"], 3)
        if eager is not None:
            row["decode_vs_eager"] = round(row["decode_tok_s"] / eager["decode_tok_s"], 3)
            row["prefill_vs_eager"] = round(row["prefill_ms"] / eager["prefill_ms"], 3)
    report["decode"] = decode
    return report


def _genai_status() -> str:
    venv = Path(__file__).resolve().parent.parent / ".venv-bench" / "bin" / "python"
    if not venv.exists():
        return "not measured: no .venv-bench (pip install onnxruntime-genai there to compare with its builder)"
    proc = subprocess.run([str(venv), "-c", "import onnxruntime_genai as g; print(g.__version__)"],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return f"not measured: onnxruntime_genai does not import in .venv-bench ({proc.stderr.strip()[-200:]})"
    return (f"onnxruntime-genai {proc.stdout.strip()} installed, not benchmarked: its model builder loads an HF "
            "tokenizer from the checkpoint first, and the benchmark checkpoints have none")


def format_table(report: dict) -> str:
    lines = [f"memory bandwidth (numpy copy): {report['memory_bandwidth_gbs']} GB/s; load average "
             f"{', '.join(f'{x:.2f}' for x in report['load_average'])} on {report['cpu_count']} cores", "",
             f"{'export':<40} {'seconds':>8} {'peak RSS GB':>12} {'RSS/fp32 weights':>17} {'streaming':>9}"]
    for r in report["export"]:
        lines.append(f"{Path(r['model']).name:<40} {r['export_seconds']:>8.2f} {r['peak_rss_bytes'] / 1e9:>12.2f} "
                     f"{r['peak_rss_over_fp32_weights']:>17.3f} {str(r['streaming']):>9}")
    d = report["decode"]
    lines += ["", f"decode: {Path(d['model']).name}, prompt {d['prompt_tokens']}, {d['new_tokens']} new tokens, "
              f"batch 1, {report['threads']} threads; bound {d['bandwidth_bound_tok_s']} tok/s "
              f"({d['bytes_per_token'] / 1e9:.3f} GB/token)",
              f"{'runtime':<14} {'dialect':<11} {'prec':<5} {'prefill ms':>10} {'tok/s':>8} {'of bound':>8} "
              f"{'vs eager':>8}"]
    for r in d["rows"]:
        lines.append(f"{r['runtime']:<14} {r['dialect']:<11} {r['precision']:<5} {r['prefill_ms']:>10.1f} "
                     f"{r['decode_tok_s']:>8.1f} {r['of_bound']:>8.3f} {r.get('decode_vs_eager', float('nan')):>8.3f}")
    if "quantized" in d:
        lines.append(f"int8/int4: {d['quantized']}")
    lines.append(f"onnxruntime-genai builder: {d['onnxruntime_genai']}")
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
    ap.add_argument("--export-child", nargs=3, metavar=("SPEC", "OUT", "DIALECT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.export_child:
        _export_child(*args.export_child)
        return 0
    repeats = args.repeats or (1 if args.quick else 3)
    report = run(args.quick, args.work, repeats, args.dialects.split(","))
    print(format_table(report))
    if args.json:
        from pipelines.artifacts import write_json_atomically

        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomically(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
