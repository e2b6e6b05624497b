"""Helpers the benchmark scripts share: thread count, timing, prompts, checkpoints, the builder's venv."""

from __future__ import annotations

import json
import statistics
import subprocess
import time
from pathlib import Path

THREADS = 2
REPO = Path(__file__).resolve().parent.parent


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def prompt_ids(vocab: int, n: int):
    import numpy as np

    return (np.arange(n, dtype=np.int64) * 7919 % vocab)[None]


def ensure_checkpoint(work: Path, shape: str) -> Path:
    from benchmarks.make_checkpoint import ensure_tokenizer, write_checkpoint

    path = work / f"llama-{shape}"
    if not (path / "model.safetensors").exists():
        print(f"writing the {shape}-shaped checkpoint to {path} ...", flush=True)
        write_checkpoint(path, shape)
    ensure_tokenizer(path)  # checkpoints written before the tokenizer was added
    return path


def bench_python() -> Path:
    return REPO / ".venv-bench" / "bin" / "python"


def genai_build(checkpoint: Path, out: Path, precision: str) -> dict:
    """Run the onnxruntime-genai model builder (in .venv-bench) on an HF checkpoint directory: its wall
    seconds and peak RSS (GNU time), or ``error`` with the last lines it printed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [str(bench_python()), "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint), "-o", str(out),
           "-p", precision, "-e", "cpu", "-c", str(out.parent / "hf-cache")]
    gnu_time = Path("/usr/bin/time")
    if gnu_time.exists():
        cmd = [str(gnu_time), "-f", "__rss_kb__ %M", *cmd]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=str(out.parent))
    seconds = time.perf_counter() - t0
    if proc.returncode != 0 or not (out / "model.onnx").exists():
        tail = [line for line in proc.stderr.splitlines() if line.strip() and "__rss_kb__" not in line][-3:]
        return {"error": f"builder -p {precision} exited {proc.returncode}: {' | '.join(tail)[-400:]}"}
    row = {"export_seconds": round(seconds, 2)}
    rss = [line.split()[1] for line in proc.stderr.splitlines() if line.startswith("__rss_kb__")]
    if rss:
        row["peak_rss_bytes"] = int(rss[-1]) * 1024
    return row


def genai_decode(model_dir: Path, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    """Prefill/decode of a builder graph in the onnxruntime-genai runtime (benchmarks.genai_decode in
    .venv-bench). Not plain ONNX Runtime: the builder's graph shares past and present KV buffers
    (past_present_share_buffer), and fed a growing cache without that sharing its decode steps go wrong
    (greedy tokens diverge from PyTorch after the first one), while its own runtime matches PyTorch."""
    import numpy as np

    proc = subprocess.run([str(bench_python()), "-m", "benchmarks.genai_decode", str(model_dir), "--prompt",
                           str(prompt_len), "--new", str(new_tokens), "--repeats", str(repeats), "--threads",
                           str(THREADS)], capture_output=True, text=True, check=False,
                          cwd=str(REPO))
    if proc.returncode != 0:
        return {"error": f"benchmarks.genai_decode exited {proc.returncode}: {proc.stderr.strip()[-300:]}"}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"prefill_ms": out["prefill_ms"], "decode_tok_s": out["decode_tok_s"], "_tokens": out["tokens"],
            "_prefill_logits": np.asarray(out["prefill_logits_last"], dtype=np.float32)}


