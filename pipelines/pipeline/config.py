"""A pipeline config: YAML -> frozen dataclasses (configs/pipelines/*.yaml), its targets checked against
what each backend can build, and the Stage record the planner makes of it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmtrt import configs
from llmtrt.exporter.yaml_schema import load_dataclass
from llmtrt.pipelines.errors import LlmtrtUserError

PRECISIONS = ("fp32", "fp16", "bf16", "int8-sq", "int8-wo", "int4-awq", "int4-rtn")
BACKENDS = ("onnxruntime", "tensorrt-rtx", "tensorrt")
STAGE_KINDS = ("export", "quantize", "build", "validate", "compare", "report")
ENGINE_PRECISION = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16", "int8-sq": "int8", "int8-wo": "int8",
                    "int4-awq": "int4", "int4-rtn": "int4"}
RECORD = "stage.json"
BUDGET_BASES = ("int4-awq", "int4-rtn")   # precisions a budget ("int4-awq@ppl+3%") may start from


def check_precision(name: str) -> str:
    """``name`` (a precision, or a base precision with an accuracy budget: ``int4-awq@ppl+3%``, searched by
    ``llmtrt quantize --max-ppl-increase``) if valid; its base precision is returned."""
    from llmtrt.pipelines.precision.mix import parse_precision

    base, ppl, kl = parse_precision(name)
    if base not in PRECISIONS:
        raise ValueError(f"{base!r} is not one of {', '.join(PRECISIONS)}" + (f" (in {name!r})" if base != name else ""))
    if (ppl is not None or kl is not None) and base not in BUDGET_BASES:
        raise ValueError(f"{name!r}: a budget starts from {' or '.join(BUDGET_BASES)}")
    return base


def _check_precisions(names: list[str]) -> None:
    for name in names:
        try:
            check_precision(name)
        except ValueError as exc:
            raise ValueError(f"precisions: {exc}") from None


def engine_precision(name: str) -> str:
    """What ``llmtrt build --precision`` gets for a pipeline precision (a mix builds as its base's)."""
    return ENGINE_PRECISION[check_precision(name)]


@dataclass(frozen=True)
class Calibration:
    text: str = "configs/text/calib.txt"
    samples: int = 16
    seq_len: int = 128


@dataclass(frozen=True)
class Evaluation:
    text: str = "configs/text/eval.txt"
    max_tokens: int = 4096
    thresholds: str | None = None  # default: configs/compare_thresholds.yaml


@dataclass(frozen=True)
class Validation:
    batch: int = 2
    decode_steps: int = 4
    tolerances: str | None = None  # default: configs/tolerances.yaml


@dataclass(frozen=True)
class Profiles:
    max_batch: int = 1
    max_prompt: int = 128
    max_kv: int = 512


@dataclass(frozen=True)
class Target:
    """One engine build per (precision, target); ``onnxruntime`` builds nothing (runs the ONNX).

    ``version`` names the backend release the engines are meant for (e.g. "10.3" for JetPack 6's
    TensorRT, "1.7" for TensorRT-RTX); the plan checks the lowering and precisions against what
    that release can build (``engine.backends``). Without it the newest declared release is assumed.
    """

    backend: str = field(default="tensorrt-rtx", metadata={"choices": BACKENDS})
    version: str | None = None
    lower: str = field(default="native", metadata={"choices": ("native", "inline", "plugin")})
    target_cc: list[str] = field(default_factory=list)
    precisions: list[str] = field(default_factory=list)  # empty: all; names as PipelineConfig.precisions
    opt_level: int = 3

    def __post_init__(self) -> None:
        _check_precisions(self.precisions)

    @property
    def label(self) -> str:
        cc = "+".join(c.replace(".", "") for c in self.target_cc) if self.target_cc else "default"
        return self.backend if self.backend == "onnxruntime" else f"{self.backend}-sm{cc}"


@dataclass(frozen=True)
class PipelineConfig:
    model: str
    name: str = "pipeline"
    seed: int = 0
    ops: str = field(default="standard", metadata={"choices": ("custom", "standard", "decomposed")})
    kv_cache: str = field(default="dynamic", metadata={"choices": ("dynamic", "static")})
    max_positions: int | None = None
    # fp16, int8-sq, ..., or a base precision with an accuracy budget: int4-awq@ppl+3%, int4-awq@kl0.01
    precisions: list[str] = field(default_factory=lambda: ["fp32"])
    calibration: Calibration = field(default_factory=Calibration)
    evaluation: Evaluation = field(default_factory=Evaluation)
    validation: Validation = field(default_factory=Validation)
    profiles: Profiles = field(default_factory=Profiles)
    targets: list[Target] = field(default_factory=lambda: [Target(backend="onnxruntime")])

    def __post_init__(self) -> None:
        _check_precisions(self.precisions)
        if "fp32" not in self.precisions:
            raise LlmtrtUserError("precisions must include fp32: it is the reference every other one is judged by")
        if len(set(self.precisions)) != len(self.precisions):
            raise LlmtrtUserError("precisions lists a precision twice")


def load_config(path: str | Path) -> PipelineConfig:
    """The pipeline YAML as a PipelineConfig; relative file paths in it resolve against the repo root
    first (for the shipped configs), then against the YAML's directory."""
    return load_dataclass(PipelineConfig, path)


def resolve_path(value: str, config_path: Path | None = None) -> Path:
    """A file a config names: absolute, else relative to the working directory, then to the YAML's own
    directory; ``configs/...`` also names llmtrt's shipped files (installed as package data)."""
    path = Path(value)
    candidates = [path] if path.is_absolute() else [Path.cwd() / value]
    if config_path is not None and not path.is_absolute():
        candidates.append(config_path.parent / value)
    if not path.is_absolute() and path.parts[:1] == ("configs",):
        candidates.append(configs.path(*path.parts[1:]))
    for candidate in candidates:
        if candidate.exists():
            return candidate
    raise LlmtrtUserError(f"{value}: no such file (looked in {', '.join(str(c.parent) for c in candidates)})")


@dataclass
class Stage:
    kind: str
    name: str
    out_dir: Path
    inputs: list[Path]
    options: dict[str, Any]
    action: Callable[[Stage], dict[str, Any]]


_STANDARD_OPS = ("RMSNormalization", "RotaryEmbedding", "Attention")


def target_problems(config: PipelineConfig, target: Target) -> list[str]:
    """Why ``target`` cannot build ``config``'s engines as written (empty: it can), each with its fix.

    Facts come from the backend's declared capabilities per release (engine/backends.py): which
    ops its ONNX parser imports natively, whether llmtrt's Python plugins work, which precisions build.
    """
    from llmtrt.pipelines.engine.backends import BACKENDS as BACKEND_RECORDS

    be = BACKEND_RECORDS[target.backend]
    caps = be.capabilities_for(target.version)
    release = f"{target.backend} {target.version or caps.versions}"
    problems = []
    if target.target_cc and not be.supports_target_cc:
        problems.append(f"target_cc needs tensorrt-rtx; {target.backend} builds for the GPU it runs on: drop target_cc")
    if target.lower == "plugin" and not caps.python_plugins:
        problems.append(f"lower: plugin needs llmtrt's Python plugins (tensorrt.plugin with AOT kernels, TensorRT "
                        f">= 10.9), which {release} does not have: use lower: native (ops its parser lacks are "
                        "inlined from their ONNX functions) or lower: inline")
    if config.ops == "standard":
        from llmtrt.exporter.kv_cache import get_layout

        in_place = get_layout(config.kv_cache).fixed_capacity  # updated in place: TensorScatter
        needed = set(_STANDARD_OPS) | ({"TensorScatter"} if in_place else set())
        missing = sorted(needed - caps.native_ops)
        if missing:
            problems.append(f"ops: standard needs native {', '.join(missing)} importers, which {release}'s "
                            "ONNX parser lacks (standard ops have no function body to inline): use ops: custom "
                            "with lower: native or inline")
        elif target.lower != "native":
            problems.append("ops: standard graphs have nothing to inline or route to plugins: use lower: native")
    bad = [p for p in target.precisions or config.precisions if engine_precision(p) not in caps.precisions]
    if bad:
        problems.append(f"precisions {', '.join(bad)}: {release} builds {', '.join(sorted(caps.precisions))} "
                        "engines: drop them from this target's precisions")
    return problems


def check_targets(config: PipelineConfig, config_path: Path | None = None) -> None:
    """A user error naming the file, each target that cannot work as written, and the fix."""
    where = str(config_path) if config_path is not None else "the pipeline config"
    lines = []
    for i, target in enumerate(config.targets):
        if target.backend == "onnxruntime":
            continue
        try:
            problems = target_problems(config, target)
        except LlmtrtUserError as exc:
            problems = [f"{exc}"]
        name = f"targets[{i}] ({target.backend}" + (f" {target.version}" if target.version else "") + ")"
        lines += [f"  {name}: {problem}" for problem in problems]
    if lines:
        raise LlmtrtUserError(f"{where}: these targets cannot build as written:\n" + "\n".join(lines))


