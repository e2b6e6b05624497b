"""A Llama-family decoder in one file: RMSNorm, rotary embedding, GQA attention with a KV cache, SwiGLU.

Prefill and decode are the same forward: ``past_key_values`` may have length 0. The KV cache is
explicit tensors in and out; nothing in ``forward`` depends on tensor data, only on shapes, so
the graph exports once for every batch size, prompt length and past length.

Custom ops (``torch.ops.llmtrt.*``, see plugins/) carry RMSNorm, RoPE and attention so the
exporter can emit them as single nodes; in eager mode they run their torch reference.

Two export-time variants leave the numbers unchanged (``LlamaDecoder.export_variant``):
``fuse_projections`` concatenates q/k/v into one ``qkv_proj`` and gate/up into one ``gate_up_proj``
(one MatMul each, weights concatenated along the output axis, in the order of :data:`FUSED`), and
``last_logits_only`` computes the norm and lm_head for the last position only ([batch, 1, vocab]).
The reference (validate, compare, generate) runs the model as the checkpoint spells it.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

import llmtrt.plugins.gqa_attention  # noqa: F401  (registers torch.ops.llmtrt.*)
import llmtrt.plugins.gqa_attention_static  # noqa: F401
import llmtrt.plugins.rms_norm  # noqa: F401
import llmtrt.plugins.rotary_embedding  # noqa: F401
from llmtrt.exporter.config import ModelConfig

ops = torch.ops.llmtrt

# fused module (relative to a decoder layer) -> the checkpoint modules it concatenates, in output order
FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}


def fused_modules(config: ModelConfig) -> dict[str, list[str]]:
    """Every fused module of a fused export -> its parts, in the order their weights are concatenated."""
    return {f"model.layers.{n}.{fused}": [f"model.layers.{n}.{part}" for part in parts]
            for n in range(config.num_hidden_layers) for fused, parts in FUSED.items()}


def _fused_linear(*parts: nn.Linear) -> nn.Linear:
    """One bias-free Linear whose output is the parts' outputs concatenated (weights stacked on dim 0)."""
    weight = torch.cat([p.weight for p in parts], dim=0)
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")  # no throwaway weight
    linear.weight = nn.Parameter(weight, requires_grad=False)
    return linear


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
        self.fused = False

    def fuse(self) -> None:
        """q/k/v_proj -> one qkv_proj (its output: the q, k and v heads, in that order)."""
        with torch.no_grad():
            self.qkv_proj = _fused_linear(self.q_proj, self.k_proj, self.v_proj)
        del self.q_proj, self.k_proj, self.v_proj
        self.fused = True

    def rotated_qkv(self, x: Tensor, position_ids: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q [batch, heads, seq, d] and k [batch, kv_heads, seq, d] with rotary applied, and v."""
        batch, seq, _ = x.shape
        if self.fused:  # one MatMul; the q and k heads rotated in one call (RoPE acts on each head alike)
            qkv = self.qkv_proj(x).view(batch, seq, self.num_heads + 2 * self.kv_num_heads, self.head_dim)
            qk, v = qkv.transpose(1, 2).split([self.num_heads + self.kv_num_heads, self.kv_num_heads], dim=1)
            q, k = ops.rotary_embedding(qk, position_ids, cos, sin).split([self.num_heads, self.kv_num_heads], dim=1)
            return q, k, v
        q = self.q_proj(x).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.kv_num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.kv_num_heads, self.head_dim).transpose(1, 2)
        return ops.rotary_embedding(q, position_ids, cos, sin), ops.rotary_embedding(k, position_ids, cos, sin), v

    def forward(self, x: Tensor, position_ids: Tensor, mask: Tensor, cos: Tensor, sin: Tensor,
                past_key: Tensor, past_value: Tensor, write_indices: Tensor | None = None
                ) -> tuple[Tensor, Tensor, Tensor]:
        batch, seq, _ = x.shape
        q, k, v = self.rotated_qkv(x, position_ids, cos, sin)
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
        self.fused = False

    def fuse(self) -> None:
        """gate/up_proj -> one gate_up_proj (its output: gate, then up)."""
        with torch.no_grad():
            self.gate_up_proj = _fused_linear(self.gate_proj, self.up_proj)
        del self.gate_proj, self.up_proj
        self.fused = True

    def forward(self, x: Tensor) -> Tensor:
        if self.fused:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(nn.functional.silu(gate) * up)
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
        self.last_logits_only = False

    def export_variant(self, *, fuse: bool, last_logits_only: bool, in_place: bool = False) -> LlamaDecoder:
        """This model with fused projections and/or last-position logits, for export. Unless ``in_place``
        the result is a new module tree sharing every tensor it does not replace (this model is unchanged)."""
        if not fuse and last_logits_only == self.last_logits_only:
            return self
        model = self
        if not in_place:  # a new module tree; the parameters and buffers themselves are shared
            memo = {id(t): t for t in (*self.parameters(), *self.buffers())}
            model = copy.deepcopy(self, memo)
        if fuse:
            model.fuse_projections()
        model.last_logits_only = last_logits_only
        return model

    def fuse_projections(self) -> None:
        """q/k/v -> qkv_proj and gate/up -> gate_up_proj in every layer (see :data:`FUSED`)."""
        for layer in self.model.layers:
            if not layer.self_attn.fused:
                layer.self_attn.fuse()
            if not layer.mlp.fused:
                layer.mlp.fuse()

    @property
    def fused(self) -> bool:
        return all(layer.self_attn.fused and layer.mlp.fused for layer in self.model.layers)

    def forward(self, input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor,
                past_key_values: list[Tensor], write_indices: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
        """Logits [batch, seq, vocab] ([batch, 1, vocab]: the last position, when ``last_logits_only``)
        and present [k0, v0, k1, v1, ...].

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
        if self.last_logits_only:
            x = x[:, -1:]
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
