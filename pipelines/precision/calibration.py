"""Calibration: activation statistics of an fp32 export on real text, cached in calibration_cache.json.

    windows = calibration_windows("configs/text/calib.txt", tokenizer, samples=16, seq_len=128, bos_id=1)
    cal = Calibration(source, windows, linear_inputs=["rms_norm", ...], out_dir=out, key=cache_key(...))
    for result in cal.stages():            # one stage (prefix, each decoder layer, suffix) at a time
        result.stats.amax["add_145"]        # max |x| over every window, every float tensor of the stage
        result.stats.channel_amax["rms_norm"], result.stats.channel_mean["rms_norm"]  # per input channel
        result.stats.rows["rms_norm"]       # [rows, in] sampled rows of a linear layer's input (AWQ, observers)

How: the exported graph itself runs in ONNX Runtime (CPU), stage by stage
(:mod:`llmtrt.pipelines.precision.layerwise`), on ``samples`` windows of ``seq_len`` tokens (empty
KV cache, positions 0..L-1; the tokenizer's BOS first when it has one). That is the graph being
quantized, so the statistics are of exactly the tensors the Q/DQ nodes will see. Memory: one stage's
weights and activations, plus at most ``rows`` sampled rows per linear-layer input of that stage.

The cache (``calibration_cache.json`` + ``calibration_rows.npz`` in the output directory) records the
source ONNX sha256, the calibration text sha256, the tokenizer, its BOS (or null), samples, sequence length and rows kept;
it is reused only when all of them match, and rewritten otherwise. The rows file is written while the
stages run, one stage's arrays at a time.
"""

from __future__ import annotations

import hashlib
import json
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmtrt import configs
from llmtrt.pipelines.errors import LlmtrtUserError

CACHE_FILE = "calibration_cache.json"
ROWS_FILE = "calibration_rows.npz"
CACHE_SCHEMA = 2
DEFAULT_CALIB_TEXT = configs.path("text", "calib.txt")


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


def calibration_windows(path: str | Path, tokenizer, samples: int, seq_len: int,
                        bos_id: int | None = None) -> np.ndarray:
    """``samples`` windows of ``seq_len`` tokens, evenly spaced over the text: int64 [samples, seq_len].

    With ``bos_id`` every window starts with it (then ``seq_len - 1`` text tokens), as the model sees
    a prompt. Windows overlap when the text is shorter than ``samples * seq_len``; a text shorter than
    one window is an error.
    """
    if samples < 1:
        raise LlmtrtUserError(f"--calib-samples must be at least 1, got {samples}")
    if seq_len < 2:
        raise LlmtrtUserError(f"--calib-seq-len must be at least 2, got {seq_len}")
    tokens = np.asarray(tokenizer.encode(read_calibration_text(path)), dtype=np.int64)
    span = seq_len - (1 if bos_id is not None else 0)
    if len(tokens) < span:
        raise LlmtrtUserError(f"{path}: {len(tokens)} tokens, too short for one calibration window of "
                              f"--calib-seq-len {seq_len}; give a longer text or a smaller --calib-seq-len")
    starts = np.linspace(0, len(tokens) - span, samples).round().astype(np.int64)
    windows = np.stack([tokens[s:s + span] for s in starts])
    if bos_id is not None:
        windows = np.concatenate([np.full((samples, 1), bos_id, dtype=np.int64), windows], axis=1)
    return windows


def prefill_feeds(layout, config, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Graph inputs for one prefill of ``ids`` [batch, L] from an empty cache, in any cache layout."""
    from llmtrt.exporter.kv_cache import CacheState

    batch, n = ids.shape
    state = CacheState(tensors=[], mask=np.zeros((batch, 0), dtype=np.int64), capacity=n)
    feeds = {"input_ids": ids, "position_ids": np.broadcast_to(np.arange(n, dtype=np.int64), (batch, n)).copy(),
             **layout.step_inputs(np.ones((batch, n), dtype=np.int64), state)}
    shape = layout.cache_shape(config, batch, n)
    for i in range(config.num_hidden_layers):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = np.zeros(shape, dtype=np.float32)
    return feeds


# --------------------------------------------------------------------------------------------
# what calibration measured, all stages together (rows excepted: they live one stage at a time)
# --------------------------------------------------------------------------------------------
@dataclass
class CalibrationStats:
    amax: dict[str, float] = field(default_factory=dict)
    channel_amax: dict[str, np.ndarray] = field(default_factory=dict)
    channel_mean: dict[str, np.ndarray] = field(default_factory=dict)
    windows: int = 0
    seq_len: int = 0
    rows_per_input: int = 0
    key: dict[str, Any] = field(default_factory=dict)
    cache: str = "computed"
    seconds: float = 0.0

    def add(self, stage_stats) -> None:
        self.amax.update(stage_stats.amax)
        self.channel_amax.update(stage_stats.channel_amax)
        self.channel_mean.update(stage_stats.channel_mean)
        for rows in stage_stats.rows.values():
            self.rows_per_input = max(self.rows_per_input, int(rows.shape[0]))

    def summary(self) -> dict[str, Any]:
        return {**self.key, "windows": self.windows, "tensors": len(self.amax),
                "linear_inputs": len(self.channel_amax), "rows_per_input": self.rows_per_input,
                "cache": self.cache, "seconds": round(self.seconds, 3)}


# --------------------------------------------------------------------------------------------
# the cache
# --------------------------------------------------------------------------------------------
def cache_key(source_onnx_sha256: str, text_path: Path, tokenizer_name: str, windows: np.ndarray,
              linear_inputs: list[str], rows: int, bos_id: int | None = None) -> dict[str, Any]:
    from llmtrt.exporter.files import sha256_file

    return {"source_onnx_sha256": source_onnx_sha256, "calib_text": str(text_path),
            "calib_text_sha256": sha256_file(text_path), "tokenizer": tokenizer_name,
            "bos_id": bos_id, "samples": int(windows.shape[0]), "seq_len": int(windows.shape[1]), "rows": int(rows),
            "windows_sha256": hashlib.sha256(np.ascontiguousarray(windows).tobytes()).hexdigest(),
            "linear_inputs_sha256": hashlib.sha256("\n".join(linear_inputs).encode()).hexdigest()}


_KEY_FIELDS = ("source_onnx_sha256", "calib_text_sha256", "tokenizer", "bos_id", "samples", "seq_len", "rows",
               "windows_sha256", "linear_inputs_sha256")


class CacheReader:
    """calibration_cache.json + calibration_rows.npz when they match ``key``; arrays read per stage."""

    def __init__(self, raw: dict[str, Any], npz) -> None:
        self.raw, self.npz = raw, npz
        self.index = {name: i for i, name in enumerate(raw["linear_inputs"])}

    @classmethod
    def open(cls, out_dir: Path, key: dict[str, Any], stages: int) -> CacheReader | None:
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
        if not isinstance(raw.get("stages"), int) or raw["stages"] < stages:
            return None  # written by a run that stopped earlier (a quantized precision skips the lm_head)
        if raw.get("rows_sha256") != sha256_file(rows_path):
            return None
        return cls(raw, np.load(rows_path))

    def stage_stats(self, stage):
        from llmtrt.pipelines.precision.layerwise import StageStats

        stats = StageStats()
        tensors = self.raw["tensors"]
        for name in stage.floats:
            if name in tensors:
                stats.amax[name] = float(tensors[name]["amax"])
            if name in self.index:
                i = self.index[name]
                stats.channel_amax[name] = self.npz[f"amax{i}"]
                stats.channel_mean[name] = self.npz[f"mean{i}"]
                stats.rows[name] = self.npz[f"rows{i}"]
        return stats

    def close(self) -> None:
        self.npz.close()


class CacheWriter:
    """Writes calibration_rows.npz one stage at a time, then calibration_cache.json."""

    def __init__(self, out_dir: Path, key: dict[str, Any], linear_inputs: list[str]) -> None:
        self.out_dir, self.key, self.linear_inputs = out_dir, key, linear_inputs
        self.index = {name: i for i, name in enumerate(linear_inputs)}
        self.tmp = out_dir / f".{ROWS_FILE}.partial"
        self.zip = zipfile.ZipFile(self.tmp, "w", zipfile.ZIP_STORED, allowZip64=True)
        self.tensors: dict[str, dict[str, Any]] = {}

    def add(self, stats) -> None:
        count = self.key["samples"] * self.key["seq_len"]
        for name, a in stats.amax.items():
            self.tensors[name] = {"amax": a, "method": "max", "samples": count}
        for name in stats.channel_amax:
            i = self.index.get(name)
            if i is None:
                continue
            for member, array in ((f"amax{i}", stats.channel_amax[name]), (f"mean{i}", stats.channel_mean[name]),
                                  (f"rows{i}", stats.rows[name])):
                with self.zip.open(member + ".npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)

    def close(self, stages: int) -> None:
        from llmtrt.exporter.files import sha256_file, write_json_atomically

        self.zip.close()
        self.tmp.replace(self.out_dir / ROWS_FILE)
        payload = {"schema_version": CACHE_SCHEMA, **self.key, "stages": stages, "rows_file": ROWS_FILE,
                   "rows_sha256": sha256_file(self.out_dir / ROWS_FILE), "linear_inputs": self.linear_inputs,
                   "tensors": self.tensors}
        write_json_atomically(self.out_dir / CACHE_FILE, payload)


# --------------------------------------------------------------------------------------------
# the stages, from the cache or measured
# --------------------------------------------------------------------------------------------
class Calibration:
    """Statistics of ``source`` (a graph.Source) stage by stage; ``stats`` gathers the small ones."""

    def __init__(self, source, windows: np.ndarray, linear_inputs: list[str], out_dir: Path,
                 key: dict[str, Any], rows: int, progress: bool = True) -> None:
        from llmtrt.pipelines.precision.layerwise import plan_stages

        self.source, self.windows, self.linear_inputs = source, windows, linear_inputs
        self.out_dir, self.key, self.rows, self.progress = out_dir, key, rows, progress
        self.proto = source.proto
        self.types = source.types
        missing = [t for t in linear_inputs if t not in self.types]
        if missing:
            raise RuntimeError(f"linear-layer inputs not among the graph's tensors: {missing[:5]}")
        self.plan = plan_stages(self.proto, self.types)
        # the tensors as exported: the rewrite replaces initializers' data while the stages still run
        self.originals = {n: v.const_value for n, v in source.graph.initializers.items()}
        self.stats = CalibrationStats(windows=int(windows.shape[0]), seq_len=int(windows.shape[1]), key=key)

    def stages(self, until: int | None = None) -> Iterator[Any]:
        """StageResult per stage, in order, up to stage ``until`` (default: all); the weights read for
        the run are handed on with it."""
        from llmtrt.pipelines.precision.layerwise import StageResult

        t0 = time.perf_counter()
        plan = self.plan if until is None else self.plan[:until + 1]
        reader = CacheReader.open(self.out_dir, self.key, len(plan))
        if reader is not None:
            self.stats.cache = "reused"
            try:
                for st in plan:
                    result = StageResult(st, reader.stage_stats(st))
                    self.stats.add(result.stats)
                    yield result
            finally:
                reader.close()
            self.stats.seconds = time.perf_counter() - t0
            return
        writer = CacheWriter(self.out_dir, self.key, self.linear_inputs)
        for result in self._run(plan):
            writer.add(result.stats)
            self.stats.add(result.stats)
            yield result
        writer.close(len(plan))
        self.stats.seconds = time.perf_counter() - t0

    def _run(self, plan):
        from llmtrt.exporter.kv_cache import get_layout
        from llmtrt.pipelines.precision.graph import read_tensor
        from llmtrt.pipelines.precision.layerwise import chunk_size, run_stages

        exported = self.source.exported
        config = exported.config
        layout = get_layout(exported.kv_cache)
        widest = max(config.hidden_size, config.intermediate_size, config.vocab_size,
                     config.num_attention_heads * self.windows.shape[1])
        per = chunk_size(self.windows.shape[0], self.windows.shape[1], widest)
        chunks = [prefill_feeds(layout, config, self.windows[i:i + per]) for i in range(0, len(self.windows), per)]
        # weights over 1 KiB are fed as inputs read from the IR, inline or external alike: a stage runs the
        # same way whichever way the export stores its weights
        external = {t.name for t in self.proto.graph.initializer if t.data_location == 1 or len(t.raw_data) > 1024}
        return run_stages(self.proto, plan, self.types, chunks, lambda n: read_tensor(self.originals[n]), external,
                          set(self.linear_inputs), self.rows, progress=self.progress)
