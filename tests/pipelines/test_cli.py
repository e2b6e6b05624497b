"""The CLI: every command's --help, the export command end to end, user errors exit 2 with one line."""

import json

import pytest
from click.testing import CliRunner

from llmtrt.pipelines.cli import main


def commands():
    return sorted(main.commands)


def subcommands():
    """(group, command) for every command of every group (e.g. pipeline run)."""
    return [(name, sub) for name, cmd in sorted(main.commands.items()) for sub in sorted(getattr(cmd, "commands", {}))]


def test_top_level_help():
    res = CliRunner().invoke(main, ["--help"])
    assert res.exit_code == 0
    for name in commands():
        assert name in res.output


def leaf_commands():
    """Every command a user runs: top-level commands without subcommands, and each group's subcommands."""
    leaves = [(name,) for name in commands() if not getattr(main.commands[name], "commands", None)]
    return leaves + subcommands()


@pytest.mark.parametrize("name", commands())
def test_every_command_has_help(name):
    res = CliRunner().invoke(main, [name, "--help"])
    assert res.exit_code == 0, res.output
    assert "Usage:" in res.output and len(res.output.splitlines()) > 5


@pytest.mark.parametrize("path", leaf_commands(), ids=" ".join)
def test_every_command_teaches_with_examples_and_has_json(path):
    res = CliRunner().invoke(main, [*path, "--help"])
    assert res.exit_code == 0, res.output
    assert "Examples:" in res.output, f"llmtrt {' '.join(path)} --help has no examples"
    assert "--json" in res.output, f"llmtrt {' '.join(path)} has no --json"


def test_export_json(tmp_path):
    res = CliRunner().invoke(main, ["export", "--model", "tiny", "--out", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["ops"] == "standard" and summary["opset"] == 23
    assert (tmp_path / "model.onnx").is_file() and (tmp_path / "manifest.json").is_file()
    assert summary["peak_rss_bytes"] > 0


def test_export_logits_and_fusion_options(tmp_path):
    res = CliRunner().invoke(main, ["export", "--model", "tiny", "--out", str(tmp_path / "a"), "--json",
                                    "--logits", "last", "--no-fuse"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["logits"] == "last" and json.loads(res.stdout)["fused"] == 0
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["logits"] == "last" and manifest["fused"] == {}
    assert manifest["io"]["outputs"][0] == {"name": "logits", "dtype": "float32", "dims": ["batch", 1, 256]}
    res = CliRunner().invoke(main, ["export", "--model", "tiny", "--out", str(tmp_path / "b"), "--json"])
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["logits"] == "all" and len(manifest["fused"]) == 2 * 2  # 2 layers x (qkv, gate_up)
    res = CliRunner().invoke(main, ["export", "--model", "tiny", "--out", str(tmp_path / "c"), "--logits", "first"])
    assert res.exit_code == 2 and "--logits" in res.stderr


@pytest.mark.parametrize("args, message", [
    (["--model", "no-such-preset"], "no such directory or preset"),
    (["--model", "tiny", "--ops", "standard", "--opset", "18"], "needs opset >= 23"),
    (["--model", "tiny", "--max-positions", "0"], "--max-positions must be a positive integer"),
])
def test_export_user_errors(tmp_path, args, message):
    res = CliRunner().invoke(main, ["export", "--out", str(tmp_path / "o"), *args])
    assert res.exit_code == 2
    assert message in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o" / "model.onnx").exists()


def test_wrong_architecture(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    res = CliRunner().invoke(main, ["export", "--model", str(ckpt), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "GPT2LMHeadModel is not supported" in res.stderr
