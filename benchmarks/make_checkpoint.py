"""Write a random-init HF Llama checkpoint (config.json + model.safetensors + a tokenizer) in chunks,
never holding more than one tensor: the benchmark checkpoints are too big to build with transformers
in 24 GiB.

    python -m benchmarks.make_checkpoint --shape 1.1b --out /tmp/llmtrt-bench/llama-1.1b
    python -m benchmarks.make_checkpoint --shape 8b --dtype bf16 --out /tmp/llmtrt-bench/llama-8b

Weights are normal(0, 0.02), norms 1 + normal(0, 0.1), seeded. The tokenizer (tokenizer.json +
tokenizer_config.json, as transformers saves it) is byte-level with Llama's special tokens
<unk>=0, <s>=1, </s>=2, the 256 byte symbols at 3..258 and unused ``<extra_N>`` tokens filling the
vocabulary, so any text encodes and the onnxruntime-genai model builder, which loads the checkpoint's
tokenizer first, runs on it. Keep the output out of git.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
from pathlib import Path

import numpy as np

SHAPES = {  # the shapes the issue measures the peers with
    "156m": dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
                 intermediate_size=2816, vocab_size=32000),
    "1.1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                 intermediate_size=8192, vocab_size=32000),
    "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=14336, vocab_size=128256),
}
_ST_DTYPES = {"fp32": ("F32", 4), "bf16": ("BF16", 2)}
BOS_ID, EOS_ID = 1, 2


def hf_config(shape: str) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
            "torch_dtype": "float32", "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, **SHAPES[shape]}


def write_tokenizer(out: str | Path, vocab_size: int) -> Path:
    """A byte-level BPE tokenizer of exactly ``vocab_size`` tokens, saved the way HF checkpoints carry one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < len(specials) + len(alphabet):
        raise ValueError(f"vocab_size {vocab_size} is below the {len(specials) + len(alphabet)} tokens of a byte tokenizer")
    names = specials + alphabet + [f"<extra_{n}>" for n in range(vocab_size - len(specials) - len(alphabet))]
    tok = Tokenizer(models.BPE(vocab={name: i for i, name in enumerate(names)}, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return out / "tokenizer.json"


def ensure_tokenizer(checkpoint: str | Path) -> None:
    """Give a checkpoint written before tokenizers were added its tokenizer and bos/eos ids."""
    checkpoint = Path(checkpoint)
    config_path = checkpoint / "config.json"
    config = json.loads(config_path.read_text())
    if "bos_token_id" not in config or "eos_token_id" not in config:
        config.update(bos_token_id=BOS_ID, eos_token_id=EOS_ID)
        tmp = checkpoint / ".config.json.partial"
        tmp.write_text(json.dumps(config, indent=2) + "\n")
        os.replace(tmp, config_path)
    if not (checkpoint / "tokenizer.json").is_file():
        write_tokenizer(checkpoint, config["vocab_size"])


def tensor_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    d = h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                       p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                       p + "mlp.down_proj.weight": (h, i)})
    return shapes


def _encode(x: np.ndarray, dtype: str) -> bytes:
    if dtype == "bf16":  # round to nearest even on the top 16 bits
        u = x.astype(np.float32).view(np.uint32)
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16).tobytes()
    return x.astype(np.float32).tobytes()


def write_checkpoint(out: str | Path, shape: str = "1.1b", dtype: str = "fp32", seed: int = 0,
                     chunk_elements: int = 1 << 24, layers: int | None = None) -> Path:
    """``layers``: that many decoder layers instead of the shape's (an 8B shape whose 32 layers would not
    fit on the disk: every layer has the same size, so time per layer and peak memory carry over)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = hf_config(shape)
    if layers is not None:
        config["num_hidden_layers"] = layers
    config["torch_dtype"] = {"fp32": "float32", "bf16": "bfloat16"}[dtype]
    st_dtype, size = _ST_DTYPES[dtype]
    shapes = tensor_shapes(config)
    header, offset = {}, 0
    for name in sorted(shapes):
        n = int(np.prod(shapes[name])) * size
        header[name] = {"dtype": st_dtype, "shape": list(shapes[name]), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    rng = np.random.default_rng(seed)
    tmp = out / ".model.safetensors.partial"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name in sorted(shapes):
            total = int(np.prod(shapes[name]))
            norm = name.endswith("norm.weight")
            for start in range(0, total, chunk_elements):
                k = min(chunk_elements, total - start)
                x = rng.standard_normal(k, dtype=np.float32)
                x = 1.0 + 0.1 * x if norm else 0.02 * x
                f.write(_encode(x, dtype))
    os.replace(tmp, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_tokenizer(out, config["vocab_size"])
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1.1b")
    ap.add_argument("--dtype", choices=sorted(_ST_DTYPES), default="fp32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's)")
    ap.add_argument("--out", required=True, help="directory to write config.json and model.safetensors into")
    args = ap.parse_args(argv)
    path = write_checkpoint(args.out, args.shape, args.dtype, args.seed, layers=args.layers)
    print(f"wrote {path} ({(path / 'model.safetensors').stat().st_size / 1e9:.2f} GB)")


if __name__ == "__main__":
    main()
