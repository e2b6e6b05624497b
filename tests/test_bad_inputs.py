"""Bad input to every command: exit 2, one line naming the file or option (and the fix), and --out left
as it was (absent, or the previous complete artifact) — including a kill -9 in the middle of a write."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from click.testing import CliRunner

from llmtrt.exporter.config import resolve_model
from llmtrt.exporter.onnx_export import ExportOptions
from llmtrt.pipelines.artifacts import export_artifact
from llmtrt.pipelines.cli import main

HAS_RTX = __import__("importlib").util.find_spec("tensorrt_rtx_bindings") is not None


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A correct tiny export (and, when the test needs one, a correct previous --out to keep)."""
    root = tmp_path_factory.mktemp("good")
    export_artifact(resolve_model("tiny"), root / "onnx", ExportOptions(max_positions=64))
    return root / "onnx"


def _snapshot(directory: Path) -> dict[str, str] | None:
    if not directory.exists():
        return None
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@dataclass
class Case:
    name: str
    args: list[str]                                   # {good}, {out}, {tmp} are filled in
    message: str                                      # must appear in the one error line
    setup: Callable[[Path, Path], None] | None = None  # (tmp, good) -> prepare files
    previous_out: bool = False                        # --out holds a complete artifact that must survive
    exit_code: int = 2
    tags: list[str] = field(default_factory=list)


def _copy_good(tmp: Path, good: Path, name: str = "art") -> Path:
    dst = tmp / name
    shutil.copytree(good, dst)
    return dst


def _truncate(tmp, good):
    art = _copy_good(tmp, good)
    data = (art / "model.onnx").read_bytes()
    (art / "model.onnx").write_bytes(data[: len(data) // 3])


def _corrupt_manifest(tmp, good):
    art = _copy_good(tmp, good)
    (art / "manifest.json").write_text('{"schema_version": 3, "kind": ')


def _manifest_without_config(tmp, good):
    art = _copy_good(tmp, good)
    m = json.loads((art / "manifest.json").read_text())
    del m["config"]
    (art / "manifest.json").write_text(json.dumps(m))


def _manifest_bad_kv(tmp, good):
    art = _copy_good(tmp, good)
    m = json.loads((art / "manifest.json").read_text())
    m["kv_cache"] = "paged"
    (art / "manifest.json").write_text(json.dumps(m))


def _manifest_config_disagrees(tmp, good):
    art = _copy_good(tmp, good)
    m = json.loads((art / "manifest.json").read_text())
    m["config"]["num_key_value_heads"] = 3  # 4 heads / 3 KV heads is no GQA model
    (art / "manifest.json").write_text(json.dumps(m))


def _file_at_out(tmp, good):
    (tmp / "out").write_text("a file where the output directory should go")


def _foreign_out(tmp, good):
    (tmp / "out").mkdir()
    (tmp / "out" / "thesis.tex").write_text("precious")


def _huge_preset(tmp, good):
    text = resolve_model("tiny").config
    (tmp / "huge.yaml").write_text(f"vocab_size: {text.vocab_size}\nhidden_size: {text.hidden_size}\n"
                                   f"intermediate_size: {text.intermediate_size}\nnum_hidden_layers: 1000000000\n"
                                   f"num_attention_heads: 4\nnum_key_value_heads: 2\n")


def _bad_hf_config(tmp, good):
    (tmp / "ckpt").mkdir()
    (tmp / "ckpt" / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], ')


def _hf_without_weights(tmp, good):
    (tmp / "ckpt").mkdir()
    (tmp / "ckpt" / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2}))


def _truncated_safetensors(tmp, good):
    _hf_without_weights(tmp, good)
    (tmp / "ckpt" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")


def _bad_tolerances(tmp, good):
    _copy_good(tmp, good)
    (tmp / "tol.yaml").write_text("precisions:\n  fp32:\n    logits: {atol: lots, rtol: 1.0e-3}\n")


def _bad_pipeline(tmp, good):
    (tmp / "p.yaml").write_text("model: tiny\nprecisions: [fp32]\nvalidaton:\n  batch: 2\n")


def _bad_profiles(tmp, good):
    _copy_good(tmp, good)
    (tmp / "profiles.yaml").write_text("prefill: {batch: 1, seq: [1, 8, 4], past: 0}\n")


def _int8_only(tmp, good):
    art = _copy_good(tmp, good)
    m = json.loads((art / "manifest.json").read_text())
    m["precision"] = "int8-wo"
    (art / "manifest.json").write_text(json.dumps(m))


def _previous(tmp, good):
    _copy_good(tmp, good, "out")


CASES = [
    # export
    Case("export unknown model", ["export", "--model", "no-such-model", "--out", "{out}"], "--model no-such-model"),
    Case("export bad opset", ["export", "--model", "tiny", "--ops", "standard", "--opset", "18", "--out", "{out}"],
         "--opset 18", previous_out=True, setup=_previous),
    Case("export max positions 0", ["export", "--model", "tiny", "--max-positions", "0", "--out", "{out}"], "--max-positions"),
    Case("export out is a file", ["export", "--model", "tiny", "--out", "{out}"], "is a file", setup=_file_at_out),
    Case("export missing --out", ["export", "--model", "tiny"], "Missing option '--out'"),
    Case("export unknown --ops", ["export", "--model", "tiny", "--ops", "fancy", "--out", "{out}"], "--ops"),
    Case("export out holds user files", ["export", "--model", "tiny", "--out", "{out}"], "did not write",
         setup=_foreign_out),
    Case("export absurd preset", ["export", "--model", "{tmp}/huge.yaml", "--out", "{out}"],
         "huge.yaml:4: num_hidden_layers 1000000000 is beyond", setup=_huge_preset),
    Case("export broken config.json", ["export", "--model", "{tmp}/ckpt", "--out", "{out}"], "config.json: not valid JSON",
         setup=_bad_hf_config),
    Case("export no weights", ["export", "--model", "{tmp}/ckpt", "--out", "{out}"], "no model.safetensors",
         setup=_hf_without_weights),
    Case("export truncated safetensors", ["export", "--model", "{tmp}/ckpt", "--out", "{out}"], "model.safetensors",
         setup=_truncated_safetensors),
    # validate
    Case("validate missing directory", ["validate", "{tmp}/nowhere"], "manifest.json"),
    Case("validate truncated model.onnx", ["validate", "{tmp}/art"], "model.onnx: not a readable ONNX model",
         setup=_truncate),
    Case("validate corrupt manifest", ["validate", "{tmp}/art"], "manifest.json: corrupt manifest",
         setup=_corrupt_manifest),
    Case("validate manifest without config", ["validate", "{tmp}/art"], "field 'config' is missing",
         setup=_manifest_without_config),
    Case("validate manifest unknown layout", ["validate", "{tmp}/art"], "kv_cache 'paged'", setup=_manifest_bad_kv),
    Case("validate manifest config nonsense", ["validate", "{tmp}/art"], "manifest.json",
         setup=_manifest_config_disagrees),
    Case("validate bad --atol", ["validate", "{good}", "--atol", "logits:lots"], "--atol"),
    Case("validate bad tolerances file", ["validate", "{tmp}/art", "--tolerances", "{tmp}/tol.yaml"],
         "tol.yaml:3: precisions.fp32.logits.atol", setup=_bad_tolerances),
    Case("validate out is a file", ["validate", "{good}", "--out", "{out}"], "is a file", setup=_file_at_out),
    # generate
    Case("generate truncated model.onnx", ["generate", "{tmp}/art", "--prompt", "hi"], "not a readable ONNX model",
         setup=_truncate),
    Case("generate corrupt manifest", ["generate", "{tmp}/art", "--prompt", "hi"], "corrupt manifest",
         setup=_corrupt_manifest),
    Case("generate no artifact", ["generate", "{tmp}/nowhere", "--prompt", "hi"], "nowhere"),
    Case("generate temperature 0", ["generate", "{good}", "--prompt", "hi", "--temperature", "0"], "--temperature"),
    # quantize
    Case("quantize truncated model.onnx", ["quantize", "{tmp}/art", "--to", "int8-wo", "--out", "{out}"],
         "not a readable ONNX model", setup=_truncate),
    Case("quantize corrupt manifest", ["quantize", "{tmp}/art", "--to", "int8-wo", "--out", "{out}"],
         "corrupt manifest", setup=_corrupt_manifest),
    Case("quantize missing calibration text", ["quantize", "{good}", "--to", "int8-sq", "--out", "{out}",
                                                "--calib-text", "{tmp}/none.txt"], "none.txt", previous_out=True,
         setup=_previous),
    Case("quantize into its source", ["quantize", "{good}", "--to", "int8-wo", "--out", "{good}"], "--out"),
    Case("quantize out holds user files", ["quantize", "{good}", "--to", "int8-wo", "--out", "{out}"],
         "did not write", setup=_foreign_out),
    # build
    Case("build target cc 9.9", ["build", "{good}", "--out", "{out}", "--backend", "tensorrt-rtx", "--target-cc",
                                 "9.9"], "--target-cc", previous_out=True, setup=_previous, tags=["rtx"]),
    Case("build target cc abc", ["build", "{good}", "--out", "{out}", "--backend", "tensorrt-rtx", "--target-cc",
                                 "abc"], "--target-cc 'abc'", tags=["rtx"]),
    Case("build impossible max kv", ["build", "{good}", "--out", "{out}", "--backend", "tensorrt-rtx", "--max-kv",
                                     "100000"], "max", tags=["rtx"]),
    Case("build truncated model.onnx", ["build", "{tmp}/art", "--out", "{out}", "--backend", "tensorrt-rtx"],
         "model.onnx", setup=_truncate, tags=["rtx"]),
    Case("build bad profiles", ["build", "{tmp}/art", "--out", "{out}", "--backend", "tensorrt-rtx", "--profiles",
                                "{tmp}/profiles.yaml"], "profiles.yaml", setup=_bad_profiles, tags=["rtx"]),
    # compare / pipeline
    Case("compare without fp32", ["compare", "{tmp}/art", "--out", "{out}"], "fp32", setup=_int8_only),
    Case("compare both sources", ["compare", "--model", "tiny", "{good}", "--out", "{out}"],
         "--model"),
    Case("pipeline missing config", ["pipeline", "run", "{tmp}/none.yaml", "--out", "{out}"], "none.yaml"),
    Case("pipeline misspelled key", ["pipeline", "run", "{tmp}/p.yaml", "--out", "{out}"],
         "p.yaml:3: validaton: unknown key", setup=_bad_pipeline),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_exits_2_with_one_line_and_leaves_out_alone(case, good, tmp_path):
    if "rtx" in case.tags and not HAS_RTX:
        pytest.skip("TensorRT-RTX is not installed (pip install 'llmtrt[rtx]')")
    if case.setup is not None:
        case.setup(tmp_path, good)
    out = tmp_path / "out"
    before, good_before = _snapshot(out), _snapshot(good)
    args = [a.format(good=good, out=out, tmp=tmp_path) for a in case.args]
    t0 = time.perf_counter()
    result = CliRunner().invoke(main, args)
    seconds = time.perf_counter() - t0
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == case.exit_code, (result.exit_code, result.stderr[-2000:], result.exception)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert case.message in lines[0], lines[0]
    assert _snapshot(out) == before  # absent stays absent; a previous artifact is untouched
    assert _snapshot(good) == good_before
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    assert seconds < 20, f"bad input should fail fast, took {seconds:.1f} s"


# --------------------------------------------------------------------------------------------
# kill -9 while a stage writes
# --------------------------------------------------------------------------------------------
def _kill_after(args: list[str], seconds: float) -> int:
    proc = subprocess.Popen([sys.executable, "-m", "llmtrt", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    return proc.returncode


def _complete_or_absent(out: Path, previous: dict[str, str] | None) -> None:
    from llmtrt.pipelines.artifacts import onnx_sha256

    now = _snapshot(out)
    if now is None or now == previous:
        return
    manifest = json.loads((out / "manifest.json").read_text())  # a new artifact: whole and self-consistent
    assert onnx_sha256(out / manifest["onnx"]) == manifest["onnx_sha256"]


@pytest.mark.slow
@pytest.mark.parametrize("seconds", [1.5, 4.0, 7.0])
def test_kill_9_during_export_leaves_out_whole(tmp_path, good, seconds):
    out = tmp_path / "out"
    shutil.copytree(good, out)
    previous = _snapshot(out)
    _kill_after(["export", "--model", "bytes-llama", "--ops", "standard", "--out", str(out)], seconds)
    _complete_or_absent(out, previous)


@pytest.mark.slow
@pytest.mark.parametrize("seconds", [2.0, 4.5])
def test_kill_9_during_quantize_leaves_out_whole(tmp_path, good, seconds):
    out = tmp_path / "out"
    _kill_after(["quantize", str(good), "--to", "int4-awq", "--out", str(out)], seconds)
    _complete_or_absent(out, None)
    if out.exists():  # the killed run may have finished; a second run must still produce a whole artifact
        previous = _snapshot(out)
        _kill_after(["quantize", str(good), "--to", "int8-sq", "--out", str(out)], seconds)
        _complete_or_absent(out, previous)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_RTX, reason="TensorRT-RTX is not installed (pip install 'llmtrt[rtx]')")
@pytest.mark.parametrize("seconds", [2.0, 5.0])
def test_kill_9_during_build_leaves_out_whole(tmp_path, good, seconds):
    out = tmp_path / "out"
    _kill_after(["build", str(good), "--out", str(out), "--backend", "tensorrt-rtx"], seconds)
    now = _snapshot(out)
    if now is not None:  # a finished build: plan and manifest agree
        manifest = json.loads(next(out.glob("engine.*.json")).read_text())
        plan = out / manifest["plan"]
        assert hashlib.sha256(plan.read_bytes()).hexdigest() == manifest["plan_sha256"]
