"""Shared fixtures: HF checkpoints made locally with transformers (no hub), ORT sessions, markers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


def make_hf_checkpoint(directory: Path, seed: int = 0, dtype: torch.dtype = torch.float32,
                       max_shard_size: str | None = None, **overrides) -> Path:
    """save_pretrained a random-init transformers LlamaForCausalLM (small by default)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, tie_word_embeddings=False)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kwargs)).eval()
    with torch.no_grad():  # HF inits norms to exactly 1; perturb so RMSNorm weights are exercised
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    model = model.to(dtype)
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, safe_serialization=True, **save_kwargs)
    return directory


@pytest.fixture
def hf_checkpoint(tmp_path):
    if not HAS_TRANSFORMERS:
        pytest.skip("transformers is not installed (pip install 'llmtrt[dev]')")

    def make(name: str = "ckpt", **kwargs) -> Path:
        return make_hf_checkpoint(tmp_path / name, **kwargs)

    return make


def run_torch(model, batch, decode=None, steps=0, layout="dynamic", capacity=None):
    """Prefill + ``steps`` decode steps of a loaded PyTorch model (runtime/runners.py PyTorchRunner)."""
    from llmtrt.pipelines.runtime.decoding import prefill_then_decode
    from llmtrt.pipelines.runtime.runners import PyTorchRunner

    with PyTorchRunner(model=model, layout=layout) as runner:
        return prefill_then_decode(runner, batch, decode, steps, capacity)


def run_ort(onnx_path, config, batch, decode=None, steps=0, layout="dynamic", capacity=None):
    """The same through ONNX Runtime on an exported graph."""
    from llmtrt.pipelines.runtime.decoding import prefill_then_decode
    from llmtrt.pipelines.runtime.runners import OnnxRuntimeRunner

    with OnnxRuntimeRunner(onnx_path, config, layout) as runner:
        return prefill_then_decode(runner, batch, decode, steps, capacity)


# --------------------------------------------------------------------------------------------
# checkpoints with real tokenizers
# --------------------------------------------------------------------------------------------
REAL_MODELS = Path(__file__).resolve().parents[1].parent / "shared" / "real-models"
STORIES = REAL_MODELS / "stories260k"
LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")


def stories_or_skip() -> Path:
    """The real pretrained stories260K checkpoint beside the repository, or skip saying where it was looked for."""
    if not (STORIES / "config.json").is_file():
        pytest.skip(f"the real checkpoint is not at {STORIES} (../shared/real-models/stories260k)")
    return STORIES


def write_llama3_style_tokenizer(directory: Path, vocab_size: int = 384) -> dict[str, int]:
    """A byte-level BPE tokenizer trained on the project's calibration text, with Llama 3's special tokens,
    a post-processor that puts <|begin_of_text|> first, no add_bos_token (as Llama 3 ships it), a chat
    template, and generation_config.json EOS [<|end_of_text|>, <|eot_id|>]. Returns the special ids."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from llmtrt import configs

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(LLAMA3_SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(configs.path("text", "calib.txt"))], trainer)
    ids = {name: tok.token_to_id(name) for name in LLAMA3_SPECIALS}
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, ids[bos])])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": "<|eot_id|>",
        "clean_up_tokenization_spaces": False, "model_max_length": 256, "chat_template": LLAMA3_CHAT_TEMPLATE}))
    (directory / "generation_config.json").write_text(json.dumps({
        "bos_token_id": ids[bos], "eos_token_id": [ids["<|end_of_text|>"], ids["<|eot_id|>"]]}))
    return ids


def make_llama3_style_checkpoint(directory: Path, seed: int = 0) -> Path:
    """A random-init Llama (make_hf_checkpoint) whose tokenizer is Llama-3-like (write_llama3_style_tokenizer)."""
    make_hf_checkpoint(directory, seed=seed, vocab_size=384)
    write_llama3_style_tokenizer(directory, vocab_size=384)
    return directory
