"""`llmtrt pipeline`: one YAML runs export -> quantize -> build -> validate -> compare -> report.

    config = load_config("configs/pipelines/demo.yaml")
    summary = run(config, out_dir="out/demo")

The config becomes a plan: an ordered list of stages, each with an output directory, the artifact
directories it reads, and its options. A stage's cache key hashes its options, the manifests of
its inputs (which carry content hashes) and the llmtrt version; a stage whose key matches the
``stage.json`` left by its last successful run is skipped. ``stage.json`` is written last, so an
interrupted stage simply runs again.

Artifact tree under ``--out``::

    onnx/<dialect>/              fp32 export (model.onnx + manifest.json)
    <precision>/                 quantized ONNX (fp16, int8-sq, ...)
    engines/<backend>-<cc>/<precision>/   engine.<precision>.plan + .json
    reports/validate/<precision>/, reports/compare/, reports/report.md|json
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
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


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------
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
    precisions: list[str] = field(default_factory=list, metadata={"choices": PRECISIONS})  # empty: all
    opt_level: int = 3

    @property
    def label(self) -> str:
        cc = "+".join(c.replace(".", "") for c in self.target_cc) if self.target_cc else "default"
        return self.backend if self.backend == "onnxruntime" else f"{self.backend}-sm{cc}"


@dataclass(frozen=True)
class PipelineConfig:
    model: str
    name: str = "pipeline"
    seed: int = 0
    dialect: str = field(default="custom", metadata={"choices": ("custom", "standard", "decomposed")})
    kv_cache: str = field(default="dynamic", metadata={"choices": ("dynamic", "static")})
    max_seq: int | None = None
    precisions: list[str] = field(default_factory=lambda: ["fp32"], metadata={"choices": PRECISIONS})
    calibration: Calibration = field(default_factory=Calibration)
    evaluation: Evaluation = field(default_factory=Evaluation)
    validation: Validation = field(default_factory=Validation)
    profiles: Profiles = field(default_factory=Profiles)
    targets: list[Target] = field(default_factory=lambda: [Target(backend="onnxruntime")])

    def __post_init__(self) -> None:
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


# --------------------------------------------------------------------------------------------
# plan
# --------------------------------------------------------------------------------------------
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
    if config.dialect == "standard":
        needed = set(_STANDARD_OPS) | ({"TensorScatter"} if config.kv_cache == "static" else set())
        missing = sorted(needed - caps.native_ops)
        if missing:
            problems.append(f"dialect: standard needs native {', '.join(missing)} importers, which {release}'s "
                            "ONNX parser lacks (standard ops have no function body to inline): use dialect: custom "
                            "with lower: native or inline")
        elif target.lower != "native":
            problems.append("dialect: standard graphs have nothing to inline or route to plugins: use lower: native")
    bad = [p for p in target.precisions or config.precisions if ENGINE_PRECISION[p] not in caps.precisions]
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


def matrix(config: PipelineConfig, config_path: Path | None = None) -> list[dict[str, Any]]:
    """Build jobs (precision x target) for a CI job matrix; targets that cannot build as written are
    refused (``check_targets``)."""
    check_targets(config, config_path)
    jobs = []
    for target in config.targets:
        for precision in target.precisions or config.precisions:
            if precision not in config.precisions:
                raise LlmtrtUserError(f"targets: {target.label} lists precision {precision!r}, which is not in "
                                      "the pipeline's precisions")
            jobs.append({"precision": precision, "backend": target.backend, "lower": target.lower,
                         "target_cc": ",".join(target.target_cc), "label": target.label,
                         **({"version": target.version} if target.version else {})})
    return jobs


def plan(config: PipelineConfig, out_dir: str | Path, config_path: Path | None = None) -> list[Stage]:
    """The ordered stages the config asks for (targets that cannot build as written are refused first)."""
    from llmtrt.pipelines.pipeline import stages

    check_targets(config, config_path)
    out = Path(out_dir)
    export_dir = out / "onnx" / (config.dialect + ("-static" if config.kv_cache == "static" else ""))
    artifact = {"fp32": export_dir}
    result = [Stage("export", "export", export_dir, [], {
        "model": config.model, "model_hash": stages.model_source_hash(config.model, config.seed),
        "seed": config.seed, "dialect": config.dialect, "kv_cache": config.kv_cache, "max_seq": config.max_seq,
    }, stages.export)]
    calib = resolve_path(config.calibration.text, config_path)
    for precision in config.precisions[1:] if config.precisions[0] == "fp32" else config.precisions:
        if precision == "fp32":
            continue
        artifact[precision] = out / precision
        result.append(Stage("quantize", f"quantize:{precision}", out / precision, [export_dir], {
            "precision": precision, "calib_text": str(calib), "calib_sha256": stages.file_sha256(calib),
            "samples": config.calibration.samples, "seq_len": config.calibration.seq_len,
        }, stages.quantize))
    for job in matrix(config, config_path):
        if job["backend"] == "onnxruntime":
            continue
        precision = job["precision"]
        engine_dir = out / "engines" / job["label"] / precision
        result.append(Stage("build", f"build:{job['label']}:{precision}", engine_dir, [artifact[precision]], {
            "precision": ENGINE_PRECISION[precision], "backend": job["backend"], "lower": job["lower"],
            "target_cc": [c for c in job["target_cc"].split(",") if c], "profiles": asdict(config.profiles),
        }, stages.build))
    tolerances = resolve_path(config.validation.tolerances or "configs/tolerances.yaml", config_path)
    for precision, directory in artifact.items():
        result.append(Stage("validate", f"validate:{precision}", out / "reports" / "validate" / precision,
                            [directory], {"batch": config.validation.batch,
                                          "decode_steps": config.validation.decode_steps,
                                          "tolerances": str(tolerances),
                                          "tolerances_sha256": stages.file_sha256(tolerances)}, stages.validate))
    evaluation = resolve_path(config.evaluation.text, config_path)
    thresholds = resolve_path(config.evaluation.thresholds or "configs/compare_thresholds.yaml", config_path)
    result.append(Stage("compare", "compare", out / "reports" / "compare", list(artifact.values()), {
        "precisions": list(artifact), "eval_text": str(evaluation), "eval_sha256": stages.file_sha256(evaluation),
        "max_tokens": config.evaluation.max_tokens, "thresholds": str(thresholds),
        "thresholds_sha256": stages.file_sha256(thresholds),
    }, stages.compare))
    return result


# --------------------------------------------------------------------------------------------
# run
# --------------------------------------------------------------------------------------------
def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llmtrt")
    except PackageNotFoundError:
        return "0+unknown"


def stage_key(stage: Stage) -> str:
    """Hash of what the stage's result depends on: options, input manifests, tool version."""
    inputs = []
    for directory in stage.inputs:
        manifest = next((p for p in (directory / "manifest.json", directory / RECORD) if p.is_file()), None)
        inputs.append(hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest else "missing")
    payload = {"kind": stage.kind, "options": stage.options, "inputs": inputs, "llmtrt": _version()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _read_record(stage: Stage) -> dict[str, Any] | None:
    path = stage.out_dir / RECORD
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


class Progress:
    """Plain progress lines on stderr; on a terminal, a live line for the running stage."""

    def __init__(self, total: int, quiet: bool = False) -> None:
        self.total, self.quiet, self.index = total, quiet, 0
        self.tty = sys.stderr.isatty()

    def start(self, stage: Stage) -> None:
        self.index += 1
        if self.quiet:
            return
        text = f"[{self.index}/{self.total}] {stage.name} ..."
        print(text, end="\r" if self.tty else "\n", file=sys.stderr, flush=True)

    def done(self, stage: Stage, status: str, seconds: float, note: str = "") -> None:
        if self.quiet:
            return
        clear = "\x1b[2K" if self.tty else ""
        print(f"{clear}[{self.index}/{self.total}] {stage.name}: {status} ({seconds:.1f} s){note}", file=sys.stderr,
              flush=True)


def run(config: PipelineConfig, out_dir: str | Path, *, only: Sequence[str] = (), force: bool = False,
        quiet: bool = False, config_path: Path | None = None) -> dict[str, Any]:
    """Run the plan; returns the summary that report.json holds. Stages of other kinds than ``only``
    must already be cached (their outputs are the inputs of the ones that run)."""
    from llmtrt.pipelines.pipeline import stages

    for kind in only:
        if kind not in STAGE_KINDS:
            raise LlmtrtUserError(f"--only {kind!r}: not a stage; choose from {', '.join(STAGE_KINDS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    steps = plan(config, out, config_path)
    progress = Progress(len(steps) + 1, quiet)
    results = []
    t0 = time.perf_counter()
    for stage in steps:
        progress.start(stage)
        key = stage_key(stage)
        record = _read_record(stage)
        selected = not only or stage.kind in only
        if record is not None and record.get("key") == key and not (force and selected):
            progress.done(stage, "cached", 0.0, " - inputs unchanged, skipped")
            results.append({**record, "status": "cached"})
            continue
        if not selected:
            raise LlmtrtUserError(f"--only {','.join(only)}: stage {stage.name} has no up-to-date result in "
                                  f"{stage.out_dir}; run without --only first")
        t = time.perf_counter()
        stage.out_dir.mkdir(parents=True, exist_ok=True)
        (stage.out_dir / RECORD).unlink(missing_ok=True)
        summary = stage.action(stage)
        seconds = round(time.perf_counter() - t, 3)
        record = {"stage": stage.name, "kind": stage.kind, "key": key, "out_dir": str(stage.out_dir),
                  "seconds": seconds, "summary": summary, "passed": summary.get("passed", True)}
        stages.write_json(stage.out_dir / RECORD, record)
        verdict = "" if record["passed"] else " - FAILED its gate"
        progress.done(stage, "done", seconds, verdict)
        results.append({**record, "status": "ran"})
    report_stage = Stage("report", "report", out / "reports", [], {}, stages.report)
    progress.start(report_stage)
    t = time.perf_counter()
    summary = stages.report(config, out, results, round(time.perf_counter() - t0, 3))
    progress.done(report_stage, "done", time.perf_counter() - t, f" - {summary['report_md']}")
    return summary
