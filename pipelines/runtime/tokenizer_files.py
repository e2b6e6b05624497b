"""A checkpoint's tokenizer files: the special tokens they define, and copying them into an artifact.

    special = read_special_tokens(Path("Llama-3.2-1B"), hf_tokenizer)   # BOS/EOS/pad ids, add_bos, chat template
    copy_tokenizer_files(Path("Llama-3.2-1B"), artifact_tmp_dir)        # the artifact becomes self-contained

Where each fact comes from (the first file that has it):

==================  ====================================================================================
``bos_id``          tokenizer_config.json ``bos_token`` (looked up in tokenizer.json), generation_config.json
                    ``bos_token_id``, config.json ``bos_token_id``
``eos_ids``         generation_config.json ``eos_token_id`` (an id or a list), config.json ``eos_token_id``,
                    tokenizer_config.json ``eos_token``: every id listed ends generation
``pad_id``          generation_config.json, config.json ``pad_token_id``, tokenizer_config.json ``pad_token``
``add_bos``         tokenizer_config.json ``add_bos_token`` when it says; otherwise whether tokenizer.json's
                    post-processor puts the BOS token first (Llama 3: ``<|begin_of_text|>``)
``chat_template``   tokenizer_config.json ``chat_template`` (a string, or a list with a ``default`` entry),
                    else chat_template.jinja
==================  ====================================================================================
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmtrt.exporter.errors import LlmtrtUserError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
# What an artifact carries so it is self-contained (and what onnxruntime-genai reads beside genai_config.json).
TOKENIZER_FILES = (TOKENIZER_FILE, TOKENIZER_CONFIG, GENERATION_CONFIG, "special_tokens_map.json", CHAT_TEMPLATE_FILE)


@dataclass(frozen=True)
class SpecialTokens:
    """The special tokens of a checkpoint and how its tokenizer uses them."""

    bos_id: int | None = None
    eos_ids: tuple[int, ...] = ()
    pad_id: int | None = None
    add_bos: bool = False          # prepend bos_id to every sequence the model reads (prompts, text windows)
    add_bos_from: str = ""         # which file (or option) decided add_bos, for messages and reports
    bos_token: str = ""            # the token strings, for chat templates
    eos_token: str = ""
    chat_template: str | None = None
    notes: tuple[str, ...] = ()    # disagreements between the files, said once to the user


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file, {} when absent; a corrupt one is a user error naming it."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LlmtrtUserError(f"{path}: not valid JSON ({exc}); copy the checkpoint's original file") from None
    if not isinstance(value, dict):
        raise LlmtrtUserError(f"{path}: expected a JSON object; copy the checkpoint's original file")
    return value


def _token_string(value: Any) -> str:
    """tokenizer_config.json spells a token as a string or as an AddedToken object {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


def _ids(value: Any) -> tuple[int, ...]:
    values = value if isinstance(value, list) else [value]
    return tuple(int(v) for v in values if isinstance(v, int) and not isinstance(v, bool))


def _first_id(*values: Any) -> int | None:
    for value in values:
        ids = _ids(value)
        if ids:
            return ids[0]
    return None


def read_special_tokens(directory: Path, tokenizer: Any = None) -> SpecialTokens:
    """The special tokens the JSON files in ``directory`` define (see the module docstring).

    ``tokenizer`` is the loaded ``tokenizers.Tokenizer`` of ``directory/tokenizer.json`` (None for
    byte-level models), used to look token strings up and to read its post-processor."""
    tc = read_json(directory / TOKENIZER_CONFIG)
    gc = read_json(directory / GENERATION_CONFIG)
    cfg = read_json(directory / "config.json")
    stm = read_json(directory / "special_tokens_map.json")

    def token(name: str) -> str:
        return _token_string(tc.get(name)) or _token_string(stm.get(name))

    def lookup(text: str) -> int | None:
        return tokenizer.token_to_id(text) if tokenizer is not None and text else None

    bos_id = _first_id(lookup(token("bos_token")), gc.get("bos_token_id"), cfg.get("bos_token_id"))
    eos_ids = _ids(gc.get("eos_token_id")) or _ids(cfg.get("eos_token_id")) or _ids(lookup(token("eos_token")))
    pad_id = _first_id(gc.get("pad_token_id"), cfg.get("pad_token_id"), lookup(token("pad_token")))
    pp_adds_bos = _post_processor_adds(tokenizer, bos_id)
    notes: list[str] = []
    if isinstance(tc.get("add_bos_token"), bool):
        add_bos, source = tc["add_bos_token"], f"{TOKENIZER_CONFIG} add_bos_token"
        if pp_adds_bos is not None and pp_adds_bos != add_bos:
            notes.append(f"{directory / TOKENIZER_CONFIG} says add_bos_token {str(add_bos).lower()} but "
                         f"{TOKENIZER_FILE}'s post-processor {'adds' if pp_adds_bos else 'does not add'} BOS; "
                         f"llmtrt follows {TOKENIZER_CONFIG} (transformers 5 follows {TOKENIZER_FILE})")
    else:
        add_bos, source = bool(pp_adds_bos), f"{TOKENIZER_FILE} post-processor"
    if add_bos and bos_id is None:
        notes.append(f"{directory}: the tokenizer asks for BOS but no BOS token is named; none is added")
        add_bos = False
    bos_token = token("bos_token") or (_id_to_token(tokenizer, bos_id) or "")
    eos_token = token("eos_token") or (_id_to_token(tokenizer, eos_ids[0]) if eos_ids else "") or ""
    return SpecialTokens(bos_id, eos_ids, pad_id, add_bos, source, bos_token, eos_token,
                         _chat_template(directory, tc), tuple(notes))


def _id_to_token(tokenizer: Any, token_id: int | None) -> str | None:
    return tokenizer.id_to_token(token_id) if tokenizer is not None and token_id is not None else None


def _post_processor_adds(tokenizer: Any, bos_id: int | None) -> bool | None:
    """Whether tokenizer.json's post-processor puts ``bos_id`` first (None: no tokenizer or no BOS)."""
    if tokenizer is None or bos_id is None:
        return None
    plain = tokenizer.encode("a", add_special_tokens=False).ids
    full = tokenizer.encode("a", add_special_tokens=True).ids
    return len(full) > len(plain) and full[0] == bos_id and full[1:1 + len(plain)] == plain


def _chat_template(directory: Path, tc: dict[str, Any]) -> str | None:
    value = tc.get("chat_template")
    if isinstance(value, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    if isinstance(value, str) and value.strip():
        return value
    file = directory / CHAT_TEMPLATE_FILE
    return file.read_text(encoding="utf-8") if file.is_file() else None


def copy_tokenizer_files(source_dir: Path | None, dest_dir: Path) -> list[str]:
    """Copy the tokenizer files of ``source_dir`` (a checkpoint or an artifact) into ``dest_dir`` (a
    directory being written); returns the names written.

    A checkpoint whose config.json names bos/eos/pad ids but that has no generation_config.json gets
    one holding those ids (what transformers derives from config.json), so the artifact keeps its
    EOS without its config.json."""
    if source_dir is None or not Path(source_dir).is_dir():
        return []
    source_dir, dest_dir = Path(source_dir), Path(dest_dir)
    written = []
    for name in TOKENIZER_FILES:
        if (source_dir / name).is_file():
            shutil.copyfile(source_dir / name, dest_dir / name)
            written.append(name)
    if GENERATION_CONFIG not in written:
        cfg = read_json(source_dir / "config.json")
        ids = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg.get(k) is not None}
        if ids:
            (dest_dir / GENERATION_CONFIG).write_text(json.dumps(ids, indent=2) + "\n", encoding="utf-8")
            written.append(GENERATION_CONFIG)
    return sorted(written)
