"""Decode timing: prefill latency and greedy tokens/s of our graphs (through llmtrt's ONNX Runtime runner),
of the onnxruntime-genai builder's graphs (in its own runtime) and of transformers' eager PyTorch.

    rows = side_by_side({"standard": OrtDecoder(path, config), "builder fp32": GenaiDecoder(model_dir)},
                        prompt_len=128, new_tokens=128, rounds=5)
    report = issue15_comparison(work, checkpoint, rounds=5)      # python -m benchmarks.decode --work DIR

A shared, noisy machine moves every figure between runs, so the graphs being compared are measured in
turn, A B C A B C ... (each round starts one further along, so no graph always follows the same one; each
pass on a freshly loaded graph), and a ratio is taken round by round: the median of per-round ratios of
decode tokens/s stays meaningful while the machine's speed drifts. Each pass is batch 1: a prompt
(prefill latency), then greedy decode (tokens/s of the decode loop only); also the process CPU seconds per
decoded token (the builder's runtime spins its threads, ours lets them sleep, so CPU time is a figure per
runtime, not a ratio). ``builder ... @ort`` rows run the builder's graph in plain ONNX Runtime with our
session settings: the graphs compared under the same runtime conditions.

Our runner and the @ort rows put each session's memory on 2 MiB pages (pipelines/runtime/huge_pages.py,
what `llmtrt generate` does from 512 new tokens, or with --huge-pages); the ``4 KiB pages`` rows are
our main graphs without it. The builder's runtime gets what the machine's transparent-huge-page mode gives
it (``madvise``, the Debian/Ubuntu default: 4 KiB pages). Rows say how many MiB of the process were on
huge pages after each open and the seconds the collapse added to opening the session (not part of any
timed figure).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.common import REPO, THREADS, bench_python, median_time, prompt_ids


@dataclass
class Pass:
    """One prefill + greedy decode."""

    prefill_s: float
    decode_s: float
    decode_cpu_s: float
    tokens: list[int]
    prefill_logits: np.ndarray  # the prompt's last position


class OrtDecoder:
    """An ONNX graph of ours in llmtrt's ONNX Runtime runner (what validate and generate run)."""

    def __init__(self, onnx_path: Path, config, layout: str = "dynamic", threads: int = THREADS,
                 contrib: bool | None = None, huge_pages: bool = True) -> None:
        from llmtrt.pipelines.runtime.runners import OnnxRuntimeRunner

        self.config = config
        self.runner = OnnxRuntimeRunner(onnx_path, config, layout, threads=threads, contrib=contrib,
                                        huge_pages=huge_pages)
        self.huge_pages = None  # the last open's huge_pages.Report

    def __enter__(self) -> OrtDecoder:
        self.runner.activate()
        self.huge_pages = self.runner.huge_pages
        return self

    def __exit__(self, *exc) -> None:
        self.runner.deactivate()

    def run(self, prompt_len: int, new_tokens: int) -> Pass:
        prompt = prompt_ids(self.config.vocab_size, prompt_len)
        state = self.runner.new_cache(1, prompt_len + new_tokens)
        t0 = time.perf_counter()
        logits = self.runner.step(prompt, np.arange(prompt_len, dtype=np.int64)[None], np.ones_like(prompt), state)
        prefill_s = time.perf_counter() - t0
        first = logits[0, -1].copy()
        one, tokens = np.ones((1, 1), dtype=np.int64), []
        t0, c0 = time.perf_counter(), time.process_time()
        for k in range(new_tokens):
            token = logits[:, -1:].argmax(-1).astype(np.int64)
            tokens.append(int(token[0, 0]))
            logits = self.runner.step(token, np.array([[prompt_len + k]], dtype=np.int64), one, state)
        return Pass(prefill_s, time.perf_counter() - t0, time.process_time() - c0, tokens, first)


class GenaiDecoder:
    """A builder graph in the onnxruntime-genai runtime (``benchmarks.genai_decode --serve`` in .venv-bench):
    its graph as its users run it, KV buffers shared between past and present."""

    def __init__(self, model_dir: Path, threads: int = THREADS) -> None:
        self.model_dir, self.threads, self.proc = Path(model_dir), threads, None

    def __enter__(self) -> GenaiDecoder:
        self.proc = subprocess.Popen([str(bench_python()), "-m", "benchmarks.genai_decode", str(self.model_dir),
                                      "--serve", "--threads", str(self.threads)], cwd=str(REPO), text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._read()  # {"ready": true}
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
            self.proc = None

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"benchmarks.genai_decode --serve {self.model_dir} exited: "
                               f"{self.proc.stderr.read()[-500:]}")
        return json.loads(line)

    def run(self, prompt_len: int, new_tokens: int) -> Pass:
        self.proc.stdin.write(f"{prompt_len} {new_tokens}\n")
        self.proc.stdin.flush()
        out = self._read()
        return Pass(out["prefill_s"], out["decode_s"], out["decode_cpu_s"], out["tokens"],
                    np.asarray(out["prefill_logits_last"], dtype=np.float32))


class BuilderInOrt:
    """A builder graph in plain ONNX Runtime with our runner's session settings and the builder runtime's way
    of feeding it (past and present bound to one full-length buffer per layer, which its GroupQueryAttention
    appends to in place): the same runtime conditions as our graphs, so the graphs are compared, not the
    runtimes."""

    def __init__(self, model_dir: Path, config, threads: int = THREADS, huge_pages: bool = True) -> None:
        self.path, self.config, self.threads, self.session = Path(model_dir) / "model.onnx", config, threads, None
        self.want_huge_pages, self.huge_pages = huge_pages, None

    def __enter__(self) -> BuilderInOrt:
        from llmtrt.pipelines.runtime import huge_pages
        from llmtrt.pipelines.runtime.runners import ort_session

        self.session = ort_session(self.path, threads=self.threads)
        self.huge_pages = huge_pages.collapse_anonymous_memory() if self.want_huge_pages else None
        return self

    def __exit__(self, *exc) -> None:
        self.session = None

    def _step(self, ids: np.ndarray, total: int, buffers: list[np.ndarray]) -> np.ndarray:
        binding = self.session.io_binding()
        binding.bind_output("logits")
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(ids, dtype=np.int64))
        binding.bind_cpu_input("attention_mask", np.ones((1, total), dtype=np.int64))
        for i in range(self.config.num_hidden_layers):
            for k, kind in enumerate(("key", "value")):
                buf = buffers[2 * i + k]
                args = ("cpu", 0, buf.dtype, buf.shape, buf.ctypes.data)
                binding.bind_input(f"past_key_values.{i}.{kind}", *args)
                binding.bind_output(f"present.{i}.{kind}", *args)
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()

    def run(self, prompt_len: int, new_tokens: int) -> Pass:
        c = self.config
        shape = (1, c.num_key_value_heads, prompt_len + new_tokens + 1, c.head_dim)
        buffers = [np.zeros(shape, np.float32) for _ in range(2 * c.num_hidden_layers)]
        t0 = time.perf_counter()
        logits = self._step(np.asarray(prompt_ids(c.vocab_size, prompt_len)).reshape(1, -1), prompt_len, buffers)
        prefill_s, first, tokens = time.perf_counter() - t0, logits[0, -1].copy(), []
        t0, c0 = time.perf_counter(), time.process_time()
        for k in range(new_tokens):
            tokens.append(int(logits[0, -1].argmax()))
            logits = self._step(np.array([[tokens[-1]]], dtype=np.int64), prompt_len + k + 1, buffers)
        return Pass(prefill_s, time.perf_counter() - t0, time.process_time() - c0, tokens, first)


def side_by_side(decoders: dict, prompt_len: int = 128, new_tokens: int = 128, rounds: int = 5) -> dict[str, dict]:
    """Every decoder (OrtDecoder, GenaiDecoder, BuilderInOrt: context managers with ``run``) measured in
    turn, ``rounds`` times. Each pass loads the graph afresh (a session's memory placement alone moved
    decode speed by ~10% between two sessions of one graph), warms it up with a short untimed pass, then
    times one prefill + decode. Per decoder: medians, every round's tokens/s (for :func:`paired_ratio`),
    the greedy tokens and the prefill's last logits of its last pass."""
    names = list(decoders)
    passes: dict[str, list[Pass]] = {name: [] for name in names}
    huge: dict[str, list] = {name: [] for name in names}
    for r in range(rounds):
        for k in range(len(names)):
            name = names[(r + k) % len(names)]
            with decoders[name] as decoder:
                if getattr(decoder, "huge_pages", None) is not None:
                    huge[name].append(decoder.huge_pages)
                decoder.run(min(prompt_len, 16), min(new_tokens, 4))  # warm-up: first-run allocations
                passes[name].append(decoder.run(prompt_len, new_tokens))
    rows = {}
    for name, ps in passes.items():
        rows[name] = {
            "prefill_ms": round(1000 * statistics.median(p.prefill_s for p in ps), 2),
            "decode_tok_s": round(statistics.median(new_tokens / p.decode_s for p in ps), 2),
            "decode_tok_s_rounds": [round(new_tokens / p.decode_s, 2) for p in ps],
            "decode_cpu_ms_per_token": round(1000 * statistics.median(p.decode_cpu_s for p in ps) / new_tokens, 3),
            "_tokens": ps[-1].tokens, "_prefill_logits": ps[-1].prefill_logits,
        }
        if huge[name]:  # medians over the passes' opens
            rows[name]["huge_pages_mib"] = round(statistics.median(h.huge_bytes for h in huge[name]) / 2**20, 1)
            rows[name]["huge_pages_open_s"] = round(statistics.median(h.seconds for h in huge[name]), 3)
    return rows


def paired_ratio(a: dict, b: dict) -> float:
    """Median over rounds of a's decode tokens/s over b's in the same round (rows of :func:`side_by_side`)."""
    return round(statistics.median(x / y for x, y in zip(a["decode_tok_s_rounds"], b["decode_tok_s_rounds"],
                                                         strict=True)), 3)


def agreement(row: dict, reference: dict) -> dict:
    """Max |prefill logit difference| at the prompt's last position, and the greedy tokens equal to the
    reference's before the first difference (all equal: the number decoded)."""
    ours, ref = row["_tokens"], reference["_tokens"]
    same = next((k for k, (a, b) in enumerate(zip(ours, ref, strict=True)) if a != b), len(ref))
    diff = float(np.max(np.abs(row["_prefill_logits"] - reference["_prefill_logits"])))
    return {"max_abs_logit_diff_vs_ref": round(diff, 6), "greedy_tokens_equal_ref": same}


def ort_decode(onnx_path: Path, config, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    """Prefill latency and greedy decode tokens/s of one graph on its own; ``_prefill_logits`` (last position)
    and ``_tokens`` (the greedy continuation) are returned for agreement checks and dropped from the report."""
    row = side_by_side({"graph": OrtDecoder(onnx_path, config)}, prompt_len, new_tokens, rounds=repeats)["graph"]
    del row["decode_tok_s_rounds"]
    return row


def torch_eager_decode(checkpoint_dir: Path, config, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(THREADS)
    model = LlamaForCausalLM.from_pretrained(str(checkpoint_dir), torch_dtype=torch.float32).eval()
    prompt = torch.from_numpy(prompt_ids(config.vocab_size, prompt_len))

    def prefill():
        with torch.no_grad():
            return model(prompt, use_cache=True)

    first_logits = prefill().logits[0, -1].numpy()
    prefill_s = median_time(prefill, repeats)
    tokens: list[int] = []

    def decode():
        tokens.clear()
        out = prefill()
        t0 = time.perf_counter()
        with torch.no_grad():
            for _ in range(new_tokens):
                token = out.logits[:, -1:].argmax(-1)
                tokens.append(int(token[0, 0]))
                out = model(token, past_key_values=out.past_key_values, use_cache=True)
        return time.perf_counter() - t0

    seconds = statistics.median(decode() for _ in range(repeats))
    return {"prefill_ms": round(1000 * prefill_s, 2), "decode_tok_s": round(new_tokens / seconds, 2),
            "_prefill_logits": first_logits, "_tokens": list(tokens)}


# --- issue 15: our decode graphs against the onnxruntime-genai builder's, side by side --------------------

# comparison -> the decode tokens/s ratio it must reach (median of per-round ratios)
TARGETS = {"fp32 (best dialect) / builder fp32": 1.0, "int8-wo / builder int8": 1.0,
           "int4-awq / builder int4": 1.1, "custom / standard (fp32)": 0.95}


AS_WRITTEN = "as written"  # label suffix: the graph run without the runner's contrib-kernel rewrite
SMALL_PAGES = "4 KiB pages"  # label suffix: the graph in our runner without huge pages

# our quantized graphs: (precision, quantize_lm_head). The default keeps the lm_head fp16; the builder's
# int8/int4 graphs quantize theirs (MatMulNBits), so the like-for-like rows quantize ours too.
QUANTIZED = (("int8-wo", None), ("int8-wo", "int8"), ("int4-awq", None), ("int4-awq", "int4"))


def prepare_graphs(work: Path, checkpoint: Path, dialects: tuple[str, ...], quantized_dialect: str,
                   prep: dict | None = None, fresh: bool = False) -> dict:
    """Our exports of ``checkpoint`` (fused, last-position logits: what generate runs) in each dialect,
    int8-wo and int4-awq of the ``quantized_dialect`` one (``llmtrt quantize``), and the builder's
    fp32/int8/int4 graphs; reused when already there unless ``fresh``. Returns label -> ("ort", onnx path)
    | ("genai", dir) | ("error", why). ``prep`` (when given) gets the seconds of what was made now:
    ``export <dialect>``, ``quantize <precision>`` (calibration included), ``builder <precision>``."""
    import shutil

    from benchmarks.common import genai_build
    from benchmarks.run import quantize_for_bench
    from llmtrt.exporter.config import resolve_model
    from llmtrt.exporter.onnx_export import ExportOptions
    from llmtrt.pipelines.artifacts import export_artifact

    prep = {} if prep is None else prep
    source, graphs = resolve_model(str(checkpoint)), {}
    for dialect in dialects:
        out = work / "decode-graphs" / dialect
        if fresh or not (out / "manifest.json").is_file():
            t0 = time.perf_counter()
            export_artifact(source, out, ExportOptions(dialect=dialect, logits="last"))
            prep[f"export {dialect}"] = round(time.perf_counter() - t0, 2)
        graphs[f"{dialect} fp32"] = ("ort", out / "model.onnx")
    for precision, lm_head in QUANTIZED:
        name = precision + (f" lm_head {lm_head}" if lm_head else "")
        out = work / "decode-graphs" / f"{quantized_dialect}-{name.replace(' ', '-')}"
        if fresh:
            shutil.rmtree(out, ignore_errors=True)
        done = quantize_for_bench(work / "decode-graphs" / quantized_dialect, out, precision, lm_head)
        if done.get("quantized") == "now":
            prep[f"quantize {name}"] = done["quantize_seconds"]
        graphs[f"{quantized_dialect} {name}"] = ("error", done["error"]) if "error" in done else \
            ("ort", out / "model.onnx")
    for precision in ("fp32", "int8", "int4"):
        out = work / "genai" / precision
        if fresh:
            shutil.rmtree(out, ignore_errors=True)
        built = {} if (out / "model.onnx").is_file() else genai_build(checkpoint, out, precision)
        if "export_seconds" in built:
            prep[f"builder {precision}"] = built["export_seconds"]
        graphs[f"builder {precision}"] = ("error", built["error"]) if "error" in built else ("genai", out)
    return graphs


def issue15_comparison(work: Path, checkpoint: Path, rounds: int = 5, prompt_len: int = 128,
                       new_tokens: int = 128, dialects: tuple[str, ...] = ("standard", "custom", "decomposed"),
                       quantized_dialect: str = "standard", fresh: bool = False) -> dict:
    """fp32 in every dialect, int8 and int4 against the builder's graph of the same bit width, each group
    measured side by side (:func:`side_by_side`); the ratios of :data:`TARGETS`, and each row's agreement
    with our first dialect's fp32 graph (same checkpoint, same prompt)."""
    import os

    from llmtrt.exporter.config import resolve_model

    config = resolve_model(str(checkpoint)).config
    prep: dict = {}
    graphs = prepare_graphs(work, checkpoint, dialects, quantized_dialect, prep, fresh)
    load_start = os.getloadavg()
    for precision in ("fp32", "int8", "int4"):  # the same graph in plain ORT, run as ours are
        kind, path = graphs[f"builder {precision}"]
        graphs[f"builder {precision} @ort"] = ("builder@ort", path) if kind == "genai" else (kind, path)
    # our graphs as written, without the runner's ONNX Runtime contrib kernels (pipelines/runtime/ort_fusion.py)
    written = [f"{quantized_dialect} fp32", f"{quantized_dialect} int8-wo lm_head int8",
               f"{quantized_dialect} int4-awq lm_head int4"]
    for label in written:
        kind, path = graphs.get(label, ("error", f"no {label} graph"))
        graphs[f"{label} {AS_WRITTEN}"] = ("ort-written", path) if kind == "ort" else (kind, path)
        graphs[f"{label} {SMALL_PAGES}"] = ("ort-4k", path) if kind == "ort" else (kind, path)
    groups = {"fp32": [f"{d} fp32" for d in dialects] + [f"{written[0]} {AS_WRITTEN}", f"{written[0]} {SMALL_PAGES}",
                                                           "builder fp32", "builder fp32 @ort"],
              "int8": [f"{quantized_dialect} int8-wo", f"{quantized_dialect} int8-wo lm_head int8",
                       f"{written[1]} {AS_WRITTEN}", f"{written[1]} {SMALL_PAGES}", "builder int8",
                       "builder int8 @ort"],
              "int4": [f"{quantized_dialect} int4-awq", f"{quantized_dialect} int4-awq lm_head int4",
                       f"{written[2]} {AS_WRITTEN}", f"{written[2]} {SMALL_PAGES}", "builder int4",
                       "builder int4 @ort"]}
    rows: dict[str, dict] = {}
    errors = [f"{label}: {graphs[label][1]}" for label in graphs if graphs[label][0] == "error"]
    for labels in groups.values():
        ready = {label: _decoder(graphs[label], config) for label in labels if graphs[label][0] != "error"}
        rows.update(side_by_side(ready, prompt_len, new_tokens, rounds))
    reference = rows.get(f"{dialects[0]} fp32")
    for label, row in rows.items():
        if reference is not None and row is not reference and not label.endswith("@ort"):  # @ort: timing only
            row.update(agreement(row, reference))
    ratios = _issue15_ratios(rows, dialects, quantized_dialect)
    for row in rows.values():
        for key in [k for k in row if k.startswith("_")]:
            del row[key]
    return {"model": str(checkpoint), "prompt_tokens": prompt_len, "new_tokens": new_tokens, "rounds": rounds,
            "threads": THREADS, "load_average": [load_start, os.getloadavg()], "cpu_count": os.cpu_count(),
            "rows": rows, "ratios": ratios, "targets": TARGETS, "errors": errors, "prep_seconds": prep,
            "met": {k: ratios[k] >= TARGETS[k] for k in TARGETS if ratios.get(k) is not None}}


def _decoder(graph: tuple[str, Path], config):
    kind, path = graph
    return {"ort": lambda: OrtDecoder(path, config), "ort-written": lambda: OrtDecoder(path, config, contrib=False),
            "ort-4k": lambda: OrtDecoder(path, config, huge_pages=False),
            "genai": lambda: GenaiDecoder(path), "builder@ort": lambda: BuilderInOrt(path, config)}[kind]()


def _issue15_ratios(rows: dict, dialects: tuple[str, ...], quantized: str) -> dict:
    def ratio(a: str, b: str) -> float | None:
        return paired_ratio(rows[a], rows[b]) if a in rows and b in rows else None

    per_dialect = {d: ratio(f"{d} fp32", "builder fp32") for d in dialects}
    known = [r for r in per_dialect.values() if r is not None]
    out = {f"{d} fp32 / builder fp32": r for d, r in per_dialect.items()}
    out["fp32 (best dialect) / builder fp32"] = max(known) if known else None
    out["int8-wo / builder int8"] = ratio(f"{quantized} int8-wo lm_head int8", "builder int8")
    out["int4-awq / builder int4"] = ratio(f"{quantized} int4-awq lm_head int4", "builder int4")
    out["int8-wo (lm_head fp16) / builder int8"] = ratio(f"{quantized} int8-wo", "builder int8")
    out["int4-awq (lm_head fp16) / builder int4"] = ratio(f"{quantized} int4-awq", "builder int4")
    out["custom / standard (fp32)"] = ratio("custom fp32", "standard fp32")
    at_ort = [ratio(f"{d} fp32", "builder fp32 @ort") for d in dialects]  # same runtime, same session settings
    out["fp32 (best dialect) / builder fp32 @ort"] = max((r for r in at_ort if r is not None), default=None)
    out["int8-wo / builder int8 @ort"] = ratio(f"{quantized} int8-wo lm_head int8", "builder int8 @ort")
    out["int4-awq / builder int4 @ort"] = ratio(f"{quantized} int4-awq lm_head int4", "builder int4 @ort")
    mains = (f"{quantized} fp32", f"{quantized} int8-wo lm_head int8", f"{quantized} int4-awq lm_head int4")
    for label in mains:
        out[f"{label}: contrib kernels / {AS_WRITTEN}"] = ratio(label, f"{label} {AS_WRITTEN}")
    for label in mains:
        out[f"{label}: huge pages / {SMALL_PAGES}"] = ratio(label, f"{label} {SMALL_PAGES}")
    for label, builder in zip(mains, ("builder fp32", "builder int8", "builder int4"), strict=True):
        out[f"{label} {SMALL_PAGES} / {builder}"] = ratio(f"{label} {SMALL_PAGES}", builder)
    return out


def format_issue15(report: dict) -> str:
    lines = [f"decode side by side: {Path(report['model']).name}, prompt {report['prompt_tokens']}, "
             f"{report['new_tokens']} new tokens, batch 1, {report['threads']} threads, medians of "
             f"{report['rounds']} interleaved rounds; {report['cpu_count']} cores, load average "
             f"{' -> '.join(f'{a[0]:.2f}' for a in report['load_average'])}",
             f"{'graph':<44} {'prefill ms':>10} {'tok/s':>8} {'cpu ms/tok':>10} {'max|dlogit|':>11} {'same tok':>8}"]
    for label, r in report["rows"].items():
        diff, same = r.get("max_abs_logit_diff_vs_ref"), r.get("greedy_tokens_equal_ref")
        lines.append(f"{label:<44} {r['prefill_ms']:>10.1f} {r['decode_tok_s']:>8.1f} "
                     f"{r['decode_cpu_ms_per_token']:>10.2f} {'-' if diff is None else f'{diff:.2e}':>11} "
                     f"{'-' if same is None else same:>8}")
    lines += ["", f"{'ratio (median of per-round ratios of tok/s)':<62} {'value':>7} {'target':>7}"]
    for key, value in report["ratios"].items():
        target = report["targets"].get(key)
        verdict = "" if target is None or value is None else ("  met" if value >= target else "  NOT met")
        lines.append(f"{key:<62} {'-' if value is None else f'{value:.3f}':>7} "
                     f"{'' if target is None else f'{target:.2f}':>7}{verdict}")
    if report.get("prep_seconds"):
        lines.append("made now (s): " + ", ".join(f"{k} {v:g}" for k, v in report["prep_seconds"].items()))
    lines += [f"not measured: {e}" for e in report["errors"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from benchmarks.common import ensure_checkpoint

    ap = argparse.ArgumentParser(prog="python -m benchmarks.decode", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/llmtrt-bench"), help="scratch dir (checkpoint, graphs)")
    ap.add_argument("--rounds", type=int, default=5, help="measured rounds per group (after one warm-up round)")
    ap.add_argument("--dialects", default="standard,custom,decomposed", help="our fp32 dialects, first = reference")
    ap.add_argument("--json", type=Path, help="also write the report here")
    ap.add_argument("--fresh", action="store_true", help="export, quantize and build every graph anew (timed)")
    args = ap.parse_args(argv)
    report = issue15_comparison(args.work, ensure_checkpoint(args.work, "156m"), rounds=args.rounds,
                                dialects=tuple(args.dialects.split(",")), fresh=args.fresh)
    print(format_issue15(report))
    if args.json:
        from llmtrt.exporter.files import write_json_atomically

        write_json_atomically(args.json, report)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
