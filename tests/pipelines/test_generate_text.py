"""generate on checkpoints with real tokenizers: BOS as the checkpoint says, greedy ids equal to transformers'
token for token, printed text equal to the decoded sequence, EOS lists, --chat.

Two checkpoints: the real pretrained stories260K (sentencepiece-style BPE, BOS from tokenizer_config.json;
skipped when ../shared/real-models is absent) and a random Llama whose tokenizer is Llama-3-like
(<|begin_of_text|> from tokenizer.json's post-processor, a chat template), built here.
"""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from llmtrt.exporter.config import resolve_model
from llmtrt.exporter.onnx_export import ExportOptions
from llmtrt.pipelines.artifacts import export_artifact
from llmtrt.pipelines.cli import main
from llmtrt.pipelines.runtime.artifact_runners import open_runner
from llmtrt.pipelines.runtime.generate import generate, generate_ids
from llmtrt.pipelines.runtime.runners import PyTorchRunner
from llmtrt.pipelines.runtime.tokenizer import load_tokenizer
from tests.conftest import HAS_TRANSFORMERS, make_llama3_style_checkpoint, stories_or_skip

pytestmark = pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed (pip install 'llmtrt[dev]')")
STORY = "Once upon a time, there was"
NEW = 40


def _transformers_greedy(checkpoint, prompt: str | None = None, ids: list[int] | None = None, new: int = NEW):
    """(prompt ids, new ids) of transformers: tokenizer(prompt) as the checkpoint configures it, then greedy
    generate with the checkpoint's generation_config (its EOS ids stop it; the EOS itself is dropped)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(checkpoint))
    ids = tok(prompt).input_ids if ids is None else ids
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    x = torch.tensor([ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, do_sample=False,
                         pad_token_id=model.generation_config.pad_token_id or 0)[0, len(ids):].tolist()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    cut = next((i for i, t in enumerate(out) if t in eos), len(out))
    return ids, out[:cut]


@pytest.fixture(scope="module")
def stories(tmp_path_factory):
    """stories260K and its fp32 ONNX export (standard ops): (checkpoint, artifact)."""
    checkpoint = stories_or_skip()
    art = tmp_path_factory.mktemp("stories") / "fp32"
    export_artifact(resolve_model(str(checkpoint)), art, ExportOptions(dialect="standard"))
    return checkpoint, art


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    """A random Llama with a Llama-3-like tokenizer and its fp32 ONNX export (custom ops): (checkpoint, artifact)."""
    pytest.importorskip("tokenizers")
    root = tmp_path_factory.mktemp("llama3")
    checkpoint = make_llama3_style_checkpoint(root / "ckpt")
    export_artifact(resolve_model(str(checkpoint)), root / "fp32")
    return checkpoint, root / "fp32"


def _greedy_everywhere(checkpoint, art, prompt: str) -> dict[str, list[int]]:
    tok = load_tokenizer(art)
    out = {}
    with PyTorchRunner(resolve_model(str(checkpoint))) as runner:
        out["pytorch"] = generate(runner, tok, prompt, max_new_tokens=NEW).tokens[0]
    with open_runner(art, provider="cpu") as runner:
        out["onnxruntime"] = generate(runner, tok, prompt, max_new_tokens=NEW).tokens[0]
        out["onnxruntime --no-bos"] = generate(runner, tok.with_bos(False), prompt, max_new_tokens=NEW).tokens[0]
    return out


def test_stories260k_greedy_equals_transformers_with_bos(stories):
    checkpoint, art = stories
    hf_prompt, hf_new = _transformers_greedy(checkpoint, STORY)
    assert hf_prompt[0] == 1 and load_tokenizer(art).prompt_ids(STORY) == hf_prompt  # BOS (id 1) first
    assert len(hf_new) == NEW
    ours = _greedy_everywhere(checkpoint, art, STORY)
    assert ours["pytorch"] == hf_new
    assert ours["onnxruntime"] == hf_new
    # the fault: without BOS the greedy output departs from transformers (it did at token 13)
    assert ours["onnxruntime --no-bos"] != hf_new


def test_llama3_style_greedy_equals_transformers_with_begin_of_text(llama3):
    checkpoint, art = llama3
    prompt = "The for statement is used to"
    hf_prompt, hf_new = _transformers_greedy(checkpoint, prompt)
    tok = load_tokenizer(art)
    assert hf_prompt[0] == tok.bos_id == tok.special.bos_id and tok.prompt_ids(prompt) == hf_prompt
    ours = _greedy_everywhere(checkpoint, art, prompt)
    assert ours["pytorch"] == hf_new and ours["onnxruntime"] == hf_new
    assert ours["onnxruntime --no-bos"] != hf_new


def test_printed_text_is_the_decoded_sequence(stories):
    """The issue's `there wasa little girl`: prompt + printed text must equal decode(prompt ids + new ids)."""
    _, art = stories
    args = ["generate", str(art), "--prompt", STORY, "--max-new-tokens", "24"]
    plain = CliRunner().invoke(main, args)
    streamed = CliRunner().invoke(main, [*args, "--stream"])
    as_json = CliRunner().invoke(main, [*args, "--json"])
    assert plain.exit_code == streamed.exit_code == as_json.exit_code == 0, plain.output + streamed.output
    out = json.loads(as_json.stdout)
    tok = load_tokenizer(art)
    assert out["prompt_ids"][0] == 1
    whole = tok.decode(out["prompt_ids"] + out["tokens"])
    assert plain.stdout == streamed.stdout == whole + "\n"
    assert plain.stdout.startswith(STORY + " a little girl")
    assert STORY + out["text"] == whole


def test_every_id_of_an_eos_list_stops_generation(llama3, tmp_path):
    _, art = llama3
    tok = load_tokenizer(art)
    with open_runner(art, provider="cpu") as runner:
        free = generate_ids(runner, [tok.prompt_ids("x = ")], max_new_tokens=NEW, eos_ids=()).tokens[0]
    stop = next(t for t in free[3:] if t not in free[:3])  # a token first produced at step >= 3
    expected = free[:free.index(stop)]
    for eos in ([stop, 383], [383, stop]):
        copy = tmp_path / f"art-{eos[0]}"
        shutil.copytree(art, copy)
        (copy / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))  # the artifact's own copy
        res = CliRunner().invoke(main, ["generate", str(copy), "--prompt", "x = ", "--max-new-tokens", str(NEW),
                                        "--json"])
        assert res.exit_code == 0, res.output
        out = json.loads(res.stdout)
        assert (out["stop_reason"], out["tokens"]) == ("eos", expected), eos


def test_chat_uses_the_checkpoint_template(llama3):
    from transformers import AutoTokenizer

    checkpoint, art = llama3
    question = "What does the for statement do?"
    hf_ids = AutoTokenizer.from_pretrained(str(checkpoint)).apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True)
    hf_ids = list(hf_ids["input_ids"] if isinstance(hf_ids, dict) or hasattr(hf_ids, "keys") else hf_ids)
    assert load_tokenizer(art).chat_ids(question) == hf_ids
    res = CliRunner().invoke(main, ["generate", str(art), "--chat", "--prompt", question, "--max-new-tokens", "12",
                                    "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["prompt_ids"] == hf_ids
    assert out["tokens"] == _transformers_greedy(checkpoint, ids=hf_ids, new=12)[1]
    plain = CliRunner().invoke(main, ["generate", str(art), "--chat", "--prompt", question, "--max-new-tokens", "12"])
    assert plain.stdout == out["text"] + "\n"  # the reply only, not the template's text


def test_chat_without_a_template_is_a_user_error():
    res = CliRunner().invoke(main, ["generate", "--model", "bytes-llama", "--chat", "--prompt", "hi"])
    assert res.exit_code == 2
    assert "has no chat template" in res.stderr and "drop --chat" in res.stderr
