"""Manifests: the model source is recorded absolutely with a fingerprint of its config and weights, and
re-opening it fails clearly once it moved or changed."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from llmtrt.exporter.config import resolve_model
from llmtrt.exporter.errors import LlmtrtUserError
from llmtrt.pipelines.artifacts import export_artifact, open_model_source, read_manifest, source_fingerprint


def test_relative_checkpoint_is_recorded_absolute(hf_checkpoint, tmp_path, monkeypatch):
    ckpt = hf_checkpoint("ckpt")
    monkeypatch.chdir(ckpt.parent)
    export_artifact(resolve_model("./ckpt"), tmp_path / "out")
    manifest = read_manifest(tmp_path / "out")
    assert manifest["model_source"] == str(ckpt.resolve())
    assert manifest["model_source_sha256"] == source_fingerprint(resolve_model(str(ckpt)))
    monkeypatch.chdir("/")  # another working directory: the source still opens
    assert open_model_source(manifest, "m").checkpoint_dir == ckpt.resolve()


def test_built_in_models_are_recorded_by_name(tmp_path):
    export_artifact(resolve_model("tiny"), tmp_path / "out")
    manifest = read_manifest(tmp_path / "out")
    assert manifest["model_source"] == "tiny" and manifest["seed"] == 0


def test_moved_or_changed_checkpoint_is_a_clear_error(hf_checkpoint, tmp_path):
    ckpt = hf_checkpoint("ckpt")
    export_artifact(resolve_model(str(ckpt)), tmp_path / "out")
    manifest = read_manifest(tmp_path / "out")
    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of the last weight
    weights.write_bytes(bytes(data))
    with pytest.raises(LlmtrtUserError, match="changed since the export"):
        open_model_source(manifest, "manifest.json")
    shutil.move(ckpt, tmp_path / "elsewhere")
    with pytest.raises(LlmtrtUserError, match="cannot be opened any more"):
        open_model_source(manifest, "manifest.json")


def test_tokenizer_edits_do_not_count_as_a_changed_model(hf_checkpoint, tmp_path):
    ckpt = hf_checkpoint("ckpt")
    before = source_fingerprint(resolve_model(str(ckpt)))
    (ckpt / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True}))
    os.utime(ckpt / "config.json")
    assert source_fingerprint(resolve_model(str(ckpt))) == before
