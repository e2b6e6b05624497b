"""genai_config.json: what onnxruntime-genai needs to run an llmtrt ONNX artifact as it is.

    config, why_not = genai_config(exported, special, context_length=512)
    write_runtime_files(tmp_dir, exported, tokenizer_dir)   # tokenizer files + genai_config.json

onnxruntime-genai (``og.Model(artifact_dir)``) reads genai_config.json for the decoder's file, IO
names, heads, layers and special tokens, and the tokenizer files beside it (tokenizer.json,
tokenizer_config.json). Our graphs use its IO names (``input_ids``, ``attention_mask``,
``position_ids``, ``past_key_values.%d.key``, ``present.%d.key``, ``logits``). What genai feeds and
what our KV-cache layouts take:

- dynamic layout: past in, past + seq out, an attention mask over past + seq. genai feeds exactly
  that with ``past_present_share_buffer: false`` (it copies present to past each step).
  ``past_present_share_buffer: true`` would hand the graph a max_length buffer as past and expect
  the graph to write into it in place; our graph concatenates, so it is never set for this layout.
- a layout with extra inputs (static: ``write_indices``): genai has no way to feed them, so no
  genai_config.json is written and the manifest says why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmtrt.exporter.files import write_json_atomically
from llmtrt.pipelines.runtime.tokenizer_files import SpecialTokens

GENAI_CONFIG = "genai_config.json"
MODEL_TYPE = "llama"


def genai_config(exported: Any, special: SpecialTokens, context_length: int) -> tuple[dict[str, Any] | None, str]:
    """(the genai_config.json payload, "") for an artifact onnxruntime-genai can run, else (None, why not).

    ``exported`` is an :class:`~llmtrt.exporter.onnx_export.ExportedModel` (its IO spec and layout are
    what the written graph has); ``special`` the checkpoint's special tokens."""
    from llmtrt.exporter.kv_cache import get_layout

    layout = get_layout(exported.kv_cache)
    if layout.extra_inputs:
        return None, (f"the {layout.name} KV cache takes {', '.join(layout.extra_inputs)}, which onnxruntime-genai "
                      "cannot feed; export with --kv-cache dynamic for onnxruntime-genai")
    inputs = {t.name for t in exported.io.inputs}
    outputs = {t.name for t in exported.io.outputs}
    needed = {"input_ids", "attention_mask", "position_ids", "past_key_values.0.key"} - inputs
    needed |= {"logits", "present.0.key"} - outputs
    if needed:
        return None, f"the graph lacks {', '.join(sorted(needed))}, which onnxruntime-genai needs"
    cfg = exported.config
    eos = list(special.eos_ids)
    decoder = {
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "filename": exported.onnx_path.name,
        "head_size": cfg.head_dim,
        "hidden_size": cfg.hidden_size,
        "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                   "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
        "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value"},
        "num_attention_heads": cfg.num_attention_heads,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_key_value_heads": cfg.num_key_value_heads,
    }
    model = {
        # genai's defaults when a checkpoint names no BOS / pad (its model builder does the same)
        "bos_token_id": special.bos_id if special.bos_id is not None else 1,
        "context_length": context_length,
        "decoder": decoder,
        # a model without EOS (bytes-llama) gets -1: an id no token has, so only max_length stops it
        "eos_token_id": eos if len(eos) > 1 else eos[0] if eos else -1,
        "pad_token_id": special.pad_id if special.pad_id is not None else eos[0] if eos else 0,
        "type": MODEL_TYPE,
        "vocab_size": cfg.vocab_size,
    }
    search = {
        "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
        "max_length": context_length, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
        "num_return_sequences": 1, "past_present_share_buffer": layout.fixed_capacity, "repetition_penalty": 1.0,
        "temperature": 1.0, "top_k": 50, "top_p": 1.0,
    }
    return {"model": model, "search": search}, ""


def write_runtime_files(directory: Path, exported: Any, tokenizer_dir: Path | None) -> dict[str, Any]:
    """Into ``directory`` (an artifact being written, holding ``exported``'s graph): the tokenizer files
    of ``tokenizer_dir`` and genai_config.json. Returns the manifest fields that record them."""
    from llmtrt.pipelines.engine.profiles import max_positions_from_file
    from llmtrt.pipelines.runtime.tokenizer_files import (
        TOKENIZER_FILE,
        copy_tokenizer_files,
        read_special_tokens,
    )

    directory = Path(directory)
    copied = copy_tokenizer_files(tokenizer_dir, directory)
    hf = None
    if (directory / TOKENIZER_FILE).is_file():
        try:
            from tokenizers import Tokenizer

            hf = Tokenizer.from_file(str(directory / TOKENIZER_FILE))
        except Exception:  # no tokenizers package, or a file it cannot read: ids from the JSON files only
            hf = None
    special = read_special_tokens(directory, hf)
    context = max_positions_from_file(directory / exported.onnx_path.name) or exported.config.max_position_embeddings
    payload, why_not = genai_config(exported, special, context)
    if payload is not None:
        write_json_atomically(directory / GENAI_CONFIG, payload)
    return {"tokenizer_files": copied, "genai_config": GENAI_CONFIG if payload is not None else None,
            **({"genai_config_skipped": why_not} if why_not else {})}
