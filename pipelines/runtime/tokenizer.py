"""Text <-> token ids for a model: bytes for the built-in byte-level model, ``tokenizer.json`` otherwise.

    tok = load_tokenizer("configs/models/bytes-llama")   # or an HF dir, a preset name, an artifact dir
    ids = tok.encode("The for statement")
    text = tok.decode(ids)

Which tokenizer a model gets:

1. a ``tokenizer.json`` in the directory (or, for an artifact directory, in the checkpoint its
   manifest names) is loaded with the ``tokenizers`` library;
2. otherwise a model with ``vocab_size == 256`` (bytes-llama) or a random-init shape preset
   (``tiny``: any ids below the vocabulary size do) gets :class:`ByteTokenizer`;
3. otherwise it is a user error: a real checkpoint without its tokenizer would be scored on
   meaningless ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from llmtrt.pipelines.errors import LlmtrtUserError

TOKENIZER_FILE = "tokenizer.json"
BYTE_VOCAB = 256


class Tokenizer(Protocol):
    name: str
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass(frozen=True)
class ByteTokenizer:
    """Token id = UTF-8 byte value; no special tokens (bytes-llama)."""

    name: str = "bytes"
    vocab_size: int = BYTE_VOCAB

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        bad = [i for i in ids if not 0 <= int(i) < BYTE_VOCAB]
        if bad:
            raise ValueError(f"byte tokenizer: ids outside 0..255: {bad[:5]}")
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """A ``tokenizers`` tokenizer.json; encode adds no special tokens (scoring plain text)."""

    def __init__(self, path: Path) -> None:
        try:
            from tokenizers import Tokenizer as _Tokenizer
        except ImportError:
            raise LlmtrtUserError(f"{path}: reading tokenizer.json needs the `tokenizers` package; "
                                  "pip install 'llmtrt[tokenizers]'") from None

        try:
            self._tok = _Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on a malformed file
            raise LlmtrtUserError(f"{path}: not a readable tokenizers file ({exc}); "
                                  "copy the model's original tokenizer.json") from None
        self.name = str(path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(model: str | Path) -> Tokenizer:
    """The tokenizer for a preset name, an HF checkpoint directory or an artifact directory (manifest.json)."""
    path = Path(model)
    if path.is_dir() and (path / TOKENIZER_FILE).is_file() and not (path / "config.json").is_file():
        return HFTokenizer(path / TOKENIZER_FILE)
    if path.is_dir() and (path / "manifest.json").is_file():
        return _from_manifest(path)
    from llmtrt.exporter.config import resolve_model

    source = resolve_model(str(model))
    return _for_source(source.checkpoint_dir, source.config.vocab_size, str(model))


def _from_manifest(directory: Path) -> Tokenizer:
    from llmtrt.exporter.config import resolve_model
    from llmtrt.pipelines.artifacts import read_manifest

    manifest = read_manifest(directory, required={"config": dict})
    spec = manifest.get("model_source")
    vocab = manifest.get("config", {}).get("vocab_size")
    if spec:
        try:
            source = resolve_model(str(spec))
        except LlmtrtUserError:
            source = None
        if source is not None:
            return _for_source(source.checkpoint_dir, source.config.vocab_size, str(directory))
    if vocab == BYTE_VOCAB:
        return ByteTokenizer()
    raise LlmtrtUserError(f"{directory / 'manifest.json'}: model_source {spec!r} cannot be found and the model is not "
                          f"byte-level (vocab_size {vocab}); put the model's {TOKENIZER_FILE} in {directory}")


def _for_source(checkpoint_dir: Path | None, vocab_size: int, what: str) -> Tokenizer:
    if checkpoint_dir is not None and (checkpoint_dir / TOKENIZER_FILE).is_file():
        tok = HFTokenizer(checkpoint_dir / TOKENIZER_FILE)
        if tok.vocab_size > vocab_size:
            raise LlmtrtUserError(f"{checkpoint_dir / TOKENIZER_FILE}: {tok.vocab_size} tokens but the model's "
                                  f"vocab_size is {vocab_size}; use the tokenizer that came with the checkpoint")
        return tok
    if checkpoint_dir is None:  # random-init shape preset: any ids below vocab_size are valid
        if vocab_size < BYTE_VOCAB:
            raise LlmtrtUserError(f"{what}: vocab_size {vocab_size} < 256, too small for byte tokens")
        return ByteTokenizer()
    if vocab_size == BYTE_VOCAB:
        return ByteTokenizer()
    raise LlmtrtUserError(f"{checkpoint_dir}: no {TOKENIZER_FILE} and the model is not byte-level "
                          f"(vocab_size {vocab_size}); copy the model's {TOKENIZER_FILE} into {checkpoint_dir}")
