"""HF safetensors checkpoints (one file or sharded) -> state dict, with strict key and shape checks.

Never unpickles: ``.bin`` / ``.pt`` checkpoints are refused with the command that converts them.
Tensors are memory-mapped by safetensors and converted to the target dtype one at a time.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from llmtrt.exporter.config import ModelConfig
from llmtrt.exporter.errors import LlmtrtUserError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def checkpoint_files(directory: Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file that holds it."""
    index = directory / INDEX_FILE
    single = directory / SINGLE_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as exc:
            raise LlmtrtUserError(f"{index}: not a valid safetensors index ({exc!r}); re-save the checkpoint") from None
        files = {name: directory / shard for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise LlmtrtUserError(f"{index}: lists shard {shard.name}, which is missing from {directory}")
        return files
    if single.is_file():
        try:
            with safe_open(single, framework="pt") as f:
                return dict.fromkeys(f.keys(), single)
        except (SafetensorError, OSError) as exc:
            raise LlmtrtUserError(f"{single}: not a readable safetensors file ({exc}); re-download or re-save it") from None
    pickled = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
    hint = (f" (found {', '.join(pickled)}: llmtrt never unpickles; convert with "
            "`LlamaForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)`)") if pickled else ""
    raise LlmtrtUserError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a LlamaForCausalLM checkpoint of this config must hold, with its shape."""
    h, d, i = config.hidden_size, config.head_dim, config.intermediate_size
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    shapes = {"model.embed_tokens.weight": (config.vocab_size, h), "model.norm.weight": (h,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        })
    return shapes


def check_keys(config: ModelConfig, directory: Path, files: dict[str, Path]) -> None:
    expected = expected_shapes(config)
    present = {k for k in files if not k.endswith(_IGNORED_SUFFIXES)}
    if config.tie_word_embeddings:
        present.discard("lm_head.weight")  # some tied checkpoints still store it; the embedding wins
    missing = sorted(set(expected) - present)
    if missing:
        raise LlmtrtUserError(
            f"{directory}: tensor {missing[0]!r} is missing ({len(missing)} missing in all); "
            "the checkpoint does not match config.json")
    unexpected = sorted(present - set(expected))
    if unexpected:
        raise LlmtrtUserError(
            f"{directory}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all); "
            "is this a LlamaForCausalLM checkpoint matching config.json?")


def iter_tensors(config: ModelConfig, directory: str | Path, dtype: torch.dtype = torch.float32
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one at a time in ``dtype``, after checking keys; shapes are checked per tensor."""
    directory = Path(directory)
    files = checkpoint_files(directory)
    check_keys(config, directory, files)
    shapes = expected_shapes(config)
    by_file: dict[Path, list[str]] = {}
    for name, path in files.items():
        if name in shapes:
            by_file.setdefault(path, []).append(name)
    for path, names in by_file.items():
        try:
            with safe_open(path, framework="pt") as f:
                for name in sorted(names):
                    tensor = f.get_tensor(name)
                    if tuple(tensor.shape) != shapes[name]:
                        raise LlmtrtUserError(
                            f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, config.json implies "
                            f"{shapes[name]}; the weights and config.json do not belong together")
                    if not (tensor.is_floating_point()):
                        raise LlmtrtUserError(f"{path}: tensor {name!r} has dtype {tensor.dtype}; expected a float")
                    yield name, tensor.to(dtype)
        except SafetensorError as exc:
            raise LlmtrtUserError(f"{path}: corrupt safetensors file ({exc}); re-download or re-save it") from None


def load_state_dict(config: ModelConfig, directory: str | Path, dtype: torch.dtype = torch.float32
                    ) -> dict[str, torch.Tensor]:
    return dict(iter_tensors(config, directory, dtype))


def load_model(source, max_positions: int | None = None):
    """An eval-mode fp32 LlamaDecoder for a ModelSource: checkpoint weights, or seeded random init."""
    from llmtrt.exporter.model import LlamaDecoder, init_random

    model = LlamaDecoder(source.config, max_positions=max_positions)
    if source.checkpoint_dir is None:
        init_random(model, source.seed)
    else:
        state = load_state_dict(source.config, source.checkpoint_dir)
        if source.config.tie_word_embeddings:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        model.load_state_dict(state, strict=True)
    return model.eval()
