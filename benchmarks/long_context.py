"""Decode step time against context length: a graph as written (a new, longer present cache every step)
against the runner's contrib kernels with shared past/present buffers (appended in place).

    python -m benchmarks.long_context --work /tmp/llmtrt-bench [--graph DIR] [--tokens 1792]

Both runners are open at once and decode the same tokens in alternating blocks of 64 steps (the order
flips every block), so a drifting machine slows both alike; reported: the median step time in three
context windows and their ratio, and each runner's session-open seconds. Spinning is off for both (two spinning pools would fight for the cores).
``--graph`` defaults to the 156M int4-awq graph that ``benchmarks.decode`` writes under WORK.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from benchmarks.common import THREADS, prompt_ids

BLOCK = 64


def measure(graph_dir: Path, prompt: int = 128, tokens: int = 1792) -> dict:
    from llmtrt.pipelines.artifacts import load_exported
    from llmtrt.pipelines.runtime.runners import OnnxRuntimeRunner

    exported = load_exported(graph_dir)
    config = exported.config
    runners = {name: OnnxRuntimeRunner(exported.onnx_path, config, threads=THREADS, spinning=False, contrib=contrib)
               for name, contrib in (("as written", False), ("contrib + shared buffers", True))}
    times: dict[str, list[float]] = {name: [] for name in runners}
    opened: dict[str, float] = {}
    try:
        for name, runner in runners.items():
            t0 = time.perf_counter()
            runner.activate()  # session open: the contrib rewrite included
            opened[name] = round(time.perf_counter() - t0, 3)
        ids = prompt_ids(config.vocab_size, prompt)
        states = {name: r.new_cache(1, prompt + tokens + 1) for name, r in runners.items()}
        logits = {name: r.step(ids, np.arange(prompt)[None], np.ones_like(ids), states[name])
                  for name, r in runners.items()}
        next_token = int(logits["as written"][0, -1].argmax())
        for start in range(0, tokens, BLOCK):
            names = list(runners) if (start // BLOCK) % 2 == 0 else list(runners)[::-1]
            fed: list[int] = []
            for name in names:
                token = next_token
                for j in range(min(BLOCK, tokens - start)):
                    t0 = time.perf_counter()
                    out = runners[name].step(np.array([[token]]), np.array([[prompt + start + j]]),
                                             np.ones((1, 1), np.int64), states[name])
                    times[name].append(time.perf_counter() - t0)
                    if len(fed) <= j:  # the first runner of the block picks the tokens; the second follows
                        fed.append(int(out[0, -1].argmax()))
                    token = fed[j]
            next_token = fed[-1]
    finally:
        for runner in runners.values():
            if runner.is_active:
                runner.deactivate()
    third = tokens // 3
    windows = []
    for lo in (0, third, 2 * third):
        hi = min(lo + min(third, 256), tokens)
        a, b = (statistics.median(times[name][lo:hi]) for name in runners)
        windows.append({"context": [prompt + lo, prompt + hi], "as_written_ms": round(1000 * a, 3),
                        "contrib_shared_ms": round(1000 * b, 3), "speedup": round(a / b, 3)})
    return {"graph": str(graph_dir), "prompt": prompt, "tokens": tokens, "threads": THREADS, "windows": windows,
            "open_seconds": opened}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.long_context", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/llmtrt-bench"))
    ap.add_argument("--graph", type=Path, help="an ONNX artifact dir (default: WORK's 156M int4-awq lm_head int4)")
    ap.add_argument("--tokens", type=int, default=1792, help="decode steps after the 128-token prompt")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args(argv)
    graph = args.graph or args.work / "decode-graphs" / "standard-int4-awq-lm_head-int4"
    if not (graph / "manifest.json").is_file():
        ap.error(f"{graph} is not an llmtrt ONNX artifact; run `python -m benchmarks.decode --work {args.work}` "
                 "first, or pass --graph DIR")
    report = measure(graph, tokens=args.tokens)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"decode step time vs context: {graph.name}, batch 1, {THREADS} threads, medians per window")
    print(f"{'context':>12} {'as written ms':>14} {'contrib+shared ms':>18} {'speedup':>8}")
    for w in report["windows"]:
        print(f"{w['context'][0]:>5}-{w['context'][1]:<6} {w['as_written_ms']:>14.2f} {w['contrib_shared_ms']:>18.2f} "
              f"{w['speedup']:>8.3f}")
    print("session open (s): " + ", ".join(f"{name} {sec:.2f}" for name, sec in report["open_seconds"].items()))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
