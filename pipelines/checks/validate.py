"""`llmtrt validate`: an artifact's numbers against the fp32 PyTorch model, with Polygraphy.

    report = validate("out/onnx", ValidateOptions(batch=2, decode_steps=4, out_dir=Path("out/validate")))
    bool(report)          # passed
    print(report.table())

Runners (pipelines/runners.py) run the same real prompts (text -> token ids, left-padded batch)
through prefill + M decode steps; ``Comparator.run`` collects one iteration per runner and
``Comparator.compare_accuracy`` judges each artifact runner against the PyTorch reference with
per-precision, per-output tolerances from configs/tolerances.yaml. Inside each runner, prefill +
decode must equal one forward over all the tokens (KV-cache consistency). ``layerwise`` marks every
intermediate tensor of the ONNX graph as an output and finds the first node where the error jumps.

Before anything runs, :func:`llmtrt.pipelines.checks.integrity.check_artifact` checks what the
artifact is: manifest hashes, the graph against the config and the source model, every weight
against the source checkpoint, the precision inventory.

Files in ``out_dir`` (written whole): validation.json, outputs.json (every runner's per-step
outputs), inputs.json + reference_outputs.json (each prompt's prefill and decode steps on the
reference's cache, unpadded: see checks/reproduce.py) and, with ``layerwise``, layerwise.json.
The printed ``polygraphy run`` command replays the check by hand with the same verdict.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmtrt import configs
from llmtrt.exporter.errors import LlmtrtUserError
from llmtrt.exporter.files import artifact_dir as artifact_dir_writer
from llmtrt.exporter.files import check_out_dir, write_json_atomically
from llmtrt.pipelines.artifacts import read_manifest
from llmtrt.pipelines.checks.comparisons import _kv_consistency, _output_rows, compare_funcs
from llmtrt.pipelines.checks.integrity import check_artifact
from llmtrt.pipelines.checks.layerwise import layerwise
from llmtrt.pipelines.checks.report import ValidationReport
from llmtrt.pipelines.checks.tolerances import DEFAULT_TOLERANCES, Tolerances, load_tolerances
from llmtrt.pipelines.checks.validation_runner import ONE_PASS, PREFILL, decode_name
from llmtrt.pipelines.engine.profiles import max_positions_from_file

DEFAULT_TEXT = configs.path("text", "eval.txt")


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ValidateOptions:
    batch: int = 2
    decode_steps: int = 4
    prompt_tokens: int = 24          # longest prompt; row r has prompt_tokens - 5 r tokens (left padding)
    text: str | Path | None = None   # default configs/text/eval.txt
    prompt: str | None = None        # one prompt instead of text; decode tokens are the reference's greedy ones
    tolerances: str | Path | None = None
    atol: Mapping[str, float] = field(default_factory=dict)
    rtol: Mapping[str, float] = field(default_factory=dict)
    layerwise: bool = False
    reference: str | Path | None = None  # layerwise reference export; default: re-export the fp32 model
    out_dir: Path | None = None


def text_prompts(tokens: Sequence[int], batch: int, prompt_tokens: int, decode_steps: int
                 ) -> tuple[list[list[int]], np.ndarray]:
    """``batch`` prompts of decreasing length from consecutive stretches of text, and the text's
    next ``decode_steps`` tokens after each (the decode tokens every backend is fed)."""
    lengths = [max(1, prompt_tokens - 5 * r) for r in range(batch)]
    need = sum(n + decode_steps for n in lengths)
    if len(tokens) < need:
        raise LlmtrtUserError(f"the text has {len(tokens)} tokens; --batch {batch} with --decode-steps {decode_steps} "
                              f"needs {need}; pass a longer --text FILE")
    prompts, follow, at = [], [], 0
    for n in lengths:
        prompts.append(list(tokens[at:at + n]))
        follow.append(list(tokens[at + n:at + n + decode_steps]))
        at += n + decode_steps
    return prompts, np.array(follow, dtype=np.int64).reshape(batch, decode_steps)


def prompt_rows(tokens: Sequence[int], batch: int) -> list[list[int]]:
    """One prompt as ``batch`` rows, each a shorter suffix (different lengths exercise left padding)."""
    if not tokens:
        raise LlmtrtUserError("--prompt encodes to no tokens; give a non-empty prompt")
    cut = max(1, len(tokens) // (2 * batch))
    return [list(tokens[min(r * cut, len(tokens) - 1):]) for r in range(batch)]


def greedy_tokens(reference, prompts: list[list[int]], steps: int) -> np.ndarray:
    """The reference runner's greedy continuation of ``prompts`` (the decode tokens for --prompt)."""
    from llmtrt.pipelines.runtime.decoding import Batch, prefill_then_decode

    with reference:
        return prefill_then_decode(reference, Batch.left_padded(prompts), steps=steps).tokens


# --------------------------------------------------------------------------------------------
# validate
# --------------------------------------------------------------------------------------------
@dataclass
class _Setup:
    """Everything a validation run needs, gathered and checked before anything heavy runs."""

    directory: Path
    manifest: dict[str, Any]
    exported: Any
    layout: Any
    tol: Tolerances
    tokenizer: Any
    prompts: list[list[int]]
    source_desc: dict[str, Any]
    plan: Any
    reference: Any
    engine: Path | None = None


def _prepare(artifact_dir: Path, options: ValidateOptions) -> _Setup:
    from llmtrt.exporter.kv_cache import get_layout
    from llmtrt.pipelines.artifacts import load_exported
    from llmtrt.pipelines.checks.validation_runner import DecodePlan
    from llmtrt.pipelines.runtime.artifact_runners import reference_runner
    from llmtrt.pipelines.runtime.decoding import Batch
    from llmtrt.pipelines.runtime.tokenizer import load_tokenizer

    if options.batch < 1 or options.decode_steps < 0 or options.prompt_tokens < 1:
        raise LlmtrtUserError("--batch and the prompt length must be >= 1 and --decode-steps >= 0")
    if options.out_dir is not None:
        check_out_dir(options.out_dir)
    manifest = read_manifest(artifact_dir)
    exported = load_exported(artifact_dir, manifest)
    # a mixed precision ("int4-awq@ppl+3%") is held to its base precision's tolerances
    tol = load_tolerances(options.tolerances or DEFAULT_TOLERANCES, (manifest.get("mix") or {}).get(
        "base", manifest["precision"]))
    tokenizer = load_tokenizer(artifact_dir)
    steps = options.decode_steps
    rope_rows = max_positions_from_file(exported.onnx_path) or exported.config.max_position_embeddings
    reference = reference_runner(manifest, artifact_dir / "manifest.json", max_positions=rope_rows)
    bos = [tokenizer.bos_id] if tokenizer.add_bos else []  # every prompt starts as the checkpoint says
    if options.prompt is not None:
        prompts = [bos + row for row in prompt_rows(tokenizer.encode(options.prompt), options.batch)]
        source_desc = {"prompt": options.prompt}
    else:
        text_path = Path(options.text or DEFAULT_TEXT)
        try:
            text = text_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise LlmtrtUserError(f"--text {text_path}: cannot read it as UTF-8 text ({exc})") from None
        prompts, decode_tokens = text_prompts(tokenizer.encode(text), options.batch, options.prompt_tokens, steps)
        prompts = [bos + p for p in prompts]
        source_desc = {"text": str(text_path)}
    total = Batch.left_padded(prompts).width + steps
    if total > rope_rows:
        raise LlmtrtUserError(f"{exported.onnx_path}: {total} tokens (prompt + --decode-steps) exceed the graph's "
                              f"{rope_rows} positions; shorten the prompt or re-export with a larger --max-positions")
    if options.prompt is not None:
        decode_tokens = greedy_tokens(reference, prompts, steps)
    return _Setup(artifact_dir, manifest, exported, get_layout(exported.kv_cache), tol, tokenizer, prompts,
                  source_desc, DecodePlan(decode_tokens, total), reference)


def validate(artifact_dir: str | Path, options: ValidateOptions = ValidateOptions()) -> ValidationReport:
    """Check the artifact itself, then run it (and its engine, where a GPU exists) against the fp32
    PyTorch model; with ``options.out_dir`` write the report and the reproduction files there."""
    artifact_dir, engine = _onnx_and_engine(Path(artifact_dir))
    s = _prepare(artifact_dir, options)
    s.engine = engine
    findings = check_artifact(s.directory, s.manifest)  # what the artifact is, before running it
    if options.out_dir is None:
        return _run(s, options, findings, None)
    with artifact_dir_writer(options.out_dir) as tmp:
        report = _run(s, options, findings, tmp)
        _publish(report, s, options, tmp, Path(options.out_dir))
    return report


def _run(s: _Setup, options: ValidateOptions, findings, stage: Path | None) -> ValidationReport:
    from polygraphy.comparator import Comparator
    from polygraphy.logger import G_LOGGER

    from llmtrt.pipelines.checks.validation_runner import ValidationRunner, prefill_feed
    from llmtrt.pipelines.runtime.decoding import Batch
    from llmtrt.pipelines.runtime.runners import OnnxRuntimeRunner

    config, steps = s.exported.config, s.plan.steps
    ort_runner = OnnxRuntimeRunner(s.exported.onnx_path, config, s.layout, max_positions=s.reference.max_positions)
    with ort_runner:
        cache_dtype = ort_runner.cache_dtype
        metadata = ort_runner.get_input_metadata(use_numpy_dtypes=False)
    runners = [ValidationRunner(s.reference, s.plan, metadata), ValidationRunner(ort_runner, s.plan, metadata)]
    runner_info = [{"name": r.name, "description": r.description} for r in runners]
    if s.engine is not None:
        engine, reason = _engine_runner(s.engine)
        if engine is not None:
            runners.append(ValidationRunner(engine, s.plan, metadata))
            runner_info.append({"name": engine.name, "description": engine.description})
        else:
            runner_info.append({"name": "tensorrt", "skipped": True, "reason": reason})
    feed = prefill_feed(Batch.left_padded(s.prompts), config, s.layout, s.plan, cache_dtype)
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        results = Comparator.run(runners, data_loader=[feed],
                                 save_outputs_path=str(stage / "outputs.json") if stage else None)
        names = [PREFILL, *(decode_name(i) for i in range(1, steps + 1)), ONE_PASS,
                 *(f"present.{i}.{kv}" for i in range(config.num_hidden_layers) for kv in ("key", "value"))]
        funcs = compare_funcs(names, s.tol, options.atol, options.rtol)
        accuracy = Comparator.compare_accuracy(results, comparisons=[(i, 0) for i in range(1, len(runners))],
                                               compare_func=[f for _, f in funcs])
        kv_rows = [_kv_consistency(r.name, results[r.name][0], steps, s.tol.groups["kv_cache"]) for r in runners]
    rows = _output_rows(accuracy, funcs, names)
    for info in runner_info:
        if info["name"] in results:
            info["seconds"] = round(results[info["name"]][0].runtime, 4)
    layer = layerwise(s.exported, s.manifest, feed, s.tol, options.reference, stage) if options.layerwise else None
    passed = all(r["passed"] for r in rows) and all(r["passed"] for r in kv_rows) and bool(rows) and all(findings)
    return ValidationReport(
        artifact=str(s.directory), precision=s.manifest["precision"], passed=passed, outputs=rows,
        kv_cache=kv_rows, runners=runner_info, integrity=[f.to_dict() for f in findings], layerwise=layer,
        inputs={**s.source_desc, "tokenizer": s.tokenizer.name, "bos_id": s.tokenizer.bos_id if s.tokenizer.add_bos
                else None, "batch": options.batch,
                "prompt_lengths": [len(p) for p in s.prompts], "decode_steps": steps,
                "decode_tokens": s.plan.decode_tokens.tolist(), "kv_cache": s.layout.name,
                "cache_capacity": s.plan.capacity, "cache_dtype": np.dtype(cache_dtype).name},
        tolerances={"file": s.tol.source, "precision": s.manifest["precision"],
                    "groups": {k: vars(v) for k, v in s.tol.groups.items()},
                    "atol_overrides": dict(options.atol), "rtol_overrides": dict(options.rtol)})


def _onnx_and_engine(path: Path) -> tuple[Path, Path | None]:
    """(the ONNX artifact directory, the engine directory or None) for validate's ARTIFACT."""
    from llmtrt.pipelines.runtime.artifact_runners import artifact_kind
    from llmtrt.pipelines.runtime.engine_runner import read_engine_manifest

    if artifact_kind(path) == "engine":
        return Path(read_engine_manifest(path)[1]["onnx"]).parent, path
    return path, None


def _engine_runner(engine_dir: str | Path):
    """(runner, None) for an engine that can run here, else (None, the reason it is skipped)."""
    import torch

    from llmtrt.pipelines.runtime.engine_runner import TensorRTRunner

    runner = TensorRTRunner(engine_dir)  # a bad engine directory is bad input, GPU or not
    if not torch.cuda.is_available():
        return None, f"no CUDA GPU on this machine, so the engine in {engine_dir} cannot run (validated ONNX Runtime only)"
    return runner, None


def _publish(report: ValidationReport, s: _Setup, options: ValidateOptions, stage: Path, out_dir: Path) -> None:
    """Reproduction files and validation.json into the directory being written (paths as they will be)."""
    from llmtrt.pipelines.checks.reproduce import write_reproduction

    with s.reference:
        files = write_reproduction(stage, s.exported.onnx_path, s.reference.model, s.layout, s.prompts,
                                   s.plan.decode_tokens, s.tol, dict(options.atol), dict(options.rtol),
                                   np.dtype(report.inputs["cache_dtype"]).type, s.exported.logits)
    files = {k: v.replace(str(stage), str(out_dir)) for k, v in files.items()}
    for name in ("outputs.json", "layerwise.json"):
        if (stage / name).is_file():
            files[name.removesuffix(".json")] = str(out_dir / name)
    files["validation"] = str(out_dir / "validation.json")
    report.files = files
    write_json_atomically(stage / "validation.json", report.to_dict())
