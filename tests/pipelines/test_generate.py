"""llmtrt generate: ONNX Runtime greedy output equals the PyTorch model's, sampling, stops, streaming, CLI."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from llmtrt.exporter.config import resolve_model
from llmtrt.exporter.errors import LlmtrtUserError
from llmtrt.exporter.onnx_export import ExportOptions
from llmtrt.pipelines.artifacts import export_artifact
from llmtrt.pipelines.cli import main
from llmtrt.pipelines.runtime.artifact_runners import open_runner
from llmtrt.pipelines.runtime.generate import Sampling, generate, generate_ids
from llmtrt.pipelines.runtime.runners import PyTorchRunner
from llmtrt.pipelines.runtime.tokenizer import ByteTokenizer, load_tokenizer

REPO = Path(__file__).resolve().parents[2]
EVAL = (REPO / "configs/text/eval.txt").read_bytes()
PROMPT = list(EVAL[:40])       # "Coroutines\n**********\n\nNew in version 3."
NEW = 24
STATIC_MAX_SEQ = 96
HAS_RTX = importlib.util.find_spec("tensorrt_rtx_bindings") is not None or importlib.util.find_spec("tensorrt") is not None


def _torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """bytes-llama exported twice: custom ops + dynamic cache, standard ops + static cache (96 positions)."""
    root = tmp_path_factory.mktemp("generate")
    source = resolve_model("bytes-llama")
    dirs = {}
    for name, options in {"custom": ExportOptions(dialect="custom"),
                          "static": ExportOptions(dialect="standard", kv_cache="static",
                                                  max_positions=STATIC_MAX_SEQ)}.items():
        export_artifact(source, root / name, options)
        dirs[name] = root / name
    return dirs


@pytest.fixture(scope="module")
def torch_runner():
    with PyTorchRunner(resolve_model("bytes-llama")) as runner:
        yield runner


@pytest.fixture(scope="module")
def reference(torch_runner):
    """The fp32 PyTorch model's greedy continuation of PROMPT."""
    return generate_ids(torch_runner, [PROMPT], max_new_tokens=NEW).tokens[0]


def test_cached_decoding_equals_full_recompute(torch_runner, reference):
    """The loop's KV-cache bookkeeping (mask, positions, present -> past) against no cache at all."""
    import torch

    ids = list(PROMPT)
    for _ in range(NEW):
        x = torch.tensor([ids])
        empty = [torch.zeros(1, torch_runner.config.num_key_value_heads, 0, torch_runner.config.head_dim)
                 for _ in range(2 * torch_runner.config.num_hidden_layers)]
        with torch.no_grad():
            logits, _ = torch_runner.model(x, torch.arange(len(ids))[None], torch.ones_like(x), empty)
        ids.append(int(logits[0, -1].argmax()))
    assert ids[len(PROMPT):] == reference


def test_pytorch_greedy_matches_the_documented_continuation(torch_runner):
    readme = (REPO / "configs/models/bytes-llama/README.md").read_text().split("\n")
    start = readme.index(next(line for line in readme if line.startswith("Greedy continuation (80 bytes)")))
    documented = readme[start + 3]  # the line inside the ``` block (trailing space kept)
    result = generate(torch_runner, ByteTokenizer(), "The for statement", max_new_tokens=80)
    assert "The for statement" + result.texts[0] == documented


@pytest.mark.parametrize("kind", ["custom", "static"])
def test_greedy_onnx_equals_pytorch_token_for_token(artifacts, reference, kind):
    with open_runner(artifacts[kind], provider="cpu") as runner:
        result = generate_ids(runner, [PROMPT], max_new_tokens=NEW)
    assert len(reference) == NEW
    assert result.tokens[0] == reference
    assert result.stop_reasons == ["max_new_tokens"]
    assert result.stats.new_tokens == NEW and result.stats.decode_steps == NEW - 1
    assert result.stats.prefill_tokens_per_s > 0 and result.stats.decode_tokens_per_s > 0


def test_left_padded_batch_equals_single_prompts(artifacts):
    prompts = [PROMPT, list(EVAL[200:217])]
    with open_runner(artifacts["custom"], provider="cpu") as runner:
        batched = generate_ids(runner, prompts, max_new_tokens=12)
        singles = [generate_ids(runner, [p], max_new_tokens=12).tokens[0] for p in prompts]
    assert batched.tokens == singles
    assert batched.stats.prompt_tokens == sum(map(len, prompts))


def test_sampling_is_seeded_and_matches_across_backends(artifacts, torch_runner):
    def sample(runner, seed):
        return generate_ids(runner, [PROMPT], max_new_tokens=NEW,
                            sampling=Sampling(greedy=False, temperature=1.0, top_p=0.95, seed=seed)).tokens[0]

    with open_runner(artifacts["custom"], provider="cpu") as runner:
        first, again, other = sample(runner, 1), sample(runner, 1), sample(runner, 2)
    assert first == again
    assert first != other
    assert sample(torch_runner, 1) == first  # same logits (to fp32 noise) + same seed -> same sample


def test_tiny_top_p_equals_greedy(artifacts, reference):
    with open_runner(artifacts["custom"], provider="cpu") as runner:
        result = generate_ids(runner, [PROMPT], max_new_tokens=NEW,
                              sampling=Sampling(greedy=False, temperature=0.7, top_p=1e-6, seed=5))
    assert result.tokens[0] == reference


def test_top_p_keeps_the_smallest_nucleus():
    logits = np.log(np.array([[0.1, 0.6, 0.3]]))
    draws = Sampling(greedy=False, top_p=0.5, seed=0).chooser()
    assert {int(draws(logits)[0]) for _ in range(50)} == {1}
    draws = Sampling(greedy=False, top_p=0.8, seed=0).chooser()
    assert {int(draws(logits)[0]) for _ in range(200)} == {1, 2}
    draws = Sampling(greedy=False, top_p=1.0, seed=0).chooser()
    assert {int(draws(logits)[0]) for _ in range(400)} == {0, 1, 2}
    with pytest.raises(LlmtrtUserError, match="--top-p"):
        Sampling(greedy=False, top_p=0.0)
    with pytest.raises(LlmtrtUserError, match="--temperature"):
        Sampling(greedy=False, temperature=0.0)


def test_eos_stops_generation(artifacts, reference):
    eos = reference[5]
    first = reference.index(eos)
    with open_runner(artifacts["custom"], provider="cpu") as runner:
        result = generate_ids(runner, [PROMPT], max_new_tokens=NEW, eos_ids=[eos])
    assert result.tokens[0] == reference[:first]
    assert result.stop_reasons == ["eos"]


def test_eos_from_generation_config_stops_the_cli(tmp_path, reference):
    ckpt = tmp_path / "bytes-eos"
    shutil.copytree(REPO / "configs/models/bytes-llama", ckpt)
    eos = reference[5]
    (ckpt / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos, 255]}))
    assert load_tokenizer(ckpt).eos_ids == (eos, 255)
    assert load_tokenizer("bytes-llama").eos_ids == ()  # the built-in model has no EOS
    res = CliRunner().invoke(main, ["generate", "--model", str(ckpt), "--prompt", bytes(PROMPT).decode(),
                                    "--max-new-tokens", str(NEW), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["stop_reason"] == "eos"
    assert out["tokens"] == reference[:reference.index(eos)]


def test_stops_when_the_graph_positions_run_out(artifacts, reference, torch_runner):
    prompt = list(EVAL[:STATIC_MAX_SEQ - 6])
    with open_runner(artifacts["static"], provider="cpu") as runner:
        assert runner.max_positions == STATIC_MAX_SEQ
        result = generate_ids(runner, [prompt], max_new_tokens=NEW)
        with pytest.raises(LlmtrtUserError, match="holds 96 positions"):
            generate_ids(runner, [list(EVAL[:STATIC_MAX_SEQ + 1])], max_new_tokens=4)
    assert result.stop_reasons == ["max_positions"]
    assert len(result.tokens[0]) == 7  # 90 prompt + 6 fed tokens fill 96 positions; the 7th is never fed
    assert result.tokens[0] == generate_ids(torch_runner, [prompt], max_new_tokens=7).tokens[0]
    res = CliRunner().invoke(main, ["generate", str(artifacts["static"]), "--prompt", "x" * 100])
    assert res.exit_code == 2 and "--max-positions" in res.stderr


def test_bad_artifacts_exit_2(tmp_path, artifacts):
    runner = CliRunner()
    empty = tmp_path / "empty"
    empty.mkdir()
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "manifest.json").write_text("{not json")
    cases = [([str(empty)], "neither manifest.json nor engine"),
             ([str(tmp_path / "missing")], "no such artifact directory"),
             ([str(corrupt)], "corrupt manifest"),
             ([], "either an ARTIFACT"),
             ([str(artifacts["custom"]), "--model", "bytes-llama"], "either an ARTIFACT"),
             ([str(artifacts["custom"]), "--temperature", "0"], "--temperature"),
             ([str(artifacts["custom"]), "--greedy", "--top-p", "0.5"], "--greedy conflicts"),
             ([str(artifacts["custom"]), "--max-new-tokens", "0"], "--max-new-tokens"),
             ([str(artifacts["custom"]), "--provider", "cuda"], "CUDAExecutionProvider")]
    for args, message in cases:
        res = runner.invoke(main, ["generate", *args, "--prompt", "The for statement"])
        assert res.exit_code == 2, (args, res.output)
        assert message in res.stderr, (args, res.stderr)


def test_stream_prints_the_same_text(artifacts):
    args = ["generate", str(artifacts["custom"]), "--prompt", "The for statement", "--max-new-tokens", "40",
            "--temperature", "1.2", "--seed", "3"]
    plain = CliRunner().invoke(main, args)
    streamed = CliRunner().invoke(main, [*args, "--stream"])
    assert plain.exit_code == 0 and streamed.exit_code == 0, plain.output + streamed.output
    assert streamed.stdout == plain.stdout
    assert plain.stdout.startswith("The for statement") and len(plain.stdout) > len("The for statement") + 10
    assert "tokens/s" in plain.stderr and "prefill" in plain.stderr


def test_text_stream_never_splits_a_character():
    data = "héllo ✓ 🐍 ".encode() + b"\xff ok \xe2\x9c"  # an invalid byte, then a truncated tail
    stream = ByteTokenizer().stream()
    chunks = [stream.push(b) for b in data]
    chunks.append(stream.finish())
    assert "".join(chunks) == data.decode("utf-8", errors="replace") == ByteTokenizer().decode(list(data))
    assert "🐍" in chunks and "✓" in chunks  # multi-byte characters come out whole, once complete
    assert chunks[data.index("🐍".encode()) + 1:data.index("🐍".encode()) + 3] == ["", ""]


def test_generate_text_api_accepts_a_list_of_prompts(artifacts):
    seen: dict[int, str] = {0: "", 1: ""}
    with open_runner(artifacts["custom"], provider="cpu") as runner:
        result = generate(runner, ByteTokenizer(), ["The for statement", "x"], max_new_tokens=8,
                          on_text=lambda row, chunk: seen.__setitem__(row, seen[row] + chunk))
    assert [seen[0], seen[1]] == result.texts
    assert all(len(t) == 8 for t in result.tokens)


def test_help_teaches_and_json_is_machine_readable(artifacts):
    res = CliRunner().invoke(main, ["generate", "--help"])
    assert res.exit_code == 0
    for text in ("--prompt", "--max-new-tokens", "--top-p", "--stream", "--provider", "Examples:",
                 "llmtrt generate out/onnx"):
        assert text in res.output
    res = CliRunner().invoke(main, ["generate", str(artifacts["custom"]), "--prompt", bytes(PROMPT).decode(),
                                    "--max-new-tokens", str(NEW), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    for key in ("text", "new_tokens", "prefill_ms", "prefill_tokens_per_s", "decode_tokens_per_s", "stop_reason"):
        assert key in out
    assert out["new_tokens"] == NEW and out["stop_reason"] == "max_new_tokens"
    assert out["text"] == ByteTokenizer().decode(out["tokens"])


def _fake_engine_dir(tmp_path: Path, onnx_dir: Path) -> Path:
    engines = tmp_path / "engines"
    engines.mkdir()
    (engines / "engine.fp32.plan").write_bytes(b"\0" * 1024)
    backend = "tensorrt" if importlib.util.find_spec("tensorrt") is not None else "tensorrt-rtx"
    (engines / "engine.fp32.json").write_text(json.dumps({
        "kind": "tensorrt-engine", "plan": "engine.fp32.plan", "precision": "fp32", "backend": {"name": backend},
        "onnx": str(onnx_dir / "model.onnx"), "profiles": [], "kv_cache": "dynamic"}))
    return engines


@pytest.mark.skipif(not HAS_RTX, reason="no TensorRT or TensorRT-RTX module to try deserializing with")
def test_engine_without_gpu_is_a_user_error(tmp_path, artifacts):
    if _torch_cuda():
        pytest.skip("a CUDA device is present; the no-GPU message does not apply")
    engines = _fake_engine_dir(tmp_path, artifacts["custom"])
    res = CliRunner().invoke(main, ["generate", str(engines), "--prompt", "The"])
    assert res.exit_code == 2
    assert "TensorRT engines need a GPU" in res.stderr
    assert f"llmtrt generate {artifacts['custom']}" in res.stderr  # says how to run on the CPU instead


@pytest.mark.gpu
@pytest.mark.rtx
@pytest.mark.skipif(not HAS_RTX or not _torch_cuda(), reason="needs a CUDA GPU and TensorRT / TensorRT-RTX")
def test_engine_greedy_equals_pytorch_on_gpu(tmp_path, artifacts, reference):
    from llmtrt.pipelines.engine.build import build_engine
    from llmtrt.pipelines.engine.profiles import default_profiles

    build_engine(artifacts["custom"] / "model.onnx", tmp_path / "engines", precision="fp32",
                 profiles=default_profiles(1, 64, 128), max_positions=128)
    with open_runner(tmp_path / "engines") as runner:
        assert generate_ids(runner, [PROMPT], max_new_tokens=NEW).tokens[0] == reference
