"""Artifacts that run in onnxruntime-genai as they are: genai_config.json and the tokenizer files written by
export and quantize, and greedy tokens in onnxruntime-genai equal to `llmtrt generate`'s.

onnxruntime-genai runs in this interpreter when it has the package, else in the benchmarks' .venv-bench
(benchmarks/common.py bench_python) through tools/genai_generate.py; the parity tests are skipped, saying
so, when neither has it.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from llmtrt.exporter.config import resolve_model
from llmtrt.exporter.kv_cache import get_layout
from llmtrt.pipelines.artifacts import export_artifact, load_graph, read_manifest
from llmtrt.pipelines.cli import main
from llmtrt.pipelines.runtime.genai_config import genai_config
from llmtrt.pipelines.runtime.tokenizer import load_tokenizer
from llmtrt.pipelines.runtime.tokenizer_files import SpecialTokens
from tests.conftest import HAS_TRANSFORMERS, make_llama3_style_checkpoint, stories_or_skip

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tools" / "genai_generate.py"
PROMPT = "The for statement is"
NEW = 24


@cache
def genai_python() -> str | None:
    """An interpreter that imports onnxruntime_genai: this one, else .venv-bench's; None when neither."""
    if importlib.util.find_spec("onnxruntime_genai") is not None:
        return sys.executable
    bench = REPO / ".venv-bench" / "bin" / "python"
    if bench.is_file() and subprocess.run([str(bench), "-c", "import onnxruntime_genai"], capture_output=True,
                                          check=False).returncode == 0:
        return str(bench)
    return None


def genai_or_skip() -> str:
    python = genai_python()
    if python is None:
        pytest.skip("onnxruntime-genai is not installed here nor in .venv-bench "
                    "(python -m venv .venv-bench && .venv-bench/bin/pip install onnxruntime-genai)")
    return python


def run_genai(artifact: Path, prompt: str, new: int = NEW) -> dict:
    proc = subprocess.run([genai_or_skip(), str(SCRIPT), str(artifact), "--prompt", prompt, "--new", str(new),
                           "--add-special-tokens"], capture_output=True, text=True, check=False, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_llmtrt(artifact: Path, prompt: str, new: int = NEW) -> dict:
    res = CliRunner().invoke(main, ["generate", str(artifact), "--prompt", prompt, "--max-new-tokens", str(new),
                                    "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    """A random Llama with a Llama-3-like tokenizer: its fp32 export and an int4-awq artifact from `llmtrt quantize`."""
    if not HAS_TRANSFORMERS:
        pytest.skip("transformers is not installed (pip install 'llmtrt[dev]')")
    pytest.importorskip("tokenizers")
    root = tmp_path_factory.mktemp("genai")
    checkpoint = make_llama3_style_checkpoint(root / "ckpt")
    export_artifact(resolve_model(str(checkpoint)), root / "fp32")
    res = CliRunner().invoke(main, ["quantize", str(root / "fp32"), "--to", "int4-awq", "--block-size", "32",
                                    "--calib-samples", "4", "--calib-seq-len", "64", "--out", str(root / "int4-awq")])
    assert res.exit_code == 0, res.output
    return {"checkpoint": checkpoint, "fp32": root / "fp32", "int4-awq": root / "int4-awq"}


# --------------------------------------------------------------------------------------------
# what is written
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["fp32", "int4-awq"])
def test_artifacts_carry_genai_config_and_tokenizer_files(llama3, kind):
    art = llama3[kind]
    manifest = read_manifest(art)
    assert manifest["genai_config"] == "genai_config.json"
    assert manifest["tokenizer_files"] == ["generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    for name in manifest["tokenizer_files"]:
        assert (art / name).read_bytes() == (llama3["checkpoint"] / name).read_bytes()
    cfg = json.loads((art / "genai_config.json").read_text())
    model, decoder = cfg["model"], cfg["model"]["decoder"]
    graph = load_graph(art / decoder["filename"]).graph
    inputs, outputs = {i.name for i in graph.input}, {o.name for o in graph.output}
    layers = decoder["num_hidden_layers"]
    for key, name in decoder["inputs"].items():
        names = {name % i for i in range(layers)} if "%d" in name else {name}
        assert names <= inputs, key
    for key, name in decoder["outputs"].items():
        names = {name % i for i in range(layers)} if "%d" in name else {name}
        assert names <= outputs, key
    assert set(decoder["inputs"]) >= {"input_ids", "attention_mask", "position_ids", "past_key_names"}
    c = manifest["config"]
    assert (decoder["num_attention_heads"], decoder["num_key_value_heads"], layers, decoder["head_size"],
            decoder["hidden_size"]) == (c["num_attention_heads"], c["num_key_value_heads"], c["num_hidden_layers"],
                                        c["head_dim"], c["hidden_size"])
    tok = load_tokenizer(art)
    assert (model["bos_token_id"], model["eos_token_id"], model["pad_token_id"]) == (tok.bos_id, list(tok.eos_ids),
                                                                                     tok.eos_ids[0])
    assert model["vocab_size"] == c["vocab_size"] and model["context_length"] == c["max_position_embeddings"]
    assert cfg["search"]["past_present_share_buffer"] is False  # the dynamic cache concatenates
    assert cfg["search"]["max_length"] == model["context_length"]


def _exported(layout: str, drop: str = ""):
    config = resolve_model("tiny").config
    io = get_layout(layout).io_spec(config)
    io = SimpleNamespace(inputs=[t for t in io.inputs if t.name != drop], outputs=io.outputs)
    return SimpleNamespace(kv_cache=layout, io=io, config=config, onnx_path=Path("model.onnx"))


def test_no_genai_config_where_genai_cannot_feed_the_graph():
    special = SpecialTokens(bos_id=1, eos_ids=(2,))
    config, why = genai_config(_exported("dynamic"), special, 64)
    assert why == "" and config["model"]["eos_token_id"] == 2 and config["model"]["pad_token_id"] == 2
    config, why = genai_config(_exported("static"), special, 64)
    assert config is None and "write_indices" in why and "--kv-cache dynamic" in why
    config, why = genai_config(_exported("dynamic", drop="position_ids"), special, 64)
    assert config is None and "position_ids" in why
    config, _ = genai_config(_exported("dynamic"), SpecialTokens(), 64)  # bytes-llama: no BOS, no EOS
    assert (config["model"]["bos_token_id"], config["model"]["eos_token_id"], config["model"]["pad_token_id"]) == (1, -1, 0)


# --------------------------------------------------------------------------------------------
# onnxruntime-genai runs them as they are
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["fp32", "int4-awq"])
def test_genai_greedy_equals_llmtrt_generate(llama3, kind):
    genai_or_skip()
    ours = run_llmtrt(llama3[kind], PROMPT)
    theirs = run_genai(llama3[kind], PROMPT)
    assert theirs["prompt_ids"] == ours["prompt_ids"]  # genai's tokenizer from the copied files, BOS included
    assert len(ours["tokens"]) == NEW
    assert theirs["tokens"] == ours["tokens"]


def test_genai_runs_stories260k_like_llmtrt(tmp_path):
    genai_or_skip()
    checkpoint = stories_or_skip()
    art = tmp_path / "fp32"
    export_artifact(resolve_model(str(checkpoint)), art)
    prompt = "Once upon a time, there was"
    ours, theirs = run_llmtrt(art, prompt, 48), run_genai(art, prompt, 48)
    assert theirs["prompt_ids"] == ours["prompt_ids"] and theirs["prompt_ids"][0] == 1
    assert theirs["tokens"] == ours["tokens"]
    assert theirs["text"] == ours["text"]
