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
