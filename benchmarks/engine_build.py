"""Engine builds at real sizes: wall seconds, peak memory and plan size against the weights.

    python -m benchmarks.engine_build --work /tmp/llmtrt-bench               # 1.1B-shaped: fp32, int4
    python -m benchmarks.engine_build --work /tmp/llmtrt-bench --int4-8b     # + the 8B-shaped int4 graph

``measure_engine_builds(work)`` returns a dict (``rows``: one per build) for ``benchmarks.run``.
Each build is ``llmtrt build EXPORT --out ENGINE --backend tensorrt-rtx --target-cc 8.9 --max-kv
2047`` (the command a user types) in its own process, sampled every 50 ms through
/proc/PID/status: peak RSS is the kernel's high-water mark (VmHWM, what ``/usr/bin/time -v``
reports as "Maximum resident set size"), peak anonymous memory the largest RssAnon sample (what
cannot be reclaimed; RSS also counts mapped file pages, which the page cache can drop). Inputs:
the 1.1B-shaped checkpoint (``benchmarks.make_checkpoint``) exported with ``llmtrt export``; fp16
by ``llmtrt quantize --to fp16`` when that succeeds; int4 by ``benchmarks.int4_graph`` (random
blocked-int4 weights in the quantizer's layout, built as an int4 export). Engines are deleted after
each row (a 1.1B fp32 plan is 4.4 GB); ``flag_refusal_seconds`` times an impossible ``--max-kv``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

LLMTRT = [sys.executable, "-c", "import sys; from llmtrt.pipelines.cli import main; sys.argv[0] = 'llmtrt'; main()"]
BUILD_FLAGS = ["--backend", "tensorrt-rtx", "--target-cc", "8.9", "--json"]


def sampled_run(cmd: list[str], interval: float = 0.05) -> dict:
    """Run ``cmd``; wall seconds, exit code, peak RSS / anonymous / file-backed bytes, stdout, stderr tail."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks = {"VmHWM": 0, "RssAnon": 0, "RssFile": 0}
    status = Path(f"/proc/{proc.pid}/status")
    timeline: list[list[float]] = []  # [seconds, RSS MB, anonymous MB] whenever RSS moved by 100 MB or more
    while proc.poll() is None:
        try:
            now = {}
            for line in status.read_text().splitlines():
                key, _, value = line.partition(":")
                if key in peaks or key == "VmRSS":
                    now[key] = int(value.split()[0]) << 10
                    if key in peaks:
                        peaks[key] = max(peaks[key], now[key])
            if "VmRSS" in now and (not timeline or abs(now["VmRSS"] / 2**20 - timeline[-1][1]) >= 100):
                timeline.append([round(time.perf_counter() - t0, 2), now["VmRSS"] >> 20, now.get("RssAnon", 0) >> 20])
        except (FileNotFoundError, ProcessLookupError, ValueError):
            pass
        time.sleep(interval)
    out, err = proc.communicate()
    return {"rc": proc.returncode, "wall_seconds": round(time.perf_counter() - t0, 2),
            "peak_rss_bytes": peaks["VmHWM"], "peak_anon_bytes": peaks["RssAnon"], "peak_file_bytes": peaks["RssFile"],
            "rss_timeline_mb": timeline, "stdout": out, "stderr_tail": "\n".join(err.strip().splitlines()[-3:])}


def build_row(export_dir: Path, out: Path, label: str, max_kv: int = 2047, extra: tuple[str, ...] = ()) -> dict:
    """One `llmtrt build` of ``export_dir``, measured; the engine directory is removed afterwards."""
    run = sampled_run([*LLMTRT, "build", str(export_dir), "--out", str(out), "--max-kv", str(max_kv), *BUILD_FLAGS,
                       *extra])
    row = {"model": label, "command": f"llmtrt build {export_dir} --out {out} --max-kv {max_kv} "
                                      + " ".join(BUILD_FLAGS[:-1] + list(extra))}
    if run["rc"] != 0:
        shutil.rmtree(out, ignore_errors=True)
        return {**row, "error": run["stderr_tail"] or f"exit {run['rc']}"}
    summary = json.loads(run["stdout"])
    weights = summary["weights_bytes"]
    manifest = json.loads((out / f"engine.{summary['precision']}.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    return {**row, "precision": summary["precision"], "backend": f"{summary['backend']} {summary['backend_version']}",
            "weights_bytes": weights, "plan_bytes": summary["plan_bytes"],
            "plan_over_weights": summary["plan_over_weights"], "wall_seconds": run["wall_seconds"],
            "build_seconds": summary["build_seconds"], "peak_rss_bytes": run["peak_rss_bytes"],
            "peak_rss_over_weights": round(run["peak_rss_bytes"] / weights, 3),
            "peak_anon_bytes": run["peak_anon_bytes"], "peak_anon_over_weights": round(run["peak_anon_bytes"] / weights, 3),
            "rss_timeline_mb": run["rss_timeline_mb"],
            "network_layers": summary["layers"], "fused_gemm_groups": manifest["lowering"]["fused_gemm_groups"],
            "profiles": [p["name"] for p in manifest["profiles"]]}


def _ensure(path: Path, make: list[str]) -> Path:
    if not (path / "manifest.json").is_file():
        proc = subprocess.run(make, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(make)} failed:\n{proc.stderr[-1500:]}")
    return path


def _checkpoint(work: Path, shape: str) -> Path:
    from benchmarks.make_checkpoint import ensure_tokenizer, write_checkpoint

    path = work / f"llama-{shape}"
    if not (path / "model.safetensors").exists():
        write_checkpoint(path, shape)
    ensure_tokenizer(path)
    return path


def measure_engine_builds(work: str | Path, *, shape: str = "1.1b", precisions: tuple[str, ...] = ("fp32", "int4"),
                          int4_8b: bool = False, keep_inputs: bool = True) -> dict:
    """Build the ``shape``-shaped model in each precision (plus the 8B-shaped int4 graph) and measure."""
    work = Path(work)
    root = work / "engine-build"
    root.mkdir(parents=True, exist_ok=True)
    report: dict = {"shape": shape, "cpu_count": os.cpu_count(), "load_average_start": os.getloadavg(), "rows": []}
    fp32 = _ensure(root / f"export-{shape}-fp32", [*LLMTRT, "export", "--model", str(_checkpoint(work, shape)),
                                                   "--out", str(root / f"export-{shape}-fp32")])
    refusal = sampled_run([*LLMTRT, "build", str(fp32), "--out", str(root / "refused"), "--max-kv", "1000000",
                           "--backend", "tensorrt-rtx"])
    report["flag_refusal_seconds"] = refusal["wall_seconds"]
    report["flag_refusal_message"] = refusal["stderr_tail"]
    inputs = {"fp32": lambda: fp32,
              "fp16": lambda: _ensure(root / f"export-{shape}-fp16", [*LLMTRT, "quantize", str(fp32), "--to", "fp16",
                                                                    "--out", str(root / f"export-{shape}-fp16")]),
              "int4": lambda: _ensure(root / f"int4-{shape}", [sys.executable, "-m", "benchmarks.int4_graph", "--model",
                                                               str(_checkpoint(work, shape)), "--out",
                                                               str(root / f"int4-{shape}")])}
    jobs = [(f"{shape} {p}", inputs[p]) for p in precisions]
    if int4_8b:
        jobs.append(("8b int4", lambda: _ensure(root / "int4-8b", [sys.executable, "-m", "benchmarks.int4_graph",
                                                                  "--model", "llama-3.1-8b", "--out",
                                                                  str(root / "int4-8b")])))
    for label, make in jobs:
        try:
            export_dir = make()
        except RuntimeError as exc:
            report["rows"].append({"model": label, "error": str(exc).splitlines()[0]})
            continue
        report["rows"].append(build_row(export_dir, root / "engine", label, 4095 if label.startswith("8b") else 2047))
    if not keep_inputs:
        shutil.rmtree(root, ignore_errors=True)
    report["load_average_end"] = os.getloadavg()
    return report


def format_table(report: dict, timeline: bool = False) -> str:
    lines = [f"{'model':<12} {'weights GB':>10} {'plan/weights':>12} {'wall s':>7} {'peak RSS GB':>11} "
             f"{'RSS/weights':>11} {'anon/weights':>12}"]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"{r['model']:<12} error: {r['error']}")
            continue
        lines.append(f"{r['model']:<12} {r['weights_bytes'] / 1e9:>10.2f} {r['plan_over_weights']:>12.3f} "
                     f"{r['wall_seconds']:>7.1f} {r['peak_rss_bytes'] / 1e9:>11.2f} {r['peak_rss_over_weights']:>11.2f} "
                     f"{r['peak_anon_over_weights']:>12.2f}")
    lines.append(f"impossible --max-kv refused in {report['flag_refusal_seconds']:.2f} s")
    if timeline:
        for r in report["rows"]:
            if r.get("rss_timeline_mb"):
                lines.append(f"{r['model']} RSS over time (s: RSS MB / anonymous MB): "
                             + ", ".join(f"{t:g}: {rss}/{anon}" for t, rss, anon in r["rss_timeline_mb"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/llmtrt-bench")
    parser.add_argument("--shape", default="1.1b")
    parser.add_argument("--precisions", default="fp32,int4",
                        help="of fp32, fp16, int4 (fp16 runs `llmtrt quantize --to fp16` on the export)")
    parser.add_argument("--int4-8b", action="store_true", help="also the 8B-shaped int4 graph (~8 GB of weights)")
    parser.add_argument("--clean", action="store_true", help="delete the exports afterwards")
    parser.add_argument("--timeline", action="store_true", help="also print each build's RSS over time")
    parser.add_argument("--json", dest="json_out", default=None)
    args = parser.parse_args(argv)
    report = measure_engine_builds(args.work, shape=args.shape, precisions=tuple(args.precisions.split(",")),
                                   int4_8b=args.int4_8b, keep_inputs=not args.clean)
    print(format_table(report, timeline=args.timeline))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
