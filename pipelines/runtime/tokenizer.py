"""Text <-> token ids for a model, as its checkpoint defines them: bytes for the built-in model, tokenizer.json otherwise.

    tok = load_tokenizer("out/onnx")            # an artifact dir, an HF dir, a preset name
    ids = tok.prompt_ids("Once upon a time")    # [BOS] + text ids when the checkpoint adds BOS
    tok.encode(text)                            # text ids only (cut into windows, each given tok.bos_id)
    stream = tok.stream(ids)                    # incremental detokenization after the prompt
    chunk = stream.push(next_id)                # prompt text + every chunk == tok.decode(all ids)

Which tokenizer a model gets:

1. a ``tokenizer.json`` in the directory: an artifact's own copy (export and quantize carry the
   tokenizer files), else the checkpoint its manifest names; loaded with the ``tokenizers`` library;
2. otherwise a model with ``vocab_size == 256`` (bytes-llama) or a random-init shape preset
   (``tiny``: any ids below the vocabulary size do) gets :class:`ByteTokenizer`;
3. otherwise it is a user error: a real checkpoint without its tokenizer would be scored on
   meaningless ids.

BOS, EOS ids, pad and the chat template come from the JSON files beside tokenizer.json
(:mod:`llmtrt.pipelines.runtime.tokenizer_files`); ``load_tokenizer(..., add_bos=False)`` is ``--no-bos``.
"""

from __future__ import annotations

import codecs
import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from llmtrt.pipelines.errors import LlmtrtUserError
from llmtrt.pipelines.runtime.tokenizer_files import TOKENIZER_FILE, SpecialTokens, read_special_tokens

BYTE_VOCAB = 256
__all__ = ["BYTE_VOCAB", "TOKENIZER_FILE", "ByteTokenizer", "HFTokenizer", "SpecialTokens", "TextStream",
           "Tokenizer", "load_tokenizer"]


class TextStream(Protocol):
    """Incremental detokenization: ``push`` returns the text a new id completes ("" while a character
    is unfinished); ``finish`` flushes what is held back."""

    def push(self, token: int) -> str: ...

    def finish(self) -> str: ...


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    special: SpecialTokens

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def stream(self, prefix: Sequence[int] = ()) -> TextStream: ...

    def chat_text_ids(self, text: str) -> list[int]: ...


class _Special:
    """What both tokenizers derive from their :class:`SpecialTokens`."""

    special: SpecialTokens

    @property
    def bos_id(self) -> int | None:
        return self.special.bos_id

    @property
    def add_bos(self) -> bool:
        return self.special.add_bos

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return self.special.eos_ids

    @property
    def pad_id(self) -> int | None:
        return self.special.pad_id

    @property
    def chat_template(self) -> str | None:
        return self.special.chat_template

    def prompt_ids(self, text: str) -> list[int]:
        """What the model reads for a prompt: BOS (when the checkpoint adds it), then the text's ids."""
        return ([self.special.bos_id] if self.special.add_bos else []) + self.encode(text)

    def chat_ids(self, prompt: str, system: str | None = None) -> list[int]:
        """A one-turn conversation through the checkpoint's chat template, ready for the assistant's reply."""
        from llmtrt.pipelines.runtime.chat import render_chat

        if not self.special.chat_template:
            raise LlmtrtUserError(f"--chat: {self.name} has no chat template (no chat_template in "
                                  "tokenizer_config.json, no chat_template.jinja); drop --chat to continue plain text")
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        text = render_chat(self.special.chat_template, messages, bos_token=self.special.bos_token,
                           eos_token=self.special.eos_token, where=f"{self.name}: chat_template")
        return self.chat_text_ids(text)

    def with_bos(self, add_bos: bool | None):
        """A copy that adds BOS (True), never adds it (False, ``--no-bos``) or does as the checkpoint says (None)."""
        if add_bos is None or add_bos == self.special.add_bos:
            return self
        if add_bos and self.special.bos_id is None:
            raise LlmtrtUserError(f"{self.name}: no BOS token is defined, so none can be added")
        special = dataclasses.replace(self.special, add_bos=add_bos, add_bos_from="--no-bos" if not add_bos else "option")
        clone = copy.copy(self)
        object.__setattr__(clone, "special", special)
        return clone


# --------------------------------------------------------------------------------------------
# bytes (the built-in model)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ByteTokenizer(_Special):
    """Token id = UTF-8 byte value; no BOS (bytes-llama). EOS ids, if any, from the checkpoint's files."""

    name: str = "bytes"
    vocab_size: int = BYTE_VOCAB
    special: SpecialTokens = SpecialTokens()

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        bad = [i for i in ids if not 0 <= int(i) < BYTE_VOCAB]
        if bad:
            raise ValueError(f"byte tokenizer: ids outside 0..255: {bad[:5]}")
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def stream(self, prefix: Sequence[int] = ()) -> TextStream:
        return _ByteStream()

    def chat_text_ids(self, text: str) -> list[int]:
        return self.encode(text)


class _ByteStream:
    """An incremental UTF-8 decoder: a multi-byte character comes out once its last byte arrives."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._decoder.decode(bytes([int(token)]))

    def finish(self) -> str:
        return self._decoder.decode(b"", final=True)


# --------------------------------------------------------------------------------------------
# tokenizer.json
# --------------------------------------------------------------------------------------------
class HFTokenizer(_Special):
    """A ``tokenizers`` tokenizer.json and the special tokens of the files beside it.

    ``encode`` gives the text's ids only (no special tokens): callers add BOS where a sequence starts
    (:meth:`prompt_ids`, windows of text). ``decode`` skips special tokens, so BOS and EOS never
    show up in text."""

    def __init__(self, path: Path, special: SpecialTokens | None = None) -> None:
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
        self.special = special if special is not None else read_special_tokens(Path(path).parent, self._tok)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def chat_text_ids(self, text: str) -> list[int]:
        """Ids of rendered chat text: the special tokens written in it are matched, none are added."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def stream(self, prefix: Sequence[int] = ()) -> TextStream:
        return _DecodeStream(self, list(prefix))


class _DecodeStream:
    """``tokenizers.decoders.DecodeStream`` primed with the prompt, so a new token's leading space (which
    a decoder strips at the start of a text) is kept: prompt text + chunks == decode(prompt + new)."""

    def __init__(self, tokenizer: HFTokenizer, prefix: list[int]) -> None:
        self._tok = tokenizer
        self.prefix, self.ids, self.emitted = list(prefix), [], ""
        self._stream = self._new_stream(self.prefix)

    def _new_stream(self, prefix: list[int]) -> Any:
        from tokenizers.decoders import DecodeStream

        try:
            return DecodeStream(ids=prefix, skip_special_tokens=True)
        except TypeError:  # tokenizers < 0.22: prime it by stepping through the prefix
            stream = DecodeStream(skip_special_tokens=True)
            for token in prefix:
                stream.step(self._tok._tok, token)
            return stream

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        try:
            chunk = self._stream.step(self._tok._tok, int(token)) or ""
        except Exception:  # a decoder whose output for earlier ids changes with later ones: resync once
            chunk = self._resync()
        self.emitted += chunk
        return chunk

    def _resync(self) -> str:
        head = self._tok.decode(self.prefix)
        text = self._tok.decode(self.prefix + self.ids)
        self._stream = self._new_stream(self.prefix + self.ids)
        done = head + self.emitted
        return text[len(done):] if text.startswith(done) and not text.endswith("\ufffd") else ""

    def finish(self) -> str:
        """What is still held back (an unfinished character, decoded with U+FFFD), once, at the end."""
        head = self._tok.decode(self.prefix)
        text = self._tok.decode(self.prefix + self.ids)
        done = head + self.emitted
        chunk = text[len(done):] if text.startswith(done) else ""
        self.emitted += chunk
        return chunk


# --------------------------------------------------------------------------------------------
# which tokenizer a model has
# --------------------------------------------------------------------------------------------
def load_tokenizer(model: str | Path, add_bos: bool | None = None) -> Tokenizer:
    """The tokenizer for a preset name, an HF checkpoint directory or an artifact directory (manifest.json).

    ``add_bos``: None does what the checkpoint says; False never adds BOS (``--no-bos``)."""
    path = Path(model)
    if path.is_dir() and (path / "manifest.json").is_file():
        tok = _from_manifest(path)
    elif path.is_dir() and (path / TOKENIZER_FILE).is_file() and not (path / "config.json").is_file():
        tok = HFTokenizer(path / TOKENIZER_FILE)
    else:
        from llmtrt.exporter.config import resolve_model

        source = resolve_model(str(model))
        tok = _for_source(source.checkpoint_dir, source.config.vocab_size, str(model))
    return tok.with_bos(add_bos)


def _from_manifest(directory: Path) -> Tokenizer:
    from llmtrt.exporter.config import resolve_model
    from llmtrt.pipelines.artifacts import read_manifest

    manifest = read_manifest(directory, required={"config": dict})
    spec = manifest.get("model_source")
    vocab = manifest.get("config", {}).get("vocab_size")
    if (directory / TOKENIZER_FILE).is_file():  # the artifact's own copy
        return _checked(HFTokenizer(directory / TOKENIZER_FILE), vocab)
    if spec:
        try:
            source = resolve_model(str(spec))
        except LlmtrtUserError:
            source = None
        if source is not None:
            return _for_source(source.checkpoint_dir, source.config.vocab_size, str(directory))
    if vocab == BYTE_VOCAB:
        return ByteTokenizer(special=read_special_tokens(directory))
    raise LlmtrtUserError(f"{directory / 'manifest.json'}: model_source {spec!r} cannot be found and the model is not "
                          f"byte-level (vocab_size {vocab}); put the model's {TOKENIZER_FILE} in {directory}")


def _checked(tok: HFTokenizer, vocab_size: int | None) -> HFTokenizer:
    if vocab_size is not None and tok.vocab_size > vocab_size:
        raise LlmtrtUserError(f"{tok.name}: {tok.vocab_size} tokens but the model's vocab_size is {vocab_size}; "
                              "use the tokenizer that came with the checkpoint")
    if tok.add_bos and vocab_size is not None and not 0 <= tok.bos_id < vocab_size:
        raise LlmtrtUserError(f"{tok.name}: BOS id {tok.bos_id} is outside the model's vocabulary (0..{vocab_size - 1}); "
                              "fix tokenizer_config.json / generation_config.json, or pass --no-bos")
    return tok


def _for_source(checkpoint_dir: Path | None, vocab_size: int, what: str) -> Tokenizer:
    if checkpoint_dir is not None and (checkpoint_dir / TOKENIZER_FILE).is_file():
        return _checked(HFTokenizer(checkpoint_dir / TOKENIZER_FILE), vocab_size)
    if checkpoint_dir is None:  # random-init shape preset: any ids below vocab_size are valid
        if vocab_size < BYTE_VOCAB:
            raise LlmtrtUserError(f"{what}: vocab_size {vocab_size} < 256, too small for byte tokens")
        return ByteTokenizer()
    if vocab_size == BYTE_VOCAB:
        return ByteTokenizer(special=read_special_tokens(checkpoint_dir))
    raise LlmtrtUserError(f"{checkpoint_dir}: no {TOKENIZER_FILE} and the model is not byte-level "
                          f"(vocab_size {vocab_size}); copy the model's {TOKENIZER_FILE} into {checkpoint_dir}")
