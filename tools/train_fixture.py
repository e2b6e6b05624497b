"""Train the project's built-in default model: a tiny byte-level GQA Llama.

Random weights make accuracy comparisons (fp16 / int8 / int4 against fp32)
meaningless, so the project ships a *trained* small model.  This script makes
it reproducibly, offline, on CPU, from text every Python installation carries:
the pydoc topic help (``pydoc_data.topics.topics``).

    python -m tools.train_fixture [--out DIR] [--steps N] [--seed S]

Outputs (defaults):

* ``configs/models/bytes-llama/``: ``config.json``, ``model.safetensors`` (fp32),
  ``generation_config.json`` and a ``README.md`` model card with the figures.
* ``configs/text/calib.txt``: ~48 KB drawn from the TRAINING topics (for
  calibration, e.g. int8 / int4 scales).
* ``configs/text/eval.txt``: the whole HELD-OUT set (~48 KB), for evaluation.

Tokenisation is byte-level: token id = UTF-8 byte value, vocab 256.  There are
no special tokens: no BOS, no EOS, no PAD (``bos_token_id``/``eos_token_id``/
``pad_token_id`` are null in the config).  Any byte string is a valid prompt.

Note: the pydoc topic text differs between Python versions, so the data hash
(recorded in the model card) and thus the weights depend on the interpreter's
version; the torch/CPU build can also change float rounding.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "configs" / "models" / "bytes-llama"
DEFAULT_TEXT_DIR = REPO_ROOT / "configs" / "text"

# Held-out topics: sorted topic keys whose index i satisfies i % HELDOUT_MOD == HELDOUT_REM.
# (With Python 3.11 this is 10 of 79 topics, ~48.7 KB, ~10% of the bytes.)
HELDOUT_MOD = 8
HELDOUT_REM = 2

SEQ_LEN = 256  # training window and evaluation window, in bytes
CALIB_BYTES = 48 * 1024
CALIB_CHUNKS = 12

DEFAULT_STEPS = 450  # ~0.65 s/step on 2 idle cores -> ~5 min
DEFAULT_SEED = 0
BATCH_SIZE = 16
PEAK_LR = 3e-3
MIN_LR_FRAC = 0.1
WARMUP_STEPS = 30
WEIGHT_DECAY = 0.01
GRAD_CLIP = 1.0

SAMPLE_PROMPT = "The for statement"
SAMPLE_NEW_BYTES = 80


# --------------------------------------------------------------------------- data


def topic_split() -> tuple[list[str], list[str]]:
    """(training keys, held-out keys), both sorted; deterministic."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    heldout = [k for i, k in enumerate(keys) if i % HELDOUT_MOD == HELDOUT_REM]
    train = [k for i, k in enumerate(keys) if i % HELDOUT_MOD != HELDOUT_REM]
    return train, heldout


def join_topics(keys: list[str]) -> str:
    """Each topic's text, trailing newlines normalised, separated by one blank line."""
    from pydoc_data.topics import topics

    return "".join(topics[k].rstrip("\n") + "\n\n" for k in keys)


def encode(text: str) -> np.ndarray:
    """Byte-level tokens: id = UTF-8 byte value (0..255)."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)


def decode(ids) -> str:
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def calib_text(train_text: str, total: int = CALIB_BYTES, chunks: int = CALIB_CHUNKS) -> str:
    """~``total`` bytes of training text: ``chunks`` evenly spaced pieces, cut on line boundaries.

    Cutting only at newlines (ASCII) keeps the result valid UTF-8.
    """
    data = train_text.encode("utf-8")
    per = total // chunks
    stride = len(data) // chunks
    pieces = []
    for c in range(chunks):
        start = c * stride
        if start > 0:  # move to the start of the next line
            nl = data.find(b"\n", start)
            start = len(data) if nl < 0 else nl + 1
        end = data.rfind(b"\n", start, start + per)
        if end < 0:
            continue
        pieces.append(data[start : end + 1])
    return b"".join(pieces).decode("utf-8")


def data_sha256(train_text: str, heldout_text: str) -> str:
    h = hashlib.sha256()
    h.update(train_text.encode("utf-8"))
    h.update(b"\0")
    h.update(heldout_text.encode("utf-8"))
    return h.hexdigest()


# --------------------------------------------------------------------------- model


def make_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=256,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
        hidden_act="silu",
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=0.0,
        initializer_range=0.02,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        use_cache=True,
    )


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_at(step: int, steps: int, peak: float = PEAK_LR, warmup: int = WARMUP_STEPS) -> float:
    """Linear warmup to ``peak`` then cosine decay to ``MIN_LR_FRAC * peak`` at ``steps``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (MIN_LR_FRAC + (1 - MIN_LR_FRAC) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


# --------------------------------------------------------------------------- evaluation


def heldout_nll(model, ids: np.ndarray, seq_len: int = SEQ_LEN, batch: int = 16) -> tuple[float, int]:
    """Mean next-byte NLL (nats) over ``ids`` in non-overlapping windows of ``seq_len``.

    Each window is scored independently (no context carried across windows);
    within a window positions 1..len-1 are predicted, so a full window yields
    ``seq_len - 1`` predictions.  A final partial window of >= 2 bytes is
    included.  Returns (mean NLL per predicted byte, number of predicted bytes).
    """
    import torch
    import torch.nn.functional as F

    windows = [ids[i : i + seq_len] for i in range(0, len(ids), seq_len)]
    windows = [w for w in windows if len(w) >= 2]
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        full = [w for w in windows if len(w) == seq_len]
        rest = [w for w in windows if len(w) != seq_len]
        groups = [full[i : i + batch] for i in range(0, len(full), batch)] + [[w] for w in rest]
        for g in groups:
            x = torch.from_numpy(np.stack(g))
            logits = model(input_ids=x).logits.float()
            nll = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
            )
            total += float(nll)
            count += x[:, 1:].numel()
    return total / count, count


def unigram_nll(train_ids: np.ndarray, eval_ids: np.ndarray, seq_len: int = SEQ_LEN) -> float:
    """Mean NLL (nats) of an add-one-smoothed byte unigram model fit on the training bytes,

    scored on exactly the bytes :func:`heldout_nll` predicts (all but each window's first).
    """
    counts = np.bincount(train_ids, minlength=256).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    mask = np.ones(len(eval_ids), dtype=bool)
    mask[::seq_len] = False
    return float(-logp[eval_ids[mask]].mean())


def greedy(model, prompt: str, new_bytes: int = SAMPLE_NEW_BYTES) -> str:
    """Greedy continuation (full recompute each step; no cache, no generate())."""
    import torch

    ids = list(prompt.encode("utf-8"))
    model.eval()
    with torch.no_grad():
        for _ in range(new_bytes):
            x = torch.tensor([ids[-1024:]], dtype=torch.long)
            ids.append(int(model(input_ids=x).logits[0, -1].argmax()))
    return decode(ids)


# --------------------------------------------------------------------------- training


def train(steps: int, seed: int, train_ids: np.ndarray, log_every: int = 50):
    import torch
    import torch.nn.functional as F
    from transformers import LlamaForCausalLM

    seed_everything(seed)
    model = LlamaForCausalLM(make_config()).float()
    model.train()

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=PEAK_LR,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    rng = np.random.default_rng(seed)
    data = torch.from_numpy(train_ids)
    n_starts = len(train_ids) - SEQ_LEN
    t0 = time.time()
    losses: list[float] = []
    for step in range(steps):
        lr = lr_at(step, steps)
        for g in opt.param_groups:
            g["lr"] = lr
        starts = rng.integers(0, n_starts, size=BATCH_SIZE)
        x = torch.stack([data[s : s + SEQ_LEN] for s in starts])
        logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        losses.append(loss.item())
        if step % log_every == 0 or step == steps - 1:
            print(
                f"step {step:5d}/{steps}  loss {losses[-1]:.4f}  lr {lr:.2e}  elapsed {time.time() - t0:7.1f}s",
                flush=True,
            )
    wall = time.time() - t0
    return model, losses, wall


# --------------------------------------------------------------------------- outputs


def _fmt_size(path: Path) -> str:
    return f"{path.stat().st_size:,} bytes" if path.exists() else "-"


def write_card(out: Path, info: dict) -> None:
    files = sorted(p.name for p in out.iterdir() if p.is_file() and p.name != "README.md")
    sizes = "\n".join(f"| `{f}` | {_fmt_size(out / f)} |" for f in files)
    text = f"""# bytes-llama: the llmtrt built-in default model

A tiny **trained** Llama-family decoder (`LlamaForCausalLM`, grouped-query attention)
used as the project's default model, so that accuracy comparisons (fp16 / int8 / int4
against fp32) measure something real. It is *not* a useful language model; it has
learned the statistics of Python's built-in help text.

Made reproducibly, offline, on CPU by `exporter/train_fixture.py`:

```
{info["command"]}
```

## Architecture

| field | value |
|---|---|
| vocab_size | 256 (byte-level) |
| hidden_size | 256 |
| num_hidden_layers | 4 |
| num_attention_heads | 8 (head_dim 32) |
| num_key_value_heads | 2 (GQA, 4 query heads per KV head) |
| intermediate_size | 688 (SwiGLU) |
| rope_theta | 10000 (default RoPE) |
| max_position_embeddings | 1024 (trained on windows of {SEQ_LEN}) |
| rms_norm_eps | 1e-5 |
| tie_word_embeddings | true |
| attention / mlp bias | none |
| dtype | float32 |
| parameters | {info["params"]:,} |

## Tokenisation

Byte-level: **token id = UTF-8 byte value** (0..255); decode with
`bytes(ids).decode("utf-8", errors="replace")`. No tokenizer files are needed.
There are **no special tokens**: no BOS, no EOS, no PAD (`bos_token_id`,
`eos_token_id` and `pad_token_id` are null). Generation therefore never stops by
itself; always give a length limit. Do not prepend a BOS.

## Data

Python's `pydoc_data.topics.topics` (the text behind `help("for")` etc.), from
Python {info["python"]}: {info["n_topics"]} topics. Topics are sorted by key; those whose
index `i` satisfies `i % {HELDOUT_MOD} == {HELDOUT_REM}` are **held out** ({len(info["heldout_keys"])} topics,
{info["heldout_bytes"]:,} bytes), the rest are for training ({info["train_bytes"]:,} bytes). Each topic's text
(trailing newlines stripped) is followed by a blank line.
Data SHA-256 (train text, NUL, held-out text): `{info["data_sha256"]}`.
The topic text changes between Python versions, so other versions give other weights.

Held-out topics: {", ".join(f"`{k}`" for k in info["heldout_keys"])}.

Companion text files written by the same script:

* `configs/text/calib.txt`: **calibration** text, {info["calib_bytes"]:,} bytes drawn from the
  **training** topics ({CALIB_CHUNKS} evenly spaced pieces, cut at line ends).
* `configs/text/eval.txt`: **evaluation** text, {info["eval_bytes"]:,} bytes, exactly the
  **held-out** set above (never trained on). Perplexity over it, in non-overlapping
  windows of {SEQ_LEN}, reproduces the held-out figure below.

## Training

| field | value |
|---|---|
| seed | {info["seed"]} (python `random`, numpy, torch) |
| steps | {info["steps"]} |
| batch | {BATCH_SIZE} random windows of {SEQ_LEN} bytes |
| optimizer | AdamW (betas 0.9/0.95, weight decay {WEIGHT_DECAY} on matrices), grad clip {GRAD_CLIP} |
| schedule | linear warmup {WARMUP_STEPS} steps to {PEAK_LR:g}, cosine to {MIN_LR_FRAC:g}x |
| threads | torch.set_num_threads({info["threads"]}) |
| wall time | {info["wall"]:.0f} s ({info["machine"]}) |
| software | torch {info["torch"]}, transformers {info["transformers"]}, numpy {info["numpy"]} |

## Results

| metric | nats / byte | perplexity / byte |
|---|---|---|
| final training loss (mean of last 20 steps) | {info["train_loss"]:.4f} | {math.exp(info["train_loss"]):.3f} |
| **held-out** (`eval.txt`) | {info["eval_nll"]:.4f} | **{math.exp(info["eval_nll"]):.3f}** |
| unigram baseline (add-one byte frequencies from training text) on held-out | {info["unigram_nll"]:.4f} | {math.exp(info["unigram_nll"]):.3f} |

Held-out loss is the mean next-byte cross-entropy over {info["eval_count"]:,} predictions: the held-out
bytes cut into non-overlapping windows of {SEQ_LEN}, each scored independently (the first byte
of each window is context only), fp32, from `LlamaForCausalLM.from_pretrained` on CPU.

Greedy continuation ({SAMPLE_NEW_BYTES} bytes) of `{SAMPLE_PROMPT!r}`:

```
{info["sample"]}
```

## Files

| file | size |
|---|---|
{sizes}
"""
    (out / "README.md").write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tools.train_fixture",
        description="Train the built-in byte-level GQA Llama fixture on pydoc topic text (CPU, offline).",
    )
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"model directory (default {DEFAULT_OUT})")
    ap.add_argument(
        "--text-dir",
        type=Path,
        default=DEFAULT_TEXT_DIR,
        help=f"where calib.txt / eval.txt go (default {DEFAULT_TEXT_DIR})",
    )
    ap.add_argument(
        "--steps", type=int, default=DEFAULT_STEPS, help=f"training steps (default {DEFAULT_STEPS})"
    )
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"random seed (default {DEFAULT_SEED})")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = ap.parse_args(argv)

    import torch
    import transformers
    from transformers import LlamaForCausalLM

    torch.set_num_threads(args.threads)

    train_keys, heldout_keys = topic_split()
    train_text = join_topics(train_keys)
    heldout_text = join_topics(heldout_keys)
    train_ids = encode(train_text)
    eval_ids = encode(heldout_text)
    calib = calib_text(train_text)

    args.text_dir.mkdir(parents=True, exist_ok=True)
    (args.text_dir / "calib.txt").write_bytes(calib.encode("utf-8"))
    (args.text_dir / "eval.txt").write_bytes(heldout_text.encode("utf-8"))
    print(
        f"data: {len(train_keys)} train topics ({len(train_ids):,} B), {len(heldout_keys)} held-out "
        f"({len(eval_ids):,} B); calib.txt {len(calib.encode()):,} B",
        flush=True,
    )

    model, losses, wall = train(args.steps, args.seed, train_ids)

    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    for f in args.out.iterdir():  # safetensors may create the file 0600; make it world-readable
        if f.is_file():
            f.chmod(0o644)

    # Every figure in the card comes from the saved files, not the in-memory model.
    reloaded = LlamaForCausalLM.from_pretrained(args.out, dtype=torch.float32)
    eval_nll, eval_count = heldout_nll(reloaded, eval_ids)
    uni = unigram_nll(train_ids, eval_ids)
    sample = greedy(reloaded, SAMPLE_PROMPT)

    cmd_parts = ["python -m tools.train_fixture"]
    if args.out.resolve() != DEFAULT_OUT:
        cmd_parts.append(f"--out {args.out}")
    if args.text_dir.resolve() != DEFAULT_TEXT_DIR:
        cmd_parts.append(f"--text-dir {args.text_dir}")
    cmd_parts += [f"--steps {args.steps}", f"--seed {args.seed}"]
    if args.threads != 2:
        cmd_parts.append(f"--threads {args.threads}")

    info = {
        "command": " ".join(cmd_parts),
        "params": sum(p.numel() for p in reloaded.parameters()),
        "python": platform.python_version(),
        "n_topics": len(train_keys) + len(heldout_keys),
        "heldout_keys": heldout_keys,
        "heldout_bytes": len(eval_ids),
        "train_bytes": len(train_ids),
        "data_sha256": data_sha256(train_text, heldout_text),
        "calib_bytes": len(calib.encode("utf-8")),
        "eval_bytes": len(eval_ids),
        "seed": args.seed,
        "steps": args.steps,
        "threads": args.threads,
        "wall": wall,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs visible",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "train_loss": float(np.mean(losses[-20:])),
        "eval_nll": eval_nll,
        "eval_count": eval_count,
        "unigram_nll": uni,
        "sample": sample,
    }
    write_card(args.out, info)

    print(f"saved to {args.out}  (params {info['params']:,}, train wall {wall:.0f}s)")
    print(f"final train loss {info['train_loss']:.4f} nats/byte (ppl {math.exp(info['train_loss']):.3f})")
    print(
        f"held-out        {eval_nll:.4f} nats/byte (ppl {math.exp(eval_nll):.3f}) over {eval_count:,} bytes"
    )
    print(f"unigram         {uni:.4f} nats/byte (ppl {math.exp(uni):.3f})")
    print(f"sample: {sample!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
