"""The reference model matches transformers' LlamaForCausalLM on the same weights (fp32, <= 1e-4).

Prefill of a left-padded batch, then cached decode steps, on random-init checkpoints saved with
save_pretrained: kv_heads=1 (MQA), kv_heads=heads (MHA), 9 heads / 3 KV heads, an explicit
head_dim, llama3 and linear rope scaling, tied embeddings.
"""

import numpy as np
import pytest
import torch

from llmtrt.exporter.config import resolve_model
from llmtrt.exporter.weights import load_model
from llmtrt.pipelines.runtime.decoding import Batch
from tests.conftest import run_torch

TOL = 1e-4

SHAPES = {
    "mqa": dict(num_attention_heads=4, num_key_value_heads=1),
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "9h3kv": dict(hidden_size=72, num_attention_heads=9, num_key_value_heads=3),
    "head_dim": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32),
    "llama3_rope": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
                        rope_theta=500000.0),
    "linear_rope": dict(rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "tied": dict(tie_word_embeddings=True),
}

PROMPTS = [[5, 9, 11, 3, 7, 2, 60, 61], [17, 4, 99], [1, 2, 3, 4, 5, 6]]
DECODE = np.array([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3], [5, 8, 9, 7, 9]], dtype=np.int64)


def hf_cached_logits(hf, batch: Batch, decode_tokens: np.ndarray) -> list[np.ndarray]:
    ids, mask, pos = (torch.from_numpy(a) for a in (batch.input_ids, batch.attention_mask, batch.position_ids))
    out = []
    with torch.no_grad():
        res = hf(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        out.append(res.logits.numpy())
        past = res.past_key_values
        last_pos = pos[:, -1:]
        for i in range(decode_tokens.shape[1]):
            tok = torch.from_numpy(decode_tokens[:, i:i + 1])
            mask = torch.cat([mask, torch.ones_like(tok)], dim=1)
            last_pos = last_pos + 1
            res = hf(input_ids=tok, attention_mask=mask, position_ids=last_pos, past_key_values=past, use_cache=True)
            out.append(res.logits.numpy())
            past = res.past_key_values
    return out


@pytest.mark.parametrize("shape", list(SHAPES))
def test_logits_match_transformers(hf_checkpoint, shape):
    from transformers import LlamaForCausalLM

    ckpt = hf_checkpoint(shape, **SHAPES[shape])
    hf = LlamaForCausalLM.from_pretrained(ckpt, attn_implementation="eager").eval()
    source = resolve_model(str(ckpt))
    model = load_model(source)
    batch = Batch.left_padded(PROMPTS)
    ours = run_torch(model, batch, DECODE, DECODE.shape[1])
    theirs = hf_cached_logits(hf, batch, DECODE)
    valid = batch.attention_mask.astype(bool)
    prefill_err = np.abs(ours.logits[0] - theirs[0])[valid].max()
    decode_err = max(np.abs(a - b).max() for a, b in zip(ours.logits[1:], theirs[1:], strict=False))
    assert prefill_err <= TOL, f"prefill max abs {prefill_err:.3g}"
    assert decode_err <= TOL, f"decode max abs {decode_err:.3g}"
    # And the check can fail: a different checkpoint's logits are far off.
    assert np.abs(ours.logits[0] - theirs[0] * 1.01)[valid].max() > TOL


def test_kv_cache_consistency_prefill_plus_decode_equals_full_forward():
    source = resolve_model("tiny")
    model = load_model(source)
    full = Batch.left_padded([[3, 4, 5, 6, 7, 8, 9, 10]])
    one_shot = run_torch(model, full).logits[0]
    prefix = Batch.left_padded([[3, 4, 5]])
    res = run_torch(model, prefix, np.array([[6, 7, 8, 9, 10]]), 5)
    stepped = np.concatenate(res.logits, axis=1)
    assert stepped.shape == one_shot.shape
    np.testing.assert_allclose(stepped, one_shot, atol=1e-5, rtol=0)


EXPORTS = [  # (dialect, kv_cache, fuse, logits): every dialect fused, with all and last-position logits
    ("custom", "dynamic", True, "all"), ("custom", "dynamic", True, "last"), ("custom", "dynamic", False, "all"),
    ("standard", "dynamic", True, "all"), ("standard", "dynamic", True, "last"), ("standard", "static", True, "last"),
    ("decomposed", "dynamic", True, "all"), ("decomposed", "dynamic", True, "last"),
    ("custom", "static", True, "all"),
]


@pytest.mark.parametrize("dialect, kv_cache, fuse, logits", EXPORTS,
                         ids=["-".join(str(x) for x in e).replace("True", "fused").replace("False", "unfused")
                              for e in EXPORTS])
def test_exported_graph_matches_transformers(hf_checkpoint, tmp_path, dialect, kv_cache, fuse, logits):
    """The exported graph in ONNX Runtime (fused projections, last-position logits) against transformers'
    LlamaForCausalLM on the same checkpoint: prefill of a left-padded batch, then cached decode steps."""
    from transformers import LlamaForCausalLM

    from llmtrt.exporter.onnx_export import ExportOptions, export
    from tests.conftest import run_ort

    ckpt = hf_checkpoint("9h3kv", **SHAPES["9h3kv"])
    hf = LlamaForCausalLM.from_pretrained(ckpt, attn_implementation="eager").eval()
    source = resolve_model(str(ckpt))
    exported = export(source, tmp_path / "onnx", ExportOptions(dialect=dialect, kv_cache=kv_cache, fuse=fuse,
                                                               logits=logits, max_positions=32))
    assert bool(exported.fused) == fuse
    batch = Batch.left_padded(PROMPTS)
    ours = run_ort(exported.onnx_path, source.config, batch, DECODE, DECODE.shape[1], layout=kv_cache, capacity=16)
    theirs = hf_cached_logits(hf, batch, DECODE)
    valid = batch.attention_mask.astype(bool)
    if logits == "last":
        assert ours.logits[0].shape == (len(PROMPTS), 1, source.config.vocab_size)
        prefill_err = np.abs(ours.logits[0] - theirs[0][:, -1:]).max()
    else:
        prefill_err = np.abs(ours.logits[0] - theirs[0])[valid].max()
    decode_err = max(np.abs(a - b).max() for a, b in zip(ours.logits[1:], theirs[1:], strict=True))
    assert prefill_err <= TOL, f"prefill max abs {prefill_err:.3g}"
    assert decode_err <= TOL, f"decode max abs {decode_err:.3g}"
