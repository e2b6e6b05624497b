"""A Llama-family decoder in one file: RMSNorm, rotary embedding, GQA attention with a KV cache, SwiGLU.

Prefill and decode are the same forward: ``past_key_values`` may have length 0. The KV cache is
explicit tensors in and out; nothing in ``forward`` depends on tensor data, only on shapes, so
the graph exports once for every batch size, prompt length and past length.

Custom ops (``torch.ops.llmtrt.*``, see plugins/) carry RMSNorm, RoPE and attention so the
exporter can emit them as single nodes; in eager mode they run their torch reference.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

import llmtrt.plugins.gqa_attention  # noqa: F401  (registers torch.ops.llmtrt.*)
import llmtrt.plugins.gqa_attention_static  # noqa: F401
import llmtrt.plugins.rms_norm  # noqa: F401
import llmtrt.plugins.rotary_embedding  # noqa: F401
from llmtrt.exporter.config import ModelConfig

ops = torch.ops.llmtrt


def rope_inv_freq(config: ModelConfig) -> Tensor:
    """Inverse rotary frequencies in fp32, with linear or llama3 scaling, computed as transformers does."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = config.rope_scaling
    if s.rope_type == "linear":
        return inv_freq / s.factor
    if s.rope_type == "llama3":
        low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
        high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
        smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor)
        smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    return inv_freq


def rope_tables(config: ModelConfig, max_positions: int | None = None) -> tuple[Tensor, Tensor]:
    """Real cos/sin tables, [max_positions, head_dim / 2], angle = position * inv_freq."""
    n = max_positions or config.max_position_embeddings
    angles = torch.outer(torch.arange(n, dtype=torch.int64).float(), rope_inv_freq(config))
    return angles.cos(), angles.sin()


# Additive mask value of hidden positions: finite and representable in fp16 and bf16 (finfo(float32).min
# rounds to -inf in bf16, and a fully masked query row, e.g. left padding, then gives NaN), with headroom
# so that adding it to a score stays finite in fp16. exp(-30000 - max) is exactly 0 in fp32, so rows that
# see at least one key are unchanged; a fully masked row attends to every key alike (finite, ignored).
MASK_VALUE = -30000.0


def causal_mask(attention_mask: Tensor, seq_len: int, dtype: torch.dtype) -> Tensor:
    """Additive mask [batch, 1, seq, past + seq]: query i sees key j when j <= past + i and j is not padding."""
    total = attention_mask.shape[1]
    past = total - seq_len
    query_pos = torch.arange(seq_len, device=attention_mask.device) + past
    key_pos = torch.arange(total, device=attention_mask.device)
    allowed = (key_pos[None, :] <= query_pos[:, None])[None, None] & attention_mask[:, None, None, :].bool()
    return torch.where(allowed, 0.0, MASK_VALUE).to(dtype)


def static_causal_mask(attention_mask: Tensor, write_indices: Tensor, seq_len: int, dtype: torch.dtype) -> Tensor:
    """Additive mask [batch, 1, seq, max_cache_len] for a fixed-size cache written at ``write_indices``:
    query i of sequence b sits in slot write_indices[b] + i and sees slots up to it that are not padding."""
    max_len = attention_mask.shape[1]
    query_slot = write_indices[:, None] + torch.arange(seq_len, device=attention_mask.device)  # [batch, seq]
    key_slot = torch.arange(max_len, device=attention_mask.device)
    allowed = (key_slot[None, None, :] <= query_slot[:, :, None])[:, None] & attention_mask[:, None, None, :].bool()
    return torch.where(allowed, 0.0, MASK_VALUE).to(dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.kv_num_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim ** -0.5
        h, d = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=False)
        self.k_proj = nn.Linear(h, self.kv_num_heads * d, bias=False)
        self.v_proj = nn.Linear(h, self.kv_num_heads * d, bias=False)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=False)

    def forward(self, x: Tensor, position_ids: Tensor, mask: Tensor, cos: Tensor, sin: Tensor,
                past_key: Tensor, past_value: Tensor, write_indices: Tensor | None = None
                ) -> tuple[Tensor, Tensor, Tensor]:
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.kv_num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.kv_num_heads, self.head_dim).transpose(1, 2)
        q = ops.rotary_embedding(q, position_ids, cos, sin)
        k = ops.rotary_embedding(k, position_ids, cos, sin)
        if write_indices is None:  # growing cache: present = concat(past, new)
            y, present_key, present_value = ops.gqa_attention(
                q, k, v, mask, past_key, past_value, self.num_heads, self.kv_num_heads, self.scale)
        else:  # fixed-size cache updated in place at write_indices
            y, present_key, present_value = ops.gqa_attention_static(
                q, k, v, mask, past_key, past_value, write_indices, self.num_heads, self.kv_num_heads, self.scale)
        y = y.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim)
        return self.o_proj(y), present_key, present_value


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, position_ids: Tensor, mask: Tensor, cos: Tensor, sin: Tensor,
                past_key: Tensor, past_value: Tensor, write_indices: Tensor | None = None
                ) -> tuple[Tensor, Tensor, Tensor]:
        h, present_key, present_value = self.self_attn(
            self.input_layernorm(x), position_ids, mask, cos, sin, past_key, past_value, write_indices)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, present_key, present_value


class LlamaDecoder(nn.Module):
    """Parameter names match transformers' LlamaForCausalLM, so HF state dicts load unchanged."""

    def __init__(self, config: ModelConfig, max_positions: int | None = None):
        super().__init__()
        self.config = config
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.model.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.model.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        cos, sin = rope_tables(config, max_positions)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor,
                past_key_values: list[Tensor], write_indices: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
        """Logits [batch, seq, vocab] and present [k0, v0, k1, v1, ...].

        Growing cache (``write_indices`` None): past is [batch, kv_heads, past, d], attention_mask
        [batch, past + seq], present [batch, kv_heads, past + seq, d].
        Static cache: past is the whole [batch, kv_heads, max_cache_len, d] cache, attention_mask
        [batch, max_cache_len] marks filled slots (the new tokens' slots included), the new rows are
        written at slots write_indices[b] + i, and present is the updated cache.
        """
        x = self.model.embed_tokens(input_ids)
        seq = input_ids.shape[1]
        if write_indices is None:
            mask = causal_mask(attention_mask, seq, x.dtype)
        else:
            mask = static_causal_mask(attention_mask, write_indices, seq, x.dtype)
        present: list[Tensor] = []
        for i, layer in enumerate(self.model.layers):
            x, k, v = layer(x, position_ids, mask, self.rope_cos, self.rope_sin,
                            past_key_values[2 * i], past_key_values[2 * i + 1], write_indices)
            present += [k, v]
        logits = self.lm_head(self.model.norm(x)).float()
        return logits, present

    def empty_cache(self, batch: int, dtype: torch.dtype = torch.float32) -> list[Tensor]:
        """A zero-length KV cache (prefill)."""
        c = self.config
        shape = (batch, c.num_key_value_heads, 0, c.head_dim)
        return [torch.zeros(shape, dtype=dtype) for _ in range(2 * c.num_hidden_layers)]


def init_random(model: LlamaDecoder, seed: int) -> LlamaDecoder:
    """Deterministic random init (normal, std 0.02; norms at 1 + noise so they are exercised)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    return model
