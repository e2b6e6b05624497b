"""Huge pages on and off for one graph, in one process: what `--huge-pages` buys per decoded token and
what it costs at session open.

    python -m benchmarks.huge_pages --work /tmp/bench-w          # the 156M decode graphs of benchmarks.decode
    python -m benchmarks.huge_pages GRAPH.onnx [GRAPH.onnx ...] --checkpoint DIR

Each graph in a fresh process (memory an earlier graph's session put on huge pages and freed would
otherwise be reused by the next one's 4 KiB session). Per graph: session A is opened and its memory collapsed onto 2 MiB pages (pipelines/runtime/huge_pages.py),
then session B of the same file is opened beside it and left on 4 KiB pages (A is still alive, so B's
memory is new memory; the process's AnonHugePages before and after B's open shows it got none). Then
A, B, B, A, A, B ... each decodes 128 greedy tokens after a 128-token prompt; the ratio is the median of
the per-round tokens/s ratios A/B. Also each open's seconds and the collapse's. ``benchmarks.decode``'s
``4 KiB pages`` rows instead open a fresh session per pass, which may reuse memory an earlier session
put on huge pages: they understate the difference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from benchmarks.common import THREADS

GRAPHS = ("standard", "standard-int8-wo-lm_head-int8", "standard-int4-awq-lm_head-int4")


def measure(onnx_path: Path, config, rounds: int = 8, prompt_len: int = 128, new_tokens: int = 128) -> dict:
    from benchmarks.decode import OrtDecoder
    from llmtrt.pipelines.runtime import huge_pages

    t0 = time.perf_counter()
    a = OrtDecoder(onnx_path, config, threads=THREADS, huge_pages=True).__enter__()
    open_a = time.perf_counter() - t0
    huge_after_a = huge_pages.anon_huge_bytes()
    t0 = time.perf_counter()
    b = OrtDecoder(onnx_path, config, threads=THREADS, huge_pages=False).__enter__()
    open_b = time.perf_counter() - t0
    huge_after_b = huge_pages.anon_huge_bytes()
    rates: dict[str, list[float]] = {"huge": [], "4k": []}
    try:
        for dec in (a, b):
            dec.run(min(prompt_len, 16), 4)
        for r in range(rounds):
            order = (("huge", a), ("4k", b)) if r % 2 == 0 else (("4k", b), ("huge", a))
            for name, dec in order:
                rates[name].append(new_tokens / dec.run(prompt_len, new_tokens).decode_s)
    finally:
        a.__exit__()
        b.__exit__()
    report = a.huge_pages
    return {"graph": str(onnx_path), "rounds": rounds,
            "huge_tok_s": round(statistics.median(rates["huge"]), 1),
            "small_pages_tok_s": round(statistics.median(rates["4k"]), 1),
            "ratio": round(statistics.median(x / y for x, y in zip(rates["huge"], rates["4k"], strict=True)), 3),
            "open_huge_s": round(open_a, 2), "open_small_pages_s": round(open_b, 2),
            "collapse_s": round(report.seconds, 3), "moved_mib": round(report.collapsed_bytes / 2**20, 1),
            "process_huge_mib_after_a": round(huge_after_a / 2**20, 1),
            "process_huge_mib_after_b": round(huge_after_b / 2**20, 1)}


def _in_fresh_process(graph: Path, checkpoint: Path, rounds: int) -> dict:
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        subprocess.run([sys.executable, "-m", "benchmarks.huge_pages", str(graph), "--checkpoint", str(checkpoint),
                        "--rounds", str(rounds), "--json", str(out)], check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())["rows"][0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("graphs", nargs="*", type=Path)
    parser.add_argument("--work", default="/tmp/llmtrt-bench", help="benchmarks.decode's work directory")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="the graphs' checkpoint (default: WORK/llama-156m)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--json", dest="json_out", default=None)
    args = parser.parse_args(argv)
    from llmtrt.exporter.config import resolve_model

    work = Path(args.work)
    graphs = args.graphs or [work / "decode-graphs" / g / "model.onnx" for g in GRAPHS]
    missing = [g for g in graphs if not g.is_file()]
    if missing:
        print(f"no such graph: {', '.join(map(str, missing))} (run python -m benchmarks.decode --work {work} "
              "first, or name graphs)", file=sys.stderr)
        return 2
    checkpoint = args.checkpoint or work / "llama-156m"
    if len(graphs) == 1:
        rows = [measure(graphs[0], resolve_model(str(checkpoint)).config, rounds=args.rounds)]
    else:
        rows = [_in_fresh_process(g, checkpoint, args.rounds) for g in graphs]
    print(f"{'graph':<34} {'huge tok/s':>10} {'4 KiB tok/s':>11} {'ratio':>6} {'open huge s':>11} "
          f"{'open 4 KiB s':>12} {'collapse s':>10} {'moved MiB':>9} {'huge MiB A->B':>14}")
    for r in rows:
        print(f"{Path(r['graph']).parent.name:<34} {r['huge_tok_s']:>10.1f} {r['small_pages_tok_s']:>11.1f} "
              f"{r['ratio']:>6.3f} {r['open_huge_s']:>11.2f} {r['open_small_pages_s']:>12.2f} {r['collapse_s']:>10.3f} "
              f"{r['moved_mib']:>9.1f} {r['process_huge_mib_after_a']:>6.0f}->{r['process_huge_mib_after_b']:<6.0f}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"threads": THREADS, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
