"""``build_from_export``: an engine from an export directory, what ``llmtrt build`` and the
pipeline call.

Order matters for the user: everything that needs only the flags and the export manifest is
checked first (an impossible ``--max-kv``, a bad ``--target-cc`` or ``--opt-level``: refused in
milliseconds), then what needs the graph without weights (precision, lowering, plugin routing),
and only then the heavy work. The export's sha256 (is it the file the manifest describes?) is
computed on a thread while TensorRT builds and checked before the manifest is written; the whole
directory is written by ``artifact_dir``, so a failure leaves nothing in ``--out``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmtrt.exporter.files import artifact_dir, check_out_dir
from llmtrt.exporter.kv_cache import get_layout
from llmtrt.pipelines.engine.backends import Backend, get_backend
from llmtrt.pipelines.engine.flags import check_flags
from llmtrt.pipelines.engine.profiles import Profile, max_positions_from_file, validate_profiles
from llmtrt.pipelines.errors import LlmtrtUserError

if TYPE_CHECKING:
    from llmtrt.pipelines.engine.build import BuildResult

# Imports here stay light (no onnx, no torch: about 0.3 s in all) so the checks above the heavy
# work answer in well under a second; the rest is imported inside build_from_export.
MANIFEST_NAME = "manifest.json"  # artifacts.MANIFEST, read here as plain JSON for the early checks

DEFAULT_MAX_PROMPT = 512


def export_profiles(kv_cache: str, max_positions: int, *, max_batch: int = 1, max_prompt: int | None = None,
                    max_kv: int | None = None) -> tuple[Profile, Profile]:
    """Prefill + decode profiles for an exported graph.

    Dynamic cache: prompts up to ``max_prompt`` (default min(512, max_positions)), decode against up
    to ``max_kv`` cached tokens (default max_positions - 1). Static cache: ``max_kv`` is the fixed
    cache length (default max_positions).
    """
    layout = get_layout(kv_cache)
    fixed = layout.fixed_capacity
    kv = max_kv if max_kv is not None else (max_positions if fixed else max_positions - 1)
    prompt = max_prompt if max_prompt is not None else min(DEFAULT_MAX_PROMPT, kv if fixed else max_positions)
    for flag, value in (("--max-batch", max_batch), ("--max-prompt", prompt), ("--max-kv", kv)):
        if value < 1:
            raise LlmtrtUserError(f"{flag} must be >= 1, got {value}")
    return layout.default_profiles(max_batch, prompt, kv)


def _other_lowerings(mode: str, dialect: str) -> str:
    works = {"custom": ["native", "inline"], "standard": ["native"], "decomposed": ["native", "inline"]}
    others = [m for m in works.get(dialect, ["native", "inline"]) if m != mode]
    if not others:
        return f"--lower {mode} is the lowering that should work for --ops {dialect} graphs; see docs/support-matrix.md"
    return (f"this was --lower {mode} on a --ops {dialect} graph; try " + " or ".join(f"`--lower {m}`" for m in others)
            + " (see docs/support-matrix.md)")


def _profiles_for(kv_cache: str, where: Path, profiles: Sequence[Profile] | None, max_positions: int, *,
                  max_batch: int, max_prompt: int | None, max_kv: int | None) -> Sequence[Profile]:
    """The profiles to build, checked against the export's cache layout and max positions."""
    if profiles is None:
        profiles = export_profiles(kv_cache, max_positions, max_batch=max_batch, max_prompt=max_prompt, max_kv=max_kv)
    kinds = {p.layout for p in profiles}
    if kinds != {kv_cache}:
        raise LlmtrtUserError(f"{where} says kv_cache {kv_cache!r}, but the profiles are "
                              f"for a {'/'.join(sorted(kinds))} cache; "
                              + ("give max_cache_length in --profiles" if get_layout(kv_cache).fixed_capacity
                                 else "use past ranges, not max_cache_length, in --profiles"))
    validate_profiles(profiles, max_positions)
    return profiles


def _max_positions(export_dir: Path, raw: dict[str, Any]) -> int:
    """Positions the exported graph addresses: its metadata or rotary table, else the config's."""
    return max_positions_from_file(export_dir / raw["onnx"]) or int(raw["config"]["max_position_embeddings"])


def _early_look(export_dir: Path) -> dict[str, Any] | None:
    """manifest.json as plain JSON with the fields the early checks use, or None (the full, validated
    read that follows then says what is wrong)."""
    try:
        raw = json.loads((export_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
        get_layout(raw["kv_cache"])
        _max_positions(export_dir, raw)
    except (OSError, ValueError, KeyError, TypeError, LlmtrtUserError):
        return None
    return raw


def build_from_export(export_dir: str | Path, out_dir: str | Path, *, precision: str | None = None,
                      backend: str | Backend | None = None, lower: str = "native", target_cc: Sequence[str] = (),
                      max_batch: int = 1, max_prompt: int | None = None, max_kv: int | None = None,
                      profiles: Sequence[Profile] | None = None, opt_level: int = 3,
                      workspace_mb: int | None = None, timing_cache: str | Path | None = None,
                      plugins: Sequence[str | Path] = (), strip_weights: bool = False,
                      merge_profiles: bool | None = None,
                      progress: Callable[[str], None] | None = None) -> BuildResult:
    """Lower ``export_dir``'s ONNX (read from its manifest.json) to ``out_dir/model.<lower>.onnx`` and
    build ``out_dir/engine.<precision>.plan`` + ``.json``.

    ``precision`` defaults to the export manifest's; a static-cache graph gets its cache length
    pinned in the lowered graph (TensorRT's KV-cache update needs a static sequence axis).
    """
    say = progress or (lambda _msg: None)
    export_dir, out_dir = Path(export_dir), Path(out_dir)
    be = backend if isinstance(backend, Backend) else get_backend(backend)
    check_flags(be, precision=precision, lower=lower, opt_level=opt_level, workspace_mb=workspace_mb,
                target_cc=target_cc, strip_weights=strip_weights, plugins=plugins)
    check_out_dir(out_dir)
    sizes = {"max_batch": max_batch, "max_prompt": max_prompt, "max_kv": max_kv}
    early = _early_look(export_dir)
    if early is not None:  # an impossible --max-kv / --profiles is refused before anything heavy is imported
        _profiles_for(early["kv_cache"], export_dir / MANIFEST_NAME, profiles, _max_positions(export_dir, early),
                      **sizes)

    from llmtrt.exporter.onnx_layout import weightless_model
    from llmtrt.pipelines.artifacts import MANIFEST, load_exported, read_manifest
    from llmtrt.pipelines.engine.build import BuildResult, EngineBuild
    from llmtrt.pipelines.engine.digests import Digests
    from llmtrt.pipelines.engine.lowering import lower_for_build
    from llmtrt.pipelines.engine.parse_errors import UnsupportedNodesError

    raw = read_manifest(export_dir)
    exported = load_exported(export_dir, raw)
    precision = precision or raw.get("precision") or "fp32"
    max_positions = _max_positions(export_dir, raw)
    profiles = _profiles_for(exported.kv_cache, export_dir / MANIFEST, profiles, max_positions, **sizes)
    dims = {"max_cache_length": profiles[0].cache} if get_layout(exported.kv_cache).fixed_capacity else {}
    model = weightless_model(exported.onnx_path)

    with artifact_dir(out_dir) as tmp:
        lowered = tmp / f"model.{lower}.onnx"
        say(f"lowering {exported.dialect} ops with --lower {lower} -> {out_dir / lowered.name}"
            + (f" (static cache of {dims['max_cache_length']} slots)" if dims else ""))
        t_lower = time.perf_counter()
        done = lower_for_build(exported.onnx_path, lowered, lower, model=model, supported=be.supports_operator,
                               dims=dims)
        lower_seconds = time.perf_counter() - t_lower
        del model
        extra = {
            "export": {"dir": str(export_dir.resolve()), "model_source": raw.get("model_source"),
                       "config_name": exported.config.name, "ops": exported.dialect, "opset": exported.opset,
                       "kv_cache": exported.kv_cache, "precision": raw.get("precision", "fp32"),
                       "onnx_sha256": raw["onnx_sha256"]},
            "kv_cache": exported.kv_cache,
            "lowering": {"mode": lower, "onnx": lowered.name, "pinned_dims": dims, "seconds": round(lower_seconds, 3),
                         "fused_gemm_groups": done.fused_groups, "fused_weight_bytes": done.fused_bytes},
            "max_positions": max_positions,
        }
        try:
            job = EngineBuild(lowered, precision=precision, backend=be, target_cc=target_cc, profiles=profiles,
                              opt_level=opt_level, workspace_mb=workspace_mb, timing_cache=timing_cache,
                              plugins=plugins, max_positions=max_positions, strip_weights=strip_weights,
                              merge_profiles=merge_profiles)
            digests = Digests()
            say(f"hashing {exported.onnx_path} (checked against {MANIFEST} while the engine builds)")
            export_sha256 = digests.later(exported.onnx_path)
            result = job.run(tmp, source={"onnx": str(exported.onnx_path.resolve()), "onnx_sha256": raw["onnx_sha256"]},
                             extra=extra, digests=digests, progress=say,
                             before_manifest=lambda: _same_export(export_sha256.result(), raw, exported.onnx_path,
                                                                  export_dir / MANIFEST))
        except UnsupportedNodesError as exc:
            if not any(f.op_type for f in exc.failures):
                raise
            raise UnsupportedNodesError(lowered.name, exc.failures, _other_lowerings(lower, exported.dialect)) from None
    return BuildResult(out_dir / result.plan_path.name, out_dir / result.manifest_path.name, result.manifest)


def _same_export(digest: str, raw: dict[str, Any], onnx_path: Path, manifest_path: Path) -> None:
    if digest != raw.get("onnx_sha256"):
        raise LlmtrtUserError(f"{onnx_path}: its sha256 differs from {manifest_path} (the file changed after "
                              "export); re-run `llmtrt export`")
