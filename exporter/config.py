"""ModelConfig: the shape of a Llama-family decoder, from an HF config.json or a YAML preset.

Configs are data with checks: unknown keys, wrong types and inconsistent shapes are user errors
that name the key and the file.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmtrt import configs
from llmtrt.exporter.errors import LlmtrtUserError

MODELS_DIR = configs.path("models")

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
# Sizes past these are typos, not models (the largest Llamas: vocab 128k, hidden 16k, 126 layers); they
# are refused at once instead of hanging in an allocation.
SIZE_LIMITS = {"vocab_size": 1 << 22, "hidden_size": 1 << 16, "intermediate_size": 1 << 18, "num_hidden_layers": 1024,
               "num_attention_heads": 1024, "num_key_value_heads": 1024, "head_dim": 1024,
               "max_position_embeddings": 1 << 24}
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    """Rotary frequency scaling. ``rope_type`` "default" means none."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise LlmtrtUserError(
                f"rope_scaling.rope_type {self.rope_type!r} is not supported; use one of {', '.join(ROPE_TYPES)}"
            )
        if self.factor <= 0:
            raise LlmtrtUserError(f"rope_scaling.factor must be > 0, got {self.factor}")


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a Llama decoder. ``head_dim`` is derived when absent (0)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int = 0
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    name: str = "custom"

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            if self.hidden_size % self.num_attention_heads:
                raise LlmtrtUserError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                    f"{self.num_attention_heads}; set head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        for key, limit in SIZE_LIMITS.items():
            value = getattr(self, key)
            if value <= 0:
                raise LlmtrtUserError(f"{key} must be a positive integer, got {value}")
            if value > limit:
                raise LlmtrtUserError(f"{key} {value} is beyond what llmtrt handles (at most {limit}); "
                                      "check the value")
        if self.num_attention_heads % self.num_key_value_heads:
            raise LlmtrtUserError(
                f"num_attention_heads {self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads {self.num_key_value_heads} (grouped-query attention)"
            )
        if self.head_dim % 2:
            raise LlmtrtUserError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")

    # Derived fields -------------------------------------------------------------------------
    @property
    def num_key_value_groups(self) -> int:
        """Query heads that share one K/V head."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def num_parameters(self) -> int:
        h, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        q = self.num_attention_heads * self.head_dim
        per_layer = h * q + 2 * h * kv + q * h + 3 * h * self.intermediate_size + 2 * h
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * per_layer + emb + h

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # Loaders --------------------------------------------------------------------------------
    @classmethod
    def from_hf_dir(cls, directory: str | Path) -> ModelConfig:
        path = Path(directory) / "config.json"
        if not path.is_file():
            raise LlmtrtUserError(f"{path}: no config.json here; pass an HF checkpoint directory or a preset name")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise LlmtrtUserError(f"{path}: not valid JSON ({exc}); re-save the checkpoint with save_pretrained") from None
        if not isinstance(raw, dict):
            raise LlmtrtUserError(f"{path}: expected a JSON object at the top level")
        archs = raw.get("architectures") or []
        if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
            found = ", ".join(archs) or f"model_type={raw.get('model_type')!r}"
            raise LlmtrtUserError(
                f"{path}: architecture {found} is not supported; llmtrt exports {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        return cls.from_hf_dict(raw, source=str(path), name=Path(directory).resolve().name)

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], *, source: str = "config", name: str = "custom") -> ModelConfig:
        if raw.get("attention_bias") or raw.get("mlp_bias"):
            raise LlmtrtUserError(f"{source}: attention_bias/mlp_bias=true is not supported (Llama has no biases)")
        if raw.get("hidden_act", "silu") != "silu":
            raise LlmtrtUserError(f"{source}: hidden_act {raw['hidden_act']!r} is not supported; Llama uses 'silu'")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        for key in required:
            if key not in raw:
                raise LlmtrtUserError(f"{source}: missing required field {key!r}")
        values = {
            "vocab_size": raw["vocab_size"],
            "hidden_size": raw["hidden_size"],
            "intermediate_size": raw["intermediate_size"],
            "num_hidden_layers": raw["num_hidden_layers"],
            "num_attention_heads": raw["num_attention_heads"],
            "num_key_value_heads": raw.get("num_key_value_heads") or raw["num_attention_heads"],
            "head_dim": raw.get("head_dim") or 0,
            "rms_norm_eps": raw.get("rms_norm_eps", 1e-6),
            "rope_theta": _hf_rope_theta(raw),
            "max_position_embeddings": raw.get("max_position_embeddings", 2048),
            "tie_word_embeddings": raw.get("tie_word_embeddings", False),
        }
        _check_types(values, source)
        scaling = _hf_rope_scaling(raw, source)
        try:
            return cls(**values, rope_scaling=scaling, name=name)
        except LlmtrtUserError as exc:
            raise LlmtrtUserError(f"{source}: {exc}") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> ModelConfig:
        """A YAML preset (ModelConfig fields; ``name`` defaults to the file name), errors at file:line."""
        from llmtrt.exporter.yaml_schema import load_dataclass

        path = Path(path)
        config = load_dataclass(cls, path)
        return config if config.name != "custom" else config.replace(name=path.stem)


_FIELD_TYPES = {
    "vocab_size": int, "hidden_size": int, "intermediate_size": int, "num_hidden_layers": int,
    "num_attention_heads": int, "num_key_value_heads": int, "head_dim": int,
    "max_position_embeddings": int, "rms_norm_eps": float, "rope_theta": float,
    "tie_word_embeddings": bool, "name": str,
}


def _check_types(values: dict[str, Any], source: str) -> None:
    for key, value in values.items():
        expected = _FIELD_TYPES.get(key)
        if expected is None:
            continue
        ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            values[key] = float(value)
            ok = True
        if not ok:
            raise LlmtrtUserError(
                f"{source}: field {key!r} must be {expected.__name__}, got {type(value).__name__} {value!r}"
            )


def _hf_rope_theta(raw: dict[str, Any]) -> float:
    theta = raw.get("rope_theta")
    params = raw.get("rope_parameters")
    if theta is None and isinstance(params, dict):
        theta = params.get("rope_theta")
    return float(theta if theta is not None else 10000.0)


def _hf_rope_scaling(raw: dict[str, Any], source: str) -> RopeScaling:
    # transformers 4.x writes "rope_scaling"; 5.x writes "rope_parameters" (which also holds rope_theta).
    scaling = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    if not isinstance(scaling, dict):
        raise LlmtrtUserError(f"{source}: rope_scaling must be an object or null")
    rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type not in ROPE_TYPES:
        raise LlmtrtUserError(
            f"{source}: rope_scaling type {rope_type!r} is not supported; use one of {', '.join(ROPE_TYPES)}"
        )
    if rope_type == "default":
        return RopeScaling()
    if "factor" not in scaling:
        raise LlmtrtUserError(f"{source}: rope_scaling of type {rope_type!r} needs 'factor'")
    kwargs: dict[str, Any] = {"rope_type": rope_type, "factor": float(scaling["factor"])}
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if key not in scaling:
                raise LlmtrtUserError(f"{source}: llama3 rope_scaling needs {key!r}")
        kwargs["low_freq_factor"] = float(scaling["low_freq_factor"])
        kwargs["high_freq_factor"] = float(scaling["high_freq_factor"])
        kwargs["original_max_position_embeddings"] = int(scaling["original_max_position_embeddings"])
    return RopeScaling(**kwargs)


# Presets and model specs ------------------------------------------------------------------------

def preset_names() -> list[str]:
    """YAML shape presets (random init) and built-in HF checkpoints (directories with config.json)."""
    names = [p.stem for p in MODELS_DIR.glob("*.yaml")]
    names += [p.name for p in MODELS_DIR.iterdir() if (p / "config.json").is_file()] if MODELS_DIR.is_dir() else []
    return sorted(names)


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: an HF checkpoint directory (weights) or a shape preset (random init)."""

    config: ModelConfig
    checkpoint_dir: Path | None  # None: random init from ``seed``
    spec: str
    seed: int = 0

    @property
    def is_checkpoint(self) -> bool:
        return self.checkpoint_dir is not None


def resolve_model(spec: str, *, seed: int = 0) -> ModelSource:
    """Turn ``--model`` into a ModelSource: an HF directory path, a built-in checkpoint or a YAML preset."""
    path = Path(spec)
    if path.is_dir():
        return ModelSource(ModelConfig.from_hf_dir(path), path, spec, seed)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return ModelSource(ModelConfig.from_yaml(path), None, spec, seed)
    builtin = MODELS_DIR / spec
    if (builtin / "config.json").is_file():
        return ModelSource(ModelConfig.from_hf_dir(builtin), builtin, spec, seed)
    preset = MODELS_DIR / f"{spec}.yaml"
    if preset.is_file():
        return ModelSource(ModelConfig.from_yaml(preset), None, spec, seed)
    if path.exists():
        raise LlmtrtUserError(f"--model {spec}: not a directory or a .yaml preset file")
    raise LlmtrtUserError(
        f"--model {spec}: no such directory or preset; presets: {', '.join(preset_names())} "
        "(or pass an HF checkpoint directory with config.json + safetensors)"
    )

