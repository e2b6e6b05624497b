"""HF safetensors loading: single and sharded files, bf16/fp16 on disk, strict key and shape checks."""

import json

import pytest
import torch
from safetensors.torch import save_file

from llmtrt.exporter.config import resolve_model
from llmtrt.exporter.errors import LlmtrtUserError
from llmtrt.exporter.weights import load_model, load_state_dict


def _reference_state(ckpt):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32).state_dict()


def test_sharded_checkpoint_loads(hf_checkpoint):
    ckpt = hf_checkpoint(max_shard_size="60KB")
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    source = resolve_model(str(ckpt))
    state = load_state_dict(source.config, ckpt)
    ref = _reference_state(ckpt)
    for name, tensor in state.items():
        assert torch.equal(tensor, ref[name]), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_on_disk_is_upcast(hf_checkpoint, dtype):
    ckpt = hf_checkpoint(dtype=dtype)
    state = load_state_dict(resolve_model(str(ckpt)).config, ckpt)
    assert all(t.dtype == torch.float32 for t in state.values())
    ref = _reference_state(ckpt)
    assert torch.equal(state["model.layers.0.mlp.up_proj.weight"], ref["model.layers.0.mlp.up_proj.weight"])


def _rewrite(ckpt, mutate):
    from safetensors import safe_open

    path = ckpt / "model.safetensors"
    with safe_open(path, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    mutate(tensors)
    save_file(tensors, path)


def test_missing_tensor_is_named(hf_checkpoint):
    ckpt = hf_checkpoint()
    _rewrite(ckpt, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(LlmtrtUserError, match="'model.layers.1.self_attn.k_proj.weight' is missing"):
        load_model(resolve_model(str(ckpt)))


def test_shape_mismatch_is_named(hf_checkpoint):
    ckpt = hf_checkpoint()
    _rewrite(ckpt, lambda t: t.update({"model.norm.weight": torch.ones(63)}))
    with pytest.raises(LlmtrtUserError, match=r"'model.norm.weight' has shape \(63,\), config.json implies \(64,\)"):
        load_model(resolve_model(str(ckpt)))


def test_unexpected_tensor_is_named(hf_checkpoint):
    ckpt = hf_checkpoint()
    _rewrite(ckpt, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}))
    with pytest.raises(LlmtrtUserError, match="unexpected tensor 'model.layers.0.self_attn.q_proj.bias'"):
        load_model(resolve_model(str(ckpt)))


def test_pickled_checkpoint_is_refused(tmp_path, hf_checkpoint):
    ckpt = hf_checkpoint()
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(LlmtrtUserError, match="never unpickles"):
        load_model(resolve_model(str(ckpt)))


def test_corrupt_safetensors(hf_checkpoint):
    ckpt = hf_checkpoint()
    (ckpt / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(LlmtrtUserError, match="model.safetensors"):
        load_model(resolve_model(str(ckpt)))


def test_missing_shard(hf_checkpoint):
    ckpt = hf_checkpoint(max_shard_size="60KB")
    shard = sorted(ckpt.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(LlmtrtUserError, match=f"lists shard {shard.name}, which is missing"):
        load_model(resolve_model(str(ckpt)))
