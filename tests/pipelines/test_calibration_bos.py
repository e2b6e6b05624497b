"""Calibration windows start with BOS when the checkpoint's tokenizer adds one (stories260k: sentencepiece
BPE with BOS), as compare's evaluation windows and prompts do; ``add_bos=False`` (``--no-bos``) leaves it
out, and the calibration cache key says which, so a cache made one way is not reused the other way."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from llmtrt.pipelines.precision.calibration import CACHE_FILE, calibration_windows
from llmtrt.pipelines.precision.quantize import PrecisionOptions, quantize

STORIES = Path(__file__).resolve().parents[3] / "shared" / "real-models" / "stories260k"
CALIB = STORIES.parent / "tinystories-calib.txt"
needs_stories = pytest.mark.skipif(not (STORIES / "config.json").exists() or not CALIB.exists(),
                                   reason=f"needs the real checkpoint {STORIES} and {CALIB} (not in the repo)")


class _Tok:
    def encode(self, text: str) -> list[int]:
        return list(text.encode())


def test_windows_start_with_bos_only_when_given(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("abcdefghij" * 10)
    with_bos = calibration_windows(text, _Tok(), 3, 8, bos_id=1)
    without = calibration_windows(text, _Tok(), 3, 8)
    assert with_bos.shape == without.shape == (3, 8)
    assert (with_bos[:, 0] == 1).all() and (with_bos[:, 1:] >= ord("a")).all()
    assert (without >= ord("a")).all()


@needs_stories
def test_stories260k_calibration_windows_start_with_bos(tmp_path):
    from llmtrt.exporter.config import resolve_model
    from llmtrt.pipelines.artifacts import export_artifact
    from llmtrt.pipelines.runtime.tokenizer import load_tokenizer

    tok = load_tokenizer(STORIES)
    assert tok.add_bos and tok.bos_id is not None, "stories260k's tokenizer adds BOS"
    src = tmp_path / "fp32"
    export_artifact(resolve_model(str(STORIES)), src)
    opts = PrecisionOptions(calib_text=str(CALIB), calib_samples=4, calib_seq_len=32, progress=False)
    quantize(src, tmp_path / "q", "int8-sq", opts)
    cache = json.loads((tmp_path / "q" / CACHE_FILE).read_text())
    assert cache["bos_id"] == tok.bos_id
    windows = calibration_windows(CALIB, tok, 4, 32, bos_id=tok.bos_id)
    assert (windows[:, 0] == tok.bos_id).all()
    assert cache["windows_sha256"] == _sha(windows)

    quantize(src, tmp_path / "q", "int8-sq", PrecisionOptions(**{**opts.__dict__, "add_bos": False}))
    cache = json.loads((tmp_path / "q" / CACHE_FILE).read_text())
    assert cache["bos_id"] is None, "--no-bos recalibrates without BOS instead of reusing the BOS cache"
    assert cache["windows_sha256"] == _sha(calibration_windows(CALIB, tok, 4, 32))


def _sha(windows: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(windows).tobytes()).hexdigest()
