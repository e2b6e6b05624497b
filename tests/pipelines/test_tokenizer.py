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
