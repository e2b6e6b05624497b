import json
import shutil

import pytest

from llmtrt.exporter.config import MODELS_DIR
from llmtrt.exporter.errors import LlmtrtUserError
from llmtrt.pipelines.runtime.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "for x in 'héllo' → ok\n"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert ids[:3] == [102, 111, 114]
    assert tok.decode(ids) == text
    with pytest.raises(ValueError, match="outside 0..255"):
        tok.decode([1, 300])


def test_builtin_byte_model_and_random_preset_get_bytes():
    assert isinstance(load_tokenizer("bytes-llama"), ByteTokenizer)
    assert isinstance(load_tokenizer(MODELS_DIR / "bytes-llama"), ByteTokenizer)
    assert isinstance(load_tokenizer("tiny"), ByteTokenizer)  # random init: any id < vocab is valid


def _word_level_tokenizer(path):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, "the": 1, "for": 2, "statement": 3}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.decoder = tokenizers.decoders.WordPiece()
    tok.save(str(path))


def _hf_dir(tmp_path, vocab_size):
    d = tmp_path / "ckpt"
    d.mkdir()
    cfg = json.loads((MODELS_DIR / "bytes-llama" / "config.json").read_text())
    cfg["vocab_size"] = vocab_size
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_tokenizer_json_is_loaded_with_tokenizers(tmp_path):
    d = _hf_dir(tmp_path, 512)
    _word_level_tokenizer(d / "tokenizer.json")
    tok = load_tokenizer(d)
    assert isinstance(tok, HFTokenizer)
    assert tok.encode("the for statement") == [1, 2, 3]
    assert tok.encode("the banana") == [1, 0]
    assert tok.decode([1, 2, 3]) == "the for statement"


def test_artifact_dir_follows_its_manifest(tmp_path):
    d = _hf_dir(tmp_path, 512)
    _word_level_tokenizer(d / "tokenizer.json")
    art = tmp_path / "art"
    art.mkdir()
    (art / "manifest.json").write_text(json.dumps({"model_source": str(d), "config": {"vocab_size": 512}}))
    assert load_tokenizer(art).encode("for") == [2]
    (art / "manifest.json").write_text(json.dumps({"model_source": "bytes-llama", "config": {"vocab_size": 256}}))
    assert isinstance(load_tokenizer(art), ByteTokenizer)


def test_checkpoint_without_tokenizer_is_a_user_error(tmp_path):
    d = _hf_dir(tmp_path, 512)
    with pytest.raises(LlmtrtUserError, match=r"no tokenizer.json .*vocab_size 512.*copy the model's tokenizer.json"):
        load_tokenizer(d)
    art = tmp_path / "art"
    art.mkdir()
    (art / "manifest.json").write_text(json.dumps({"model_source": str(tmp_path / "gone"),
                                                   "config": {"vocab_size": 32000}}))
    with pytest.raises(LlmtrtUserError, match="cannot be found and the model is not byte-level"):
        load_tokenizer(art)


def test_bad_tokenizer_files_are_user_errors(tmp_path):
    pytest.importorskip("tokenizers")
    d = _hf_dir(tmp_path, 512)
    (d / "tokenizer.json").write_text("{not json")
    with pytest.raises(LlmtrtUserError, match="not a readable tokenizers file"):
        load_tokenizer(d)
    (tmp_path / "b").mkdir()
    small = _hf_dir(tmp_path / "b", 3)
    _word_level_tokenizer(small / "tokenizer.json")
    with pytest.raises(LlmtrtUserError, match="4 tokens but the model's vocab_size is 3"):
        load_tokenizer(small)


def test_builtin_checkpoint_copy_with_vocab_256_uses_bytes(tmp_path):
    d = tmp_path / "copy"
    shutil.copytree(MODELS_DIR / "bytes-llama", d)
    assert isinstance(load_tokenizer(d), ByteTokenizer)


# --------------------------------------------------------------------------------------------
# special tokens as the checkpoint defines them
# --------------------------------------------------------------------------------------------
@pytest.fixture
def llama3_tok_dir(tmp_path):
    pytest.importorskip("tokenizers")
    from tests.conftest import write_llama3_style_tokenizer

    d = tmp_path / "l3"
    ids = write_llama3_style_tokenizer(d)
    return d, ids


def test_bos_follows_the_post_processor_when_tokenizer_config_is_silent(llama3_tok_dir):
    d, ids = llama3_tok_dir
    tok = load_tokenizer(d)
    assert tok.add_bos and tok.bos_id == ids["<|begin_of_text|>"]
    assert tok.special.add_bos_from == "tokenizer.json post-processor"
    assert tok.eos_ids == (ids["<|end_of_text|>"], ids["<|eot_id|>"])  # a list in generation_config.json
    text_ids = tok.encode("the for statement")
    assert ids["<|begin_of_text|>"] not in text_ids                    # encode: the text's ids only
    assert tok.prompt_ids("the for statement") == [tok.bos_id, *text_ids]
    assert tok.with_bos(False).prompt_ids("the for statement") == text_ids  # --no-bos
    assert tok.add_bos  # with_bos returned a copy


def test_tokenizer_config_add_bos_token_wins_and_the_disagreement_is_noted(llama3_tok_dir):
    d, ids = llama3_tok_dir
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "add_bos_token": False}))
    tok = load_tokenizer(d)
    assert not tok.add_bos and tok.prompt_ids("x") == tok.encode("x")
    assert tok.special.add_bos_from == "tokenizer_config.json add_bos_token"
    assert any("add_bos_token false" in n and "post-processor adds" in n for n in tok.special.notes)


def test_add_bos_token_true_without_a_post_processor(tmp_path):
    pytest.importorskip("tokenizers")
    d = _hf_dir(tmp_path, 512)
    _word_level_tokenizer(d / "tokenizer.json")
    (d / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "bos_token": {"content": "the"}}))
    tok = load_tokenizer(d)
    assert tok.bos_id == 1 and tok.prompt_ids("for statement") == [1, 2, 3]
    assert tok.eos_ids == ()  # bytes-llama's config.json: eos_token_id null


def test_eos_and_pad_fall_back_to_config_json(tmp_path):
    d = _hf_dir(tmp_path, 512)
    _word_level_tokenizer(d / "tokenizer.json")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "bos_token_id": 1, "eos_token_id": 3, "pad_token_id": 0}))
    tok = load_tokenizer(d)
    assert (tok.bos_id, tok.eos_ids, tok.pad_id, tok.add_bos) == (1, (3,), 0, False)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 3]}))
    assert load_tokenizer(d).eos_ids == (2, 3)


def test_no_bos_defined_cannot_be_forced(tmp_path):
    d = _hf_dir(tmp_path, 512)
    _word_level_tokenizer(d / "tokenizer.json")
    with pytest.raises(LlmtrtUserError, match="no BOS token is defined"):
        load_tokenizer(d, add_bos=True)


# --------------------------------------------------------------------------------------------
# incremental detokenization
# --------------------------------------------------------------------------------------------
def _byte_fallback_tokenizer(path):
    """A sentencepiece-style BPE (Metaspace, byte fallback, leading-space Strip decoder): stories260K's pipeline."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, normalizers, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    merges = []
    for word in ("▁Once", "▁upon", "▁a", "▁time", ",", "▁there", "▁was", "▁little", "▁girl", "▁ok"):
        for ch in word:
            vocab.setdefault(ch, len(vocab))
        for end in range(2, len(word) + 1):  # "▁O" + "n" -> "▁On", ...: every prefix is a token
            if word[:end] not in vocab:
                merges.append((word[:end - 1], word[end - 1]))
                vocab[word[:end]] = len(vocab)
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.save(str(path))


@pytest.mark.parametrize("add_bos", [True, False])
def test_stream_keeps_the_space_after_the_prompt_and_whole_characters(tmp_path, add_bos):
    d = _hf_dir(tmp_path, 512)
    _byte_fallback_tokenizer(d / "tokenizer.json")
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "add_bos_token": add_bos}))
    tok = load_tokenizer(d)
    prompt = tok.prompt_ids("Once upon a time, there was")
    assert (prompt[0] == 1) == add_bos
    new = tok.encode(" a little girl 🐍 ok é")[1:]  # drop the "▁" the normalizer prepends to a text
    stream = tok.stream(prompt)
    chunks = [stream.push(t) for t in new] + [stream.finish()]
    printed = "".join(chunks)
    assert printed.startswith(" a little girl")             # the old decode(new ids) lost this space
    assert tok.decode(prompt) + printed == tok.decode(prompt + new)
    assert tok.decode(prompt) == "Once upon a time, there was"  # BOS never shows in text
    assert "🐍" in chunks                                   # 4 byte tokens come out as one character
    stream = tok.stream(prompt)
    partial = [stream.push(t) for t in new[:-1]]             # ends inside "é" (2 byte-fallback tokens)
    assert stream.finish() == "\ufffd" and tok.decode(prompt) + "".join(partial) + "\ufffd" == tok.decode(prompt + new[:-1])


# --------------------------------------------------------------------------------------------
# an artifact's own tokenizer files
# --------------------------------------------------------------------------------------------
def test_copied_files_make_an_artifact_self_contained(tmp_path, llama3_tok_dir):
    from llmtrt.pipelines.runtime.tokenizer_files import copy_tokenizer_files

    d, ids = llama3_tok_dir
    art = tmp_path / "art"
    art.mkdir()
    assert copy_tokenizer_files(d, art) == ["generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    (art / "manifest.json").write_text(json.dumps({"model_source": str(tmp_path / "moved-away"),
                                                   "config": {"vocab_size": 384}}))
    tok = load_tokenizer(art)  # the model source is gone: the artifact's copy is used
    assert tok.name == str(art / "tokenizer.json")
    assert tok.prompt_ids("for") == load_tokenizer(d).prompt_ids("for")
    assert tok.eos_ids == (ids["<|end_of_text|>"], ids["<|eot_id|>"]) and tok.chat_template


def test_generation_config_is_derived_from_config_json_when_absent(tmp_path):
    from llmtrt.pipelines.runtime.tokenizer_files import copy_tokenizer_files

    d = _hf_dir(tmp_path, 512)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "bos_token_id": 1, "eos_token_id": [2, 7]}))
    art = tmp_path / "art"
    art.mkdir()
    assert copy_tokenizer_files(d, art) == ["generation_config.json"]
    assert json.loads((art / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": [2, 7]}
    assert copy_tokenizer_files(None, art) == []
