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

Files in ``out_dir``: validation.json, inputs.json (the prefill feed dict, Polygraphy JSON),
outputs.json (every runner's per-step outputs), reference_outputs.json (the reference's prefill
``logits``) and, with ``layerwise``, layerwise.json. Reproduce the prefill check by hand with

    polygraphy run model.onnx --onnxrt --load-inputs inputs.json --load-outputs reference_outputs.json \\
        --atol 1e-4 --rtol 1e-3 --check-error-stat max
"""

from __future__ import annotations

import math
import re
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from llmtrt import configs
from llmtrt.exporter.errors import LlmtrtUserError
from llmtrt.exporter.files import write_json_atomically
from llmtrt.pipelines.artifacts import read_manifest
from llmtrt.pipelines.checks.validation_runner import ONE_PASS, PREFILL, decode_name
from llmtrt.pipelines.engine.profiles import max_positions_from_file

DEFAULT_TOLERANCES = configs.path("tolerances.yaml")
DEFAULT_TEXT = configs.path("text", "eval.txt")
GROUP_FIELDS = {"atol", "rtol", "mean_atol", "min_cosine_similarity", "min_top1_agreement"}
GROUPS = ("logits", "present", "kv_cache")
REPRODUCE = ("polygraphy run {onnx} --onnxrt --load-inputs {inputs} --load-outputs {reference} "
             "--atol {atol:g} --rtol {rtol:g} --check-error-stat max")


# --------------------------------------------------------------------------------------------
# tolerances
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GroupTolerance:
    atol: float
    rtol: float
    mean_atol: float | None = None
    min_cosine_similarity: float | None = None
    min_top1_agreement: float | None = None


@dataclass(frozen=True)
class Tolerances:
    precision: str
    groups: dict[str, GroupTolerance]
    min_error: float = 1e-3
    jump_factor: float = 10.0
    source: str = ""


def load_tolerances(path: str | Path, precision: str) -> Tolerances:
    """The tolerances for one precision; unknown keys, wrong types or a missing precision name the file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise LlmtrtUserError(f"{path}: cannot read tolerances ({exc.strerror}); pass --tolerances FILE") from None
    except yaml.YAMLError as exc:
        raise LlmtrtUserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("precisions"), dict):
        raise LlmtrtUserError(f"{path}: needs a top-level 'precisions:' mapping (see configs/tolerances.yaml)")
    unknown = set(raw) - {"precisions", "layerwise"}
    if unknown:
        raise LlmtrtUserError(f"{path}: unknown key {sorted(unknown)[0]!r}; allowed: precisions, layerwise")
    entry = raw["precisions"].get(precision)
    if entry is None:
        raise LlmtrtUserError(f"{path}: no tolerances for precision {precision!r} (has "
                              f"{', '.join(raw['precisions'])}); add a 'precisions.{precision}' entry")
    groups = {}
    for group in GROUPS:
        values = entry.get(group) if isinstance(entry, dict) else None
        where = f"{path}: precisions.{precision}.{group}"
        if not isinstance(values, dict):
            raise LlmtrtUserError(f"{where}: missing; give at least atol and rtol")
        bad = set(values) - GROUP_FIELDS
        if bad:
            raise LlmtrtUserError(f"{where}.{sorted(bad)[0]}: unknown field; allowed: {', '.join(sorted(GROUP_FIELDS))}")
        for key, value in values.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise LlmtrtUserError(f"{where}.{key}: {value!r} is not a non-negative number")
        if "atol" not in values or "rtol" not in values:
            raise LlmtrtUserError(f"{where}: needs both atol and rtol")
        groups[group] = GroupTolerance(**{k: float(v) for k, v in values.items()})
    extra = set(entry) - set(GROUPS)
    if extra:
        raise LlmtrtUserError(f"{path}: precisions.{precision}.{sorted(extra)[0]}: unknown group; "
                              f"allowed: {', '.join(GROUPS)}")
    layer = raw.get("layerwise") or {}
    if set(layer) - {"min_error", "jump_factor"}:
        raise LlmtrtUserError(f"{path}: layerwise allows only min_error and jump_factor")
    return Tolerances(precision, groups, float(layer.get("min_error", 1e-3)), float(layer.get("jump_factor", 10.0)),
                      str(path))


def parse_overrides(values: Sequence[str], flag: str) -> dict[str, float]:
    """Polygraphy-style ``[NAME:]VALUE`` list -> {name: value}; "" is the default for every output."""
    result: dict[str, float] = {}
    for item in values:
        name, _, number = item.rpartition(":")
        try:
            value = float(number)
        except ValueError:
            raise LlmtrtUserError(f"{flag} {item!r}: expected VALUE or NAME:VALUE, e.g. {flag} logits:1e-3") from None
        if not value >= 0:
            raise LlmtrtUserError(f"{flag} {item!r}: tolerance must be a non-negative number")
        result[name] = value
    return result


def group_of(output: str) -> str:
    return "logits" if output.startswith("logits") else "present"


def _lookup(overrides: Mapping[str, float], output: str, default: float) -> float:
    for key in (output, group_of(output), ""):
        if key in overrides:
            return overrides[key]
    return default


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
    engine: str | Path | None = None
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
# comparison functions (Polygraphy protocol: (IterationResult, IterationResult) -> {output: bool-like})
# --------------------------------------------------------------------------------------------
@dataclass
class Top1Result:
    agreement: float
    threshold: float

    def __bool__(self) -> bool:
        return self.agreement >= self.threshold


class Top1AgreementCompareFunc:
    """Fraction of real (non-padding) positions whose argmax equals the reference's."""

    def __init__(self, thresholds: Mapping[str, float]) -> None:
        self.thresholds = dict(thresholds)

    def __call__(self, result0, result1):
        out = OrderedDict()
        for name, threshold in self.thresholds.items():
            if name in result0 and name in result1:
                a, b = np.asarray(result0[name], np.float32), np.asarray(result1[name], np.float32)
                real = np.any(b != 0, axis=-1)
                agree = (a.argmax(-1) == b.argmax(-1))[real]
                out[name] = Top1Result(float(agree.mean()) if agree.size else 1.0, threshold)
        return out


def _only(names: set[str]):
    """A Polygraphy find_output_func comparing just ``names``."""

    def find(name, index, iter_result):
        return [name] if name in names and name in iter_result else []

    return find


def compare_funcs(outputs: Sequence[str], tol: Tolerances, atol: Mapping[str, float], rtol: Mapping[str, float]):
    """Polygraphy comparison functions for the gated outputs: max check always, the rest where configured."""
    from polygraphy.comparator import CosineSimilarityCompareFunc, SimpleCompareFunc

    gated = set(outputs)
    g = {name: tol.groups[group_of(name)] for name in outputs}
    funcs = [("max", SimpleCompareFunc(
        atol={n: _lookup(atol, n, g[n].atol) for n in outputs}, rtol={n: _lookup(rtol, n, g[n].rtol) for n in outputs},
        check_error_stat="max", find_output_func=_only(gated)))]
    mean = {n: g[n].mean_atol for n in outputs if g[n].mean_atol is not None}
    if mean:
        funcs.append(("mean", SimpleCompareFunc(atol=mean, rtol=dict.fromkeys(mean, 0.0), check_error_stat="mean",
                                                find_output_func=_only(set(mean)))))
    cosine = {n: g[n].min_cosine_similarity for n in outputs if g[n].min_cosine_similarity is not None}
    if cosine:
        funcs.append(("cosine", CosineSimilarityCompareFunc(cosine_similarity_threshold=cosine,
                                                             find_output_func=_only(set(cosine)))))
    top1 = {n: g[n].min_top1_agreement for n in outputs
            if g[n].min_top1_agreement is not None and n.startswith("logits")}
    if top1:
        funcs.append(("top1", Top1AgreementCompareFunc(top1)))
    return funcs


def _stats(result) -> dict[str, float]:
    return {k: getattr(result, k) for k in ("max_absdiff", "mean_absdiff", "median_absdiff",
                                            "max_reldiff", "mean_reldiff", "median_reldiff")}


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else x


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------
@dataclass
class ValidationReport:
    artifact: str
    precision: str
    passed: bool
    outputs: list[dict[str, Any]]          # one row per (runner, output)
    kv_cache: list[dict[str, Any]]         # one row per runner
    runners: list[dict[str, Any]]          # name, description, or skipped + reason
    inputs: dict[str, Any]
    tolerances: dict[str, Any]
    layerwise: dict[str, Any] | None = None
    files: dict[str, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.passed

    def failed(self) -> list[str]:
        bad = [f"{r['runner']}:{r['output']}" for r in self.outputs if not r["passed"]]
        return bad + [f"{r['runner']}:kv_cache" for r in self.kv_cache if not r["passed"]]

    def summary(self) -> dict[str, Any]:
        worst = max((r["max_absdiff"] for r in self.outputs if r["output"].startswith("logits")), default=None)
        return {"precision": self.precision, "runners": [r["name"] for r in self.runners if not r.get("skipped")],
                "skipped": [r["name"] for r in self.runners if r.get("skipped")], "max_logit_abs_error": worst,
                "failed": self.failed(),
                "first_bad_node": (self.layerwise or {}).get("first_jump", {}).get("node")}

    def to_dict(self) -> dict[str, Any]:
        return {"artifact": self.artifact, "precision": self.precision, "passed": self.passed,
                "runners": self.runners, "inputs": self.inputs, "tolerances": self.tolerances,
                "outputs": self.outputs, "kv_cache": self.kv_cache, "layerwise": self.layerwise,
                "files": self.files, "summary": self.summary()}

    def table(self) -> str:
        head = (f"{'runner vs pytorch-fp32':<22} {'output':<18} {'max abs':>9} {'mean abs':>9} {'med abs':>9} "
                f"{'max rel':>9} {'mean rel':>9} {'med rel':>9}  {'atol':>7} {'rtol':>7}  result")
        lines = [head, "-" * len(head)]
        for r in self.outputs:
            extra = "".join(f" {k}={r[k]:.5g}" for k in ("cosine_similarity", "top1_agreement") if k in r)
            lines.append(f"{r['runner']:<22} {r['output']:<18} " + " ".join(
                _num(r[k]) for k in ("max_absdiff", "mean_absdiff", "median_absdiff", "max_reldiff", "mean_reldiff",
                                     "median_reldiff")) + f"  {r['atol']:>7.1e} {r['rtol']:>7.1e}  "
                + ("PASS" if r["passed"] else "FAIL") + extra)
        for r in self.kv_cache:
            lines.append(f"{r['runner']:<22} {'kv_cache':<18} {_num(r['max_absdiff'])} {_num(r['mean_absdiff'])} "
                         f"{_num(r['median_absdiff'])} {_num(r['max_reldiff'])} {_num(r['mean_reldiff'])} "
                         f"{_num(r['median_reldiff'])}  {r['atol']:>7.1e} {r['rtol']:>7.1e}  "
                         + ("PASS" if r["passed"] else "FAIL") + "  prefill+decode vs one pass")
        for r in self.runners:
            if r.get("skipped"):
                lines.append(f"{r['name']}: SKIPPED ({r['reason']})")
        if self.layerwise:
            jump = self.layerwise.get("first_jump")
            lines.append(f"layerwise vs {self.layerwise['reference']}: " + (
                f"error jumps at {jump['node']} ({jump['op_type']}, output {jump['tensor']}): "
                f"{jump['error']:.3g} relative, inputs {jump['input_error']:.3g}" if jump else
                f"no node's error reaches {self.layerwise['min_error']:g}"))
        lines.append(f"{'PASS' if self.passed else 'FAIL'}: {self.artifact} ({self.precision}) vs PyTorch fp32")
        return "\n".join(lines)


def _num(x: float | None) -> str:
    return f"{x:>9.2e}" if x is not None else f"{'-':>9}"


# --------------------------------------------------------------------------------------------
# validate
# --------------------------------------------------------------------------------------------
def validate(artifact_dir: str | Path, options: ValidateOptions = ValidateOptions()) -> ValidationReport:
    """Run the artifact (and its engine, where a GPU exists) against the fp32 PyTorch model."""
    from polygraphy.comparator import Comparator, RunResults
    from polygraphy.comparator.struct import IterationResult
    from polygraphy.logger import G_LOGGER

    from llmtrt.exporter.kv_cache import get_layout
    from llmtrt.pipelines.artifacts import load_exported
    from llmtrt.pipelines.checks.validation_runner import DecodePlan, ValidationRunner, prefill_feed
    from llmtrt.pipelines.runtime.decoding import Batch
    from llmtrt.pipelines.runtime.runners import OnnxRuntimeRunner, reference_runner
    from llmtrt.pipelines.runtime.tokenizer import load_tokenizer

    artifact_dir = Path(artifact_dir)
    if options.batch < 1 or options.decode_steps < 0 or options.prompt_tokens < 1:
        raise LlmtrtUserError("--batch and the prompt length must be >= 1 and --decode-steps >= 0")
    manifest = read_manifest(artifact_dir)
    exported = load_exported(artifact_dir, manifest)
    precision = manifest["precision"]
    layout = get_layout(exported.kv_cache)
    tol = load_tolerances(options.tolerances or DEFAULT_TOLERANCES, precision)

    tokenizer = load_tokenizer(artifact_dir)
    steps = options.decode_steps
    rope_rows = max_positions_from_file(exported.onnx_path) or exported.config.max_position_embeddings
    reference = reference_runner(manifest, artifact_dir / "manifest.json", max_positions=rope_rows)
    if options.prompt is not None:
        prompts = prompt_rows(tokenizer.encode(options.prompt), options.batch)
        source_desc = {"prompt": options.prompt}
    else:
        text_path = Path(options.text or DEFAULT_TEXT)
        try:
            text = text_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise LlmtrtUserError(f"--text {text_path}: cannot read it as UTF-8 text ({exc})") from None
        prompts, decode_tokens = text_prompts(tokenizer.encode(text), options.batch, options.prompt_tokens, steps)
        source_desc = {"text": str(text_path)}
    batch = Batch.left_padded(prompts)
    total = batch.width + steps
    if total > rope_rows:
        raise LlmtrtUserError(f"{exported.onnx_path}: {total} tokens (prompt + --decode-steps) exceed the graph's "
                              f"{rope_rows} positions; shorten the prompt or re-export with a larger --max-seq")
    if options.prompt is not None:
        decode_tokens = greedy_tokens(reference, prompts, steps)
    plan = DecodePlan(decode_tokens, total)

    ort_runner = OnnxRuntimeRunner(exported.onnx_path, exported.config, layout, max_positions=rope_rows)
    with ort_runner:
        cache_dtype = ort_runner.cache_dtype
        metadata = ort_runner.get_input_metadata(use_numpy_dtypes=False)
    runners = [ValidationRunner(reference, plan, metadata), ValidationRunner(ort_runner, plan, metadata)]
    runner_info = [{"name": r.name, "description": r.description} for r in runners]
    if options.engine is not None:
        engine, reason = _engine_runner(options.engine)
        if engine is not None:
            runners.append(ValidationRunner(engine, plan, metadata))
            runner_info.append({"name": engine.name, "description": engine.description})
        else:
            runner_info.append({"name": "tensorrt", "skipped": True, "reason": reason})
    feed = prefill_feed(batch, exported.config, layout, plan, cache_dtype)

    stage = None
    if options.out_dir is not None:
        out_dir = Path(options.out_dir)
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            stage = Path(tempfile.mkdtemp(prefix=".validate-", dir=out_dir))
        except OSError as exc:
            raise LlmtrtUserError(f"--out {out_dir}: cannot write there ({exc.strerror})") from None
    try:
        with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
            results = Comparator.run(runners, data_loader=[feed],
                                     save_inputs_path=str(stage / "inputs.json") if stage else None,
                                     save_outputs_path=str(stage / "outputs.json") if stage else None)
            names = [PREFILL, *(decode_name(i) for i in range(1, steps + 1)), ONE_PASS,
                     *(f"present.{i}.{kv}" for i in range(exported.config.num_hidden_layers) for kv in ("key", "value"))]
            funcs = compare_funcs(names, tol, options.atol, options.rtol)
            accuracy = Comparator.compare_accuracy(results, comparisons=[(i, 0) for i in range(1, len(runners))],
                                                   compare_func=[f for _, f in funcs])
            rows = _output_rows(accuracy, funcs, names)
            kv_rows = [_kv_consistency(r.name, results[r.name][0], steps, tol.groups["kv_cache"]) for r in runners]
        for r in runners:
            for info in runner_info:
                if info["name"] == r.name:
                    info["seconds"] = round(results[r.name][0].runtime, 4)
        layer = None
        if options.layerwise:
            layer = layerwise(exported, manifest, feed, tol, options.reference, stage)
        passed = all(r["passed"] for r in rows) and all(r["passed"] for r in kv_rows) and bool(rows)
        report = ValidationReport(
            artifact=str(artifact_dir), precision=precision, passed=passed, outputs=rows, kv_cache=kv_rows,
            runners=runner_info,
            inputs={**source_desc, "tokenizer": tokenizer.name, "batch": options.batch,
                    "prompt_lengths": [len(p) for p in prompts], "decode_steps": steps,
                    "decode_tokens": plan.decode_tokens.tolist(), "kv_cache": layout.name,
                    "cache_capacity": plan.capacity},
            tolerances={"file": tol.source, "precision": precision,
                        "groups": {k: vars(v) for k, v in tol.groups.items()},
                        "atol_overrides": dict(options.atol), "rtol_overrides": dict(options.rtol)},
            layerwise=layer)
        if stage is not None:
            reference_prefill = RunResults()
            reference_prefill.append((reference.name, [IterationResult(
                {"logits": results[reference.name][0]["logits"]}, runner_name=reference.name)]))
            with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
                reference_prefill.save(str(stage / "reference_outputs.json"))
            _publish(report, stage, Path(options.out_dir), exported.onnx_path, tol)
    finally:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
    return report


def _engine_runner(engine_dir: str | Path):
    """(runner, None) for an engine that can run here, else (None, the reason it is skipped)."""
    from llmtrt.pipelines.runtime.engine_runner import TensorRTRunner

    runner = TensorRTRunner(engine_dir)
    try:
        import torch

        if not torch.cuda.is_available():
            return None, f"no CUDA GPU on this machine, so the engine in {engine_dir} cannot run (validated ONNX Runtime only)"
    except ImportError:  # pragma: no cover - torch is a dependency
        return None, "torch is not installed"
    return runner, None


def _publish(report: ValidationReport, stage: Path, out_dir: Path, onnx_path: Path, tol: Tolerances) -> None:
    """Move the staged files into ``out_dir`` and write validation.json last (no half-written report)."""
    files = {}
    for name in ("inputs.json", "outputs.json", "reference_outputs.json", "layerwise.json"):
        if (stage / name).is_file():
            (stage / name).replace(out_dir / name)
            files[name.removesuffix(".json")] = str(out_dir / name)
    logits = tol.groups["logits"]
    atol = report.tolerances["atol_overrides"]
    rtol = report.tolerances["rtol_overrides"]
    files["reproduce"] = REPRODUCE.format(onnx=onnx_path, inputs=out_dir / "inputs.json",
                                          reference=out_dir / "reference_outputs.json",
                                          atol=_lookup(atol, PREFILL, logits.atol), rtol=_lookup(rtol, PREFILL, logits.rtol))
    files["validation"] = str(out_dir / "validation.json")
    report.files = files
    write_json_atomically(out_dir / "validation.json", report.to_dict())


def _output_rows(accuracy, funcs, names: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    by_kind = dict(zip([k for k, _ in funcs], accuracy, strict=True))
    for pair in by_kind["max"]:
        runner = pair[0]
        for name in names:
            per = {kind: result[pair][0].get(name) for kind, result in by_kind.items()}
            base = per["max"]
            if base is None:  # output missing from one side: a failure, not a skip
                rows.append({"runner": runner, "output": name, "passed": False, "error": "output missing",
                             **dict.fromkeys(("max_absdiff", "mean_absdiff", "median_absdiff", "max_reldiff",
                                              "mean_reldiff", "median_reldiff")), "atol": 0.0, "rtol": 0.0})
                continue
            threshold = base.thresholds
            row = {"runner": runner, "output": name, **{k: _finite(v) for k, v in _stats(base).items()},
                   "atol": threshold.atol, "rtol": threshold.rtol,
                   "checks": {kind: bool(r) for kind, r in per.items() if r is not None}}
            if base.max_absdiff is None or not math.isfinite(base.max_absdiff):
                row["checks"]["finite"] = False
            if per.get("cosine") is not None:
                row["cosine_similarity"] = per["cosine"].cosine_similarity
            if per.get("top1") is not None:
                row["top1_agreement"] = per["top1"].agreement
            row["passed"] = all(row["checks"].values())
            rows.append(row)
    return rows


def _kv_consistency(runner: str, outputs, steps: int, tol: GroupTolerance) -> dict[str, Any]:
    """Within one runner: last-position logits of prefill and each decode step vs one forward over N + M."""
    from polygraphy.comparator import SimpleCompareFunc
    from polygraphy.comparator.struct import IterationResult

    stepped = np.concatenate([outputs[PREFILL][:, -1:]] + [outputs[decode_name(i)] for i in range(1, steps + 1)], 1)
    a = IterationResult({"logits": stepped}, runner_name=f"{runner} prefill+decode")
    b = IterationResult({"logits": outputs[ONE_PASS]}, runner_name=f"{runner} one pass")
    result = SimpleCompareFunc(atol=tol.atol, rtol=tol.rtol, check_error_stat="max")(a, b)["logits"]
    checks = {"max": bool(result)}
    if tol.mean_atol is not None:
        checks["mean"] = result.mean_absdiff <= tol.mean_atol
    if not math.isfinite(result.max_absdiff):
        checks["finite"] = False
    return {"runner": runner, **{k: _finite(v) for k, v in _stats(result).items()}, "atol": tol.atol,
            "rtol": tol.rtol, "checks": checks, "passed": all(checks.values())}


# --------------------------------------------------------------------------------------------
# layerwise
# --------------------------------------------------------------------------------------------
_LAYER = re.compile(r"/model/layers/(\d+)/")


def mark_all_outputs(model):
    """A copy of ``model`` whose every node output is also a graph output (types from shape inference)."""
    import onnx

    model = onnx.shape_inference.infer_shapes(model)
    known = {v.name: v for v in list(model.graph.value_info) + list(model.graph.output)}
    existing = {o.name for o in model.graph.output}
    for node in model.graph.node:
        for name in node.output:
            if name and name not in existing:
                info = known.get(name) or onnx.helper.make_empty_tensor_value_info(name)
                model.graph.output.append(info)
                existing.add(name)
    return model


def _run_all(onnx_path: Path, feed: Mapping[str, np.ndarray]) -> tuple[list, dict[str, np.ndarray]]:
    """Every node output of the graph at ``onnx_path`` for one feed; nodes in graph order."""
    import onnx

    from llmtrt.pipelines.runtime.runners import ort_session

    model = mark_all_outputs(onnx.load(str(onnx_path)))
    session = ort_session(onnx_path, keep_all_tensors=True, model_bytes=model.SerializeToString())
    dtypes = {i.name: i.type for i in session.get_inputs()}
    inputs = {k: (v.astype(np.float16) if dtypes.get(k) == "tensor(float16)" else v)
              for k, v in feed.items() if k in dtypes}
    names = [o.name for o in session.get_outputs()]
    return list(model.graph.node), dict(zip(names, session.run(names, inputs), strict=True))


def _error(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return math.inf
    if not np.issubdtype(b.dtype, np.floating):
        return float(np.mean(a != b)) if a.size else 0.0
    a, b = a.astype(np.float64), b.astype(np.float64)
    if not a.size:
        return 0.0
    diff = np.abs(a - b)
    both_inf = np.isinf(a) & np.isinf(b) & (np.sign(a) == np.sign(b))
    diff[both_inf] = 0.0
    finite = np.abs(b[np.isfinite(b)])
    scale = float(finite.max()) if finite.size else 1.0
    return float(np.nanmax(np.where(np.isnan(diff), np.inf, diff)) / max(scale, 1e-12))


def layerwise(exported, manifest: dict[str, Any], feed: Mapping[str, np.ndarray], tol: Tolerances,
              reference: str | Path | None, stage: Path | None) -> dict[str, Any]:
    """Every intermediate tensor of the artifact vs the same tensor of an fp32 reference export (matched by
    node name and output index, names follow modules), and the first node where the error jumps."""
    from llmtrt.exporter.onnx_export import ExportOptions, export
    from llmtrt.pipelines.artifacts import load_exported, open_model_source

    with tempfile.TemporaryDirectory(prefix="llmtrt-layerwise-") as tmp:
        if reference is not None:
            ref_path, ref_desc = load_exported(reference).onnx_path, str(reference)
        else:
            options = ExportOptions(dialect=exported.dialect, opset=exported.opset, kv_cache=exported.kv_cache,
                                    max_positions=max_positions_from_file(exported.onnx_path))
            source = open_model_source(manifest, exported.onnx_path.parent / "manifest.json")
            ref_path = export(source, Path(tmp) / "reference", options).onnx_path
            ref_desc = f"fp32 re-export of {manifest['model_source']} ({exported.dialect} ops)"
        ref_nodes, ref_values = _run_all(ref_path, feed)
        nodes, values = _run_all(exported.onnx_path, feed)
    ref_by_node = {(n.name, i): out for n in ref_nodes for i, out in enumerate(n.output)}
    errors: dict[str, float] = {}
    rows, first = [], None
    for node in nodes:
        in_errors = [errors[i] for i in node.input if i in errors]
        input_error = max(in_errors, default=0.0)
        for index, tensor in enumerate(node.output):
            ref_tensor = ref_by_node.get((node.name, index))
            if not tensor or ref_tensor is None or tensor not in values or ref_tensor not in ref_values:
                continue
            err = _error(np.asarray(values[tensor]), np.asarray(ref_values[ref_tensor]))
            errors[tensor] = err
            layer = _LAYER.search(node.name + "/")
            row = {"node": node.name, "op_type": node.op_type, "tensor": tensor, "error": _finite(err),
                   "input_error": input_error, "layer": int(layer.group(1)) if layer else None}
            rows.append(row)
            if first is None and err >= tol.min_error and err >= tol.jump_factor * input_error:
                first = {**row, "error": err if math.isfinite(err) else float("inf")}
    worst = sorted((r for r in rows if r["error"] is None or r["error"] > 0),
                   key=lambda r: -(r["error"] if r["error"] is not None else math.inf))[:10]
    result = {"reference": ref_desc, "compared_tensors": len(rows), "min_error": tol.min_error,
              "jump_factor": tol.jump_factor, "first_jump": first, "largest": worst}
    if stage is not None:
        write_json_atomically(stage / "layerwise.json", {**result, "tensors": rows})
    return result
