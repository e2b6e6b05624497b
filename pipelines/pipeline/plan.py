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

import dataclasses
from dataclasses import asdict
from pathlib import Path
from typing import Any

from llmtrt.exporter.config import resolve_model
from llmtrt.exporter.files import sha256_file
from llmtrt.pipelines.artifacts import source_fingerprint
from llmtrt.pipelines.errors import LlmtrtUserError
from llmtrt.pipelines.pipeline.config import (
    PipelineConfig,
    Stage,
    check_targets,
    engine_precision,
    resolve_path,
)


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
    default_layout = next(f.default for f in dataclasses.fields(config) if f.name == "kv_cache")
    export_dir = out / "onnx" / (config.ops + ("" if config.kv_cache == default_layout else f"-{config.kv_cache}"))
    artifact = {"fp32": export_dir}
    result = [Stage("export", "export", export_dir, [], {
        "model": config.model, "model_hash": source_fingerprint(resolve_model(config.model, seed=config.seed)),
        "seed": config.seed, "ops": config.ops, "kv_cache": config.kv_cache, "max_positions": config.max_positions,
    }, stages.export)]
    calib = resolve_path(config.calibration.text, config_path)
    for precision in config.precisions[1:] if config.precisions[0] == "fp32" else config.precisions:
        if precision == "fp32":
            continue
        artifact[precision] = out / precision
        result.append(Stage("quantize", f"quantize:{precision}", out / precision, [export_dir], {
            "precision": precision, "calib_text": str(calib), "calib_sha256": sha256_file(calib),
            "samples": config.calibration.samples, "seq_len": config.calibration.seq_len,
        }, stages.quantize))
    for job in matrix(config, config_path):
        if job["backend"] == "onnxruntime":
            continue
        precision = job["precision"]
        engine_dir = out / "engines" / job["label"] / precision
        result.append(Stage("build", f"build:{job['label']}:{precision}", engine_dir, [artifact[precision]], {
            "precision": engine_precision(precision), "backend": job["backend"], "lower": job["lower"],
            "target_cc": [c for c in job["target_cc"].split(",") if c], "profiles": asdict(config.profiles),
        }, stages.build))
    tolerances = resolve_path(config.validation.tolerances or "configs/tolerances.yaml", config_path)
    for precision, directory in artifact.items():
        result.append(Stage("validate", f"validate:{precision}", out / "reports" / "validate" / precision,
                            [directory], {"batch": config.validation.batch,
                                          "decode_steps": config.validation.decode_steps,
                                          "tolerances": str(tolerances),
                                          "tolerances_sha256": sha256_file(tolerances)}, stages.validate))
    evaluation = resolve_path(config.evaluation.text, config_path)
    thresholds = resolve_path(config.evaluation.thresholds or "configs/compare_thresholds.yaml", config_path)
    result.append(Stage("compare", "compare", out / "reports" / "compare", list(artifact.values()), {
        "precisions": list(artifact), "eval_text": str(evaluation), "eval_sha256": sha256_file(evaluation),
        "max_tokens": config.evaluation.max_tokens, "thresholds": str(thresholds),
        "thresholds_sha256": sha256_file(thresholds),
    }, stages.compare))
    return result


