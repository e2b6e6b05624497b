"""Where a decode step's time goes: ONNX Runtime's profiler on our graphs and on the onnxruntime-genai
builder's graph of the same checkpoint, summarized as the top operator types per decode step.

    python -m benchmarks.profile_decode --out /tmp/llmtrt-bench/profile     # or: python -m benchmarks.run --profile DIR

Each graph runs a 128-token prompt, then --steps greedy decode steps (batch 1, 2 threads), with
SessionOptions.enable_profiling on (for the builder's graph: ``enable_profiling`` in its
genai_config.json session options, run by benchmarks.genai_decode in .venv-bench, since the builder's
graph needs its runtime's shared KV buffers). Node events inside the decode runs (every ``model_run``
after the prompt's) are summed per operator type and divided by the number of steps. Writes
OUT/profile.json and prints the table; the raw ORT traces stay in OUT for chrome://tracing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from benchmarks.common import THREADS, bench_python, ensure_checkpoint, genai_build, prompt_ids


def summarize_trace(trace_path: str | Path, top: int = 12) -> dict:
    """Per-decode-step time by operator type from an ORT profile (JSON list of trace events). The first
    ``model_run`` is the prompt; the rest are decode steps."""
    events = json.loads(Path(trace_path).read_text())
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")
    if len(runs) < 2:
        raise ValueError(f"{trace_path}: {len(runs)} model_run events; need the prompt and at least one decode step")
    steps = runs[1:]
    per_op: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        if any(lo <= e["ts"] <= hi for lo, hi in steps):
            op = e.get("args", {}).get("op_name", "?")
            per_op[op][0] += e["dur"]
            per_op[op][1] += 1
    step_us = sum(hi - lo for lo, hi in steps) / len(steps)
    kernel_us = sum(v[0] for v in per_op.values()) / len(steps)
    rows = sorted(({"op": op, "us_per_step": round(v[0] / len(steps), 1), "nodes_per_step": round(v[1] / len(steps), 1),
                    "share_of_step": round(v[0] / len(steps) / step_us, 3)} for op, v in per_op.items()),
                  key=lambda r: -r["us_per_step"])
    return {"trace": str(trace_path), "decode_steps": len(steps), "step_ms": round(step_us / 1000, 3),
            "kernels_ms": round(kernel_us / 1000, 3), "top_ops": rows[:top]}


def profile_ours(onnx_path: Path, config, out: Path, prompt_len: int, steps: int) -> Path:
    """An ONNX Runtime profile of our graph's prefill + ``steps`` greedy decode steps (llmtrt's runner),
    or of the builder's graph in plain ONNX Runtime when it has no position_ids (timing only)."""
    import numpy as np
    import onnxruntime as ort

    from llmtrt.pipelines.runtime.runners import OnnxRuntimeRunner, ort_session

    opts = ort.SessionOptions()
    opts.inter_op_num_threads = 1
    opts.enable_profiling = True
    opts.profile_file_prefix = str(out / f"ort-{onnx_path.parent.parent.name}-{onnx_path.parent.name}")
    sess = ort_session(onnx_path, threads=THREADS, options=opts)
    prompt = prompt_ids(config.vocab_size, prompt_len)
    if "position_ids" not in {i.name for i in sess.get_inputs()}:  # the builder's graph in plain ORT: timing only
        step = _builder_step(sess, config)
        shape = (1, config.num_key_value_heads, 0, config.head_dim)
        logits, past = step(prompt, 0, [np.zeros(shape, np.float32) for _ in range(2 * config.num_hidden_layers)])
        for k in range(steps):
            logits, past = step(logits[:, -1:].argmax(-1).astype(np.int64), prompt_len + k, past)
        return Path(sess.end_profiling())
    with OnnxRuntimeRunner(onnx_path, config, session_factory=lambda: sess) as runner:
        state = runner.new_cache(1, prompt_len + steps)
        logits = runner.step(prompt, np.arange(prompt_len)[None], np.ones_like(prompt), state)
        for k in range(steps):
            token = logits[:, -1:].argmax(-1).astype(np.int64)
            logits = runner.step(token, np.array([[prompt_len + k]]), np.ones_like(token), state)
    return Path(sess.end_profiling())


def _builder_step(sess, config):
    """Feeds for the builder's graph in plain ONNX Runtime (no position_ids; a growing, unshared KV cache).
    Its kernels' cost is what is profiled; its decode tokens are not valid this way (the graph expects
    the genai runtime's shared past/present buffers), so it never appears in benchmarks.run's table."""
    import numpy as np

    out_names = [o.name for o in sess.get_outputs()]

    def step(ids, start, past):
        feeds = {"input_ids": ids, "attention_mask": np.ones((1, start + ids.shape[1]), dtype=np.int64)}
        for i in range(config.num_hidden_layers):
            feeds[f"past_key_values.{i}.key"], feeds[f"past_key_values.{i}.value"] = past[2 * i], past[2 * i + 1]
        outs = sess.run(out_names, feeds)
        return outs[0], outs[1:]

    return step


def profile_genai(model_dir: Path, out: Path, prompt_len: int, steps: int) -> Path:
    prefix = out / f"genai-{model_dir.name}"
    proc = subprocess.run([str(bench_python()), "-m", "benchmarks.genai_decode", str(model_dir), "--prompt",
                           str(prompt_len), "--new", str(steps), "--repeats", "0", "--threads", str(THREADS),
                           "--profile", str(prefix)], capture_output=True, text=True, check=False,
                          cwd=str(Path(__file__).resolve().parent.parent))
    if proc.returncode != 0:
        raise RuntimeError(f"benchmarks.genai_decode --profile failed: {proc.stderr[-1000:]}")
    traces = sorted(out.glob(f"{prefix.name}*.json"), key=lambda p: p.stat().st_mtime)
    if not traces:
        raise RuntimeError(f"onnxruntime-genai wrote no profile {prefix}*.json")
    return traces[-1]


def run(work: Path, out: Path, steps: int, graphs: list[str]) -> dict:
    from llmtrt.exporter.config import resolve_model
    from llmtrt.exporter.onnx_export import ExportOptions, export

    out.mkdir(parents=True, exist_ok=True)
    checkpoint = ensure_checkpoint(work, "156m")
    source = resolve_model(str(checkpoint))
    prompt_len = 128
    report: dict = {"model": str(checkpoint), "prompt_tokens": prompt_len, "threads": THREADS, "graphs": {}}
    for graph in graphs:
        if graph.startswith("genai-"):
            precision, _, runtime = graph.removeprefix("genai-").partition("@")
            model_dir = work / "genai" / precision
            if not (model_dir / "model.onnx").exists():
                built = genai_build(checkpoint, model_dir, precision)
                if "error" in built:
                    report["graphs"][graph] = {"error": built["error"]}
                    continue
            if runtime == "ort":  # the builder's graph in plain ORT, as our graphs run: kernel cost only
                trace = profile_ours(model_dir / "model.onnx", source.config, out, prompt_len, steps)
            else:
                trace = profile_genai(model_dir, out, prompt_len, steps)
        else:
            model_dir = work / "decode" / graph
            if not (model_dir / "model.onnx").exists():
                if "-" in graph:
                    report["graphs"][graph] = {"error": f"{model_dir} missing: run benchmarks.run first"}
                    continue
                export(source, model_dir, ExportOptions(dialect=graph))
            trace = profile_ours(model_dir / "model.onnx", source.config, out, prompt_len, steps)
        report["graphs"][graph] = summarize_trace(trace)
    return report


def format_summary(report: dict) -> str:
    lines = [f"decode-step profile: {Path(report['model']).name}, prompt {report['prompt_tokens']}, "
             f"{report['threads']} threads (ORT profiler; per decode step, top operator types)"]
    for graph, s in report["graphs"].items():
        if "error" in s:
            lines += ["", f"{graph}: {s['error']}"]
            continue
        lines += ["", f"{graph}: step {s['step_ms']:.2f} ms, kernels {s['kernels_ms']:.2f} ms over "
                      f"{s['decode_steps']} steps",
                  f"  {'op':<34} {'ms/step':>8} {'nodes':>6} {'of step':>8}"]
        for r in s["top_ops"]:
            lines.append(f"  {r['op']:<34} {r['us_per_step'] / 1000:>8.3f} {r['nodes_per_step']:>6.0f} "
                         f"{r['share_of_step']:>8.1%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.profile_decode", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/llmtrt-bench"), help="benchmarks.run's scratch dir")
    ap.add_argument("--out", type=Path, required=True, help="directory for the traces and profile.json")
    ap.add_argument("--steps", type=int, default=16, help="decode steps profiled (default 16)")
    ap.add_argument("--graphs", default="custom,standard,genai-fp32,genai-fp32@ort,custom-int4-awq,genai-int4,"
                                        "genai-int4@ort",
                    help="ours: a dialect or DIALECT-PRECISION dir under WORK/decode; the builder's: genai-PRECISION "
                         "(in the onnxruntime-genai runtime) or genai-PRECISION@ort (in plain ONNX Runtime like "
                         "ours: kernel cost only, its decode tokens are not valid without shared KV buffers)")
    args = ap.parse_args(argv)
    report = run(args.work, args.out, args.steps, args.graphs.split(","))
    (args.out / "profile.json").write_text(json.dumps(report, indent=2) + "\n")
    print(format_summary(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
