import json

import pytest

from llmtrt.exporter.config import MODELS_DIR, ModelConfig, preset_names, resolve_model
from llmtrt.exporter.errors import LlmtrtUserError


def test_presets_load_with_derived_head_dim():
    names = preset_names()
    for name in ("tiny", "tinyllama-1.1b", "llama-3.2-1b", "llama-3.1-8b"):
        assert name in names
    tiny = resolve_model("tiny").config
    assert tiny.head_dim == tiny.hidden_size // tiny.num_attention_heads
    assert tiny.num_key_value_groups == 2
    llama32 = resolve_model("llama-3.2-1b").config
    assert llama32.rope_scaling.rope_type == "llama3" and llama32.tie_word_embeddings
    assert 1.1e9 < llama32.num_parameters < 1.3e9  # 1.24B in the model card
    assert 7.9e9 < resolve_model("llama-3.1-8b").config.num_parameters < 8.1e9


def test_config_is_frozen():
    cfg = resolve_model("tiny").config
    with pytest.raises(AttributeError):
        cfg.hidden_size = 1


def _write(tmp_path, raw):
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return tmp_path


BASE = {"architectures": ["LlamaForCausalLM"], "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
        "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2}


def test_hf_config_fields(tmp_path):
    raw = dict(BASE, head_dim=8, rope_theta=500000.0, tie_word_embeddings=True,
               rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    cfg = ModelConfig.from_hf_dir(_write(tmp_path, raw))
    assert (cfg.head_dim, cfg.rope_theta, cfg.tie_word_embeddings) == (8, 500000.0, True)
    assert cfg.rope_scaling.factor == 8.0 and cfg.rope_scaling.original_max_position_embeddings == 64


def test_transformers5_rope_parameters(tmp_path):
    raw = dict(BASE, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1234.0})
    cfg = ModelConfig.from_hf_dir(_write(tmp_path, raw))
    assert cfg.rope_scaling.rope_type == "linear" and cfg.rope_theta == 1234.0


@pytest.mark.parametrize("raw, message", [
    (dict(BASE, architectures=["MistralForCausalLM"]), "MistralForCausalLM is not supported"),
    ({k: v for k, v in BASE.items() if k != "hidden_size"}, "missing required field 'hidden_size'"),
    (dict(BASE, hidden_size="16"), "field 'hidden_size' must be int"),
    (dict(BASE, num_key_value_heads=3), "multiple of num_key_value_heads 3"),
    (dict(BASE, rope_scaling={"rope_type": "yarn", "factor": 2.0}), "'yarn' is not supported"),
])
def test_hf_config_errors_name_the_field(tmp_path, raw, message):
    with pytest.raises(LlmtrtUserError, match=message):
        ModelConfig.from_hf_dir(_write(tmp_path, raw))


def test_missing_and_corrupt_config(tmp_path):
    with pytest.raises(LlmtrtUserError, match="no config.json"):
        ModelConfig.from_hf_dir(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(LlmtrtUserError, match="not valid JSON"):
        ModelConfig.from_hf_dir(tmp_path)


def test_yaml_unknown_key_and_type(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text((MODELS_DIR / "tiny.yaml").read_text() + "hiden_size: 3\n")
    with pytest.raises(LlmtrtUserError, match=r"m.yaml:\d+: hiden_size: unknown key"):
        ModelConfig.from_yaml(p)
    p.write_text((MODELS_DIR / "tiny.yaml").read_text().replace("num_hidden_layers: 2", "num_hidden_layers: two"))
    with pytest.raises(LlmtrtUserError, match=r"m.yaml:\d+: num_hidden_layers: expected an integer"):
        ModelConfig.from_yaml(p)


@pytest.mark.parametrize("field, value", [("num_hidden_layers", 10**9), ("vocab_size", 10**12)])
def test_absurd_sizes_fail_at_once_naming_file_and_field(tmp_path, field, value):
    import re
    import time

    p = tmp_path / "huge.yaml"
    text = (MODELS_DIR / "tiny.yaml").read_text()
    p.write_text(re.sub(rf"^{field}: .*$", f"{field}: {value}", text, flags=re.M))
    t0 = time.perf_counter()
    with pytest.raises(LlmtrtUserError, match=rf"huge.yaml:\d+: .*{field} {value} is beyond"):
        resolve_model(str(p))
    assert time.perf_counter() - t0 < 1.0


def test_unknown_preset_lists_presets():
    with pytest.raises(LlmtrtUserError, match="presets: .*tiny"):
        resolve_model("no-such-model")
