"""Calibration: activation statistics of an fp32 export on real text, cached in calibration_cache.json.

    windows = calibration_windows("configs/text/calib.txt", tokenizer, samples=16, seq_len=128)
    stats = calibrate(export_dir, out_dir, windows, linear_inputs=["rms_norm", ...], text_path=...)
    stats.amax["add_145"]            # max |x| over every window, every float tensor of the graph
    stats.channel_amax["rms_norm"]   # per input channel, for SmoothQuant
    stats.rows["rms_norm"]           # [rows, in] samples of a linear layer's input, for AWQ / observers

How: the exported ONNX runs in ONNX Runtime (CPU) with every float intermediate tensor added as a
graph output, one window at a time (batch 1, empty KV cache, positions 0..L-1). That is the graph
being quantized, so the statistics are of exactly the tensors the Q/DQ nodes will see; the PyTorch
model shares the weights but not the tensor names.

The cache (``calibration_cache.json`` + ``calibration_rows.npz`` in the output directory) records
the source ONNX sha256, the calibration text sha256, the tokenizer, samples and sequence length;
it is reused only when all of them match, and rewritten (atomically) otherwise.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmtrt import configs
from llmtrt.pipelines.errors import LlmtrtUserError

CACHE_FILE = "calibration_cache.json"
ROWS_FILE = "calibration_rows.npz"
CACHE_SCHEMA = 1
DEFAULT_CALIB_TEXT = configs.path("text", "calib.txt")
_ROWS_BUDGET_BYTES = 1 << 30  # linear-layer input samples kept in memory, all layers together


# --------------------------------------------------------------------------------------------
# calibration text -> token windows
# --------------------------------------------------------------------------------------------
def read_calibration_text(path: str | Path) -> str:
    path = Path(path)
    fix = "pass --calib-text FILE with UTF-8 text like the model's inputs (e.g. configs/text/calib.txt)"
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise LlmtrtUserError(f"{path}: no such calibration text file; {fix}") from None
    except IsADirectoryError:
        raise LlmtrtUserError(f"{path}: is a directory; {fix}") from None
    except PermissionError:
        raise LlmtrtUserError(f"{path}: not readable (permission denied); {fix}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LlmtrtUserError(f"{path}: not UTF-8 text (bad byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                              "convert it first, e.g. iconv -t UTF-8") from None
    if not text.strip():
        raise LlmtrtUserError(f"{path}: calibration text is empty; {fix}")
    return text


def calibration_windows(path: str | Path, tokenizer, samples: int, seq_len: int) -> np.ndarray:
    """``samples`` windows of ``seq_len`` tokens, evenly spaced over the text: int64 [samples, seq_len].

    Windows overlap when the text is shorter than ``samples * seq_len``; a text shorter than one
    window is an error.
    """
    if samples < 1:
        raise LlmtrtUserError(f"--calib-samples must be at least 1, got {samples}")
    if seq_len < 2:
        raise LlmtrtUserError(f"--calib-seq-len must be at least 2, got {seq_len}")
    tokens = np.asarray(tokenizer.encode(read_calibration_text(path)), dtype=np.int64)
    if len(tokens) < seq_len:
        raise LlmtrtUserError(f"{path}: {len(tokens)} tokens, too short for one calibration window of "
                              f"--calib-seq-len {seq_len}; give a longer text or a smaller --calib-seq-len")
    starts = np.linspace(0, len(tokens) - seq_len, samples).round().astype(np.int64)
    return np.stack([tokens[s:s + seq_len] for s in starts])


# --------------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------------
@dataclass
class CalibrationStats:
    """What calibration measured; ``cache`` says whether it came from calibration_cache.json."""

    amax: dict[str, float]                     # every float tensor: max |x|
    channel_amax: dict[str, np.ndarray]        # linear-layer inputs: max |x| per input channel
    channel_mean: dict[str, np.ndarray]        # linear-layer inputs: mean |x| per input channel (AWQ)
    rows: dict[str, np.ndarray]                # linear-layer inputs: [rows, in] float32 samples
    windows: int
    seq_len: int
    key: dict[str, Any] = field(default_factory=dict)
    cache: str = "computed"
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {**self.key, "windows": self.windows, "tensors": len(self.amax),
                "linear_inputs": len(self.channel_amax), "rows_per_input": _first_len(self.rows),
                "cache": self.cache, "seconds": round(self.seconds, 3)}


def _first_len(rows: dict[str, np.ndarray]) -> int:
    return int(next(iter(rows.values())).shape[0]) if rows else 0


class Progress:
    """A progress bar on stderr: redrawn in place on a terminal, one plain line per step otherwise."""

    def __init__(self, label: str, total: int, stream=None) -> None:
        self.label, self.total, self.stream = label, total, stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()

    def update(self, done: int) -> None:
        elapsed = time.perf_counter() - self.t0
        if self.tty:
            width = 30
            filled = int(width * done / self.total)
            self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} "
                              f"{elapsed:.1f}s")
            if done == self.total:
                self.stream.write("\n")
        else:
            self.stream.write(f"{self.label}: {done}/{self.total} windows ({elapsed:.1f} s)\n")
        self.stream.flush()


def _feeds(session, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Inputs for one prefill of ``ids`` [1, L] from an empty cache (dynamic or static layout)."""
    n = ids.shape[1]
    feeds: dict[str, np.ndarray] = {"input_ids": ids, "position_ids": np.arange(n, dtype=np.int64)[None, :]}
    static = any(i.name == "write_indices" for i in session.get_inputs())
    cache_len = n
    for i in session.get_inputs():
        if i.name.startswith("past_key_values."):
            dims = list(i.shape)
            if static and isinstance(dims[2], int):
                cache_len = dims[2]
            length = (cache_len if static else 0)
            dtype = np.float16 if i.type == "tensor(float16)" else np.float32
            feeds[i.name] = np.zeros((1, int(dims[1]), length, int(dims[3])), dtype=dtype)
    if static:
        for name, arr in list(feeds.items()):
            if name.startswith("past_key_values.") and arr.shape[2] != cache_len:
                feeds[name] = np.zeros((*arr.shape[:2], cache_len, arr.shape[3]), dtype=arr.dtype)
        mask = np.zeros((1, cache_len), dtype=np.int64)
        mask[:, :n] = 1
        feeds["attention_mask"] = mask
        feeds["write_indices"] = np.zeros((1,), dtype=np.int64)
    else:
        feeds["attention_mask"] = np.ones((1, n), dtype=np.int64)
    return feeds


def float_tensors(model) -> list[str]:
    """Names of the float32 tensors nodes produce (graph outputs included), in graph order."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in (*inferred.graph.value_info, *inferred.graph.output)}
    return [o for n in model.graph.node for o in n.output if o and types.get(o) == onnx.TensorProto.FLOAT]


def collect(onnx_path: Path, windows: np.ndarray, linear_inputs: list[str], progress: bool = True) -> CalibrationStats:
    """Run the fp32 graph on every window and gather the statistics (no cache involved)."""
    import onnx
    import onnxruntime as ort

    t0 = time.perf_counter()
    # Without the weights: shape inference needs only the graph, and ONNX Runtime reads the external
    # data itself, so a multi-GB model is never copied into a protobuf (which cannot exceed 2 GB).
    model = onnx.load(str(onnx_path), load_external_data=False)
    names = float_tensors(model)
    missing = [t for t in linear_inputs if t not in names]
    if missing:
        raise RuntimeError(f"linear-layer inputs not among the graph's float tensors: {missing[:5]}")
    existing = {o.name for o in model.graph.output}
    for name in names:
        if name not in existing:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # The graph with extra outputs is written beside the original (ONNX Runtime only reads external
    # data from the model's own directory, links resolved) and removed once the session holds it.
    fd, path = tempfile.mkstemp(prefix=".calibration-", suffix=".onnx", dir=onnx_path.parent)
    os.close(fd)
    try:
        onnx.save(model, path)
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    finally:
        Path(path).unlink(missing_ok=True)
    del model
    widths: dict[str, int] = {}
    total_rows = windows.shape[0] * windows.shape[1]
    amax = dict.fromkeys(names, 0.0)
    ch_amax: dict[str, np.ndarray] = {}
    ch_sum: dict[str, np.ndarray] = {}
    rows: dict[str, list[np.ndarray]] = {t: [] for t in linear_inputs}
    keep_every = 1
    bar = Progress("calibrating", len(windows)) if progress else None
    for k, ids in enumerate(windows):
        outs = session.run(names, _feeds(session, ids[None, :]))
        for name, value in zip(names, outs, strict=True):
            if value.size:
                amax[name] = max(amax[name], float(np.max(np.abs(value))))
        for name in linear_inputs:
            x = outs[names.index(name)]
            x = x.reshape(-1, x.shape[-1]).astype(np.float32)
            if name not in widths:
                widths[name] = x.shape[1]
                ch_amax[name] = np.zeros(x.shape[1], dtype=np.float32)
                ch_sum[name] = np.zeros(x.shape[1], dtype=np.float64)
                row_bytes = 4 * sum(1 for _ in linear_inputs) * x.shape[1]
                keep_every = max(keep_every, math.ceil(total_rows * row_bytes / _ROWS_BUDGET_BYTES))
            ch_amax[name] = np.maximum(ch_amax[name], np.abs(x).max(axis=0))
            ch_sum[name] += np.abs(x).sum(axis=0, dtype=np.float64)
            rows[name].append(x[::keep_every].copy())
        if bar:
            bar.update(k + 1)
    count = windows.shape[0] * windows.shape[1]
    return CalibrationStats(
        amax=amax, channel_amax=ch_amax,
        channel_mean={n: (s / count).astype(np.float32) for n, s in ch_sum.items()},
        rows={n: np.concatenate(r) for n, r in rows.items()},
        windows=int(windows.shape[0]), seq_len=int(windows.shape[1]), seconds=time.perf_counter() - t0)


# --------------------------------------------------------------------------------------------
# the cache
# --------------------------------------------------------------------------------------------
def cache_key(source_onnx_sha256: str, text_path: Path, tokenizer_name: str, windows: np.ndarray,
              linear_inputs: list[str]) -> dict[str, Any]:
    from llmtrt.exporter.files import sha256_file

    return {"source_onnx_sha256": source_onnx_sha256, "calib_text": str(text_path),
            "calib_text_sha256": sha256_file(text_path), "tokenizer": tokenizer_name,
            "samples": int(windows.shape[0]), "seq_len": int(windows.shape[1]),
            "windows_sha256": hashlib.sha256(np.ascontiguousarray(windows).tobytes()).hexdigest(),
            "linear_inputs_sha256": hashlib.sha256("\n".join(linear_inputs).encode()).hexdigest()}


_KEY_FIELDS = ("source_onnx_sha256", "calib_text_sha256", "tokenizer", "samples", "seq_len", "windows_sha256",
               "linear_inputs_sha256")


def load_cache(out_dir: Path, key: dict[str, Any]) -> CalibrationStats | None:
    """The cached statistics if calibration_cache.json matches ``key`` (and its rows file its hash)."""
    from llmtrt.exporter.files import sha256_file

    path, rows_path = out_dir / CACHE_FILE, out_dir / ROWS_FILE
    if not path.is_file() or not rows_path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # a damaged cache is recomputed, not trusted
    if raw.get("schema_version") != CACHE_SCHEMA or any(raw.get(f) != key[f] for f in _KEY_FIELDS):
        return None
    if raw.get("rows_sha256") != sha256_file(rows_path):
        return None
    with np.load(rows_path) as npz:
        rows = {name: npz[f"rows{i}"] for i, name in enumerate(raw["linear_inputs"])}
    tensors = raw["tensors"]
    return CalibrationStats(
        amax={n: float(t["amax"]) for n, t in tensors.items()},
        channel_amax={n: np.asarray(c["amax"], dtype=np.float32) for n, c in raw["channels"].items()},
        channel_mean={n: np.asarray(c["mean"], dtype=np.float32) for n, c in raw["channels"].items()},
        rows=rows, windows=raw["samples"], seq_len=raw["seq_len"], key=key, cache="reused")


def save_cache(out_dir: Path, key: dict[str, Any], stats: CalibrationStats, linear_inputs: list[str]) -> None:
    from llmtrt.exporter.files import atomic_file, sha256_file, write_json_atomically

    with atomic_file(out_dir / ROWS_FILE, suffix=".npz") as tmp:
        np.savez(tmp, **{f"rows{i}": stats.rows[name] for i, name in enumerate(linear_inputs)})
    count = stats.windows * stats.seq_len
    payload = {
        "schema_version": CACHE_SCHEMA, **key,
        "rows_file": ROWS_FILE, "rows_sha256": sha256_file(out_dir / ROWS_FILE),
        "linear_inputs": linear_inputs,
        "tensors": {n: {"amax": a, "method": "max", "samples": count} for n, a in stats.amax.items()},
        "channels": {n: {"amax": [float(v) for v in stats.channel_amax[n]],
                         "mean": [float(v) for v in stats.channel_mean[n]], "samples": count}
                     for n in linear_inputs},
    }
    write_json_atomically(out_dir / CACHE_FILE, payload)


def calibrate(onnx_path: Path, source_onnx_sha256: str, out_dir: Path, text_path: Path, tokenizer,
              samples: int, seq_len: int, linear_inputs: list[str], progress: bool = True) -> CalibrationStats:
    """Statistics for ``onnx_path`` on ``text_path``: from the cache when its key matches, else measured."""
    windows = calibration_windows(text_path, tokenizer, samples, seq_len)
    key = cache_key(source_onnx_sha256, Path(text_path), getattr(tokenizer, "name", type(tokenizer).__name__),
                    windows, linear_inputs)
    cached = load_cache(out_dir, key)
    if cached is not None:
        return cached
    stats = collect(onnx_path, windows, linear_inputs, progress=progress)
    stats.key = key
    save_cache(out_dir, key, stats, linear_inputs)
    return stats
