"""The artifact writer: a directory appears whole or not at all, and nothing of the user's is replaced."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from llmtrt.exporter.errors import LlmtrtUserError
from llmtrt.exporter.files import artifact_dir, atomic_file, check_out_dir, write_json_atomically


def _write(out, files):
    with artifact_dir(out) as tmp:
        for name, text in files.items():
            (tmp / name).write_text(text)


def test_new_directory_appears_whole(tmp_path):
    out = tmp_path / "a" / "b"
    _write(out, {"manifest.json": "{}", "model.onnx": "x"})
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx"]
    assert [p.name for p in out.parent.iterdir()] == ["b"]
    assert oct(os.stat(out / "model.onnx").st_mode & 0o777) == "0o644"


def test_replacement_swaps_everything_and_failure_keeps_the_old(tmp_path):
    out = tmp_path / "out"
    _write(out, {"manifest.json": "old", "model.onnx.data": "old data"})
    _write(out, {"manifest.json": "new", "model.onnx": "new"})
    assert {p.name: p.read_text() for p in out.iterdir()} == {"manifest.json": "new", "model.onnx": "new"}
    with pytest.raises(RuntimeError), artifact_dir(out) as tmp:
        (tmp / "manifest.json").write_text("half")
        raise RuntimeError("killed")
    assert {p.name: p.read_text() for p in out.iterdir()} == {"manifest.json": "new", "model.onnx": "new"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_carry_keeps_named_files(tmp_path):
    out = tmp_path / "out"
    _write(out, {"manifest.json": "1", "calibration_cache.json": "cache"})
    with artifact_dir(out, carry=("calibration_cache.json", "missing.json")) as tmp:
        assert (tmp / "calibration_cache.json").read_text() == "cache"
        (tmp / "manifest.json").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["calibration_cache.json", "manifest.json"]


def test_refuses_foreign_directory_and_files(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("precious")
    with pytest.raises(LlmtrtUserError, match="did not write"):
        check_out_dir(home)
    with pytest.raises(LlmtrtUserError, match="is a file"):
        check_out_dir(home / "thesis.tex")
    assert (home / "thesis.tex").read_text() == "precious"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert check_out_dir(empty) == empty


def test_partial_of_a_killed_process_is_cleaned_up(tmp_path):
    out = tmp_path / "out"
    code = ("import os, sys; from llmtrt.exporter.files import artifact_dir\n"
            f"with artifact_dir({str(out)!r}) as tmp:\n"
            "    (tmp / 'manifest.json').write_text('x'); os._exit(9)\n")
    subprocess.run([sys.executable, "-c", code], check=False)
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(".out.partial-") and not out.exists()
    _write(out, {"manifest.json": "done"})
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_file_replaces_or_keeps(tmp_path):
    path = tmp_path / "r.json"
    write_json_atomically(path, {"a": 1})
    with pytest.raises(ValueError), atomic_file(path) as tmp:
        tmp.write_text("partial")
        raise ValueError
    assert path.read_text().strip().startswith("{") and [p.name for p in tmp_path.iterdir()] == ["r.json"]
