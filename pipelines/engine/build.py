"""Build a serialized TensorRT / TensorRT-RTX engine from an ONNX file, plus its manifest.

    build_engine("out/engines/model.native.onnx", "out/engines", precision="fp16",
                 profiles=[prefill_profile(1, 512), decode_profile(1, 2047)], target_cc=["8.9"])

writes ``engine.fp16.plan`` and ``engine.fp16.json`` (``build_from_export`` in ``from_export.py``
does the same from an export directory). Engines are strongly typed: the precision is whatever the
ONNX graph holds, so ``precision`` is a check, not a builder flag.

A build holds the weights as few times as TensorRT lets it: the graph is read without weights
(``onnx_layout.weightless_model``), the parser maps the external-data file, the plan is streamed
to disk and hashed on the way (never held whole), and the ONNX is hashed on a thread while the
builder runs. On TensorRT-RTX, which stores the weights once per optimization profile, the
profiles are merged into one (``Backend.weights_per_profile``), so the plan is about the size of the
weights. ``strip_weights`` leaves them out of the plan altogether; the manifest's ``refit`` says
how a runtime puts them back (from the built ONNX, whose sha256 it records).

Every check that needs no TensorRT work (flags, precision, profiles, plugin routing) runs when an
``EngineBuild`` is made; ``run`` parses and builds. The plan is written atomically and the old
manifest is removed first, so an interrupted build never leaves a plan that a manifest vouches for.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmtrt.exporter.files import write_json_atomically
from llmtrt.pipelines.artifacts import peak_rss_bytes
from llmtrt.pipelines.engine.backends import Backend, get_backend
from llmtrt.pipelines.engine.digests import Digests
from llmtrt.pipelines.engine.flags import check_flags
from llmtrt.pipelines.engine.manifest import BuildFacts, engine_manifest
from llmtrt.pipelines.engine.network import (
    ParsedNetwork,
    attach_timing_cache,
    build_plan,
    builder_config,
    parse_network,
)
from llmtrt.pipelines.engine.parse_errors import (  # noqa: F401  (re-exported: the build's error types)
    LOWER_HINT,
    NodeFailure,
    UnsupportedNodesError,
)
from llmtrt.pipelines.engine.plugin_setup import python_plugin_manifest, setup_plugins
from llmtrt.pipelines.engine.precision_check import check_precision
from llmtrt.pipelines.engine.profiles import Profile, engine_profiles, graph_input_dims, validate_profiles
from llmtrt.pipelines.errors import LlmtrtUserError


@dataclass(frozen=True)
class BuildResult:
    plan_path: Path
    manifest_path: Path
    manifest: dict[str, Any]


def plan_paths(out_dir: str | Path, precision: str) -> tuple[Path, Path]:
    """(engine.<precision>.plan, engine.<precision>.json) in ``out_dir``."""
    out_dir = Path(out_dir)
    return out_dir / f"engine.{precision}.plan", out_dir / f"engine.{precision}.json"


class EngineBuild:
    """One engine build. Making it runs every cheap check; ``run`` parses, builds and writes.

    ``profiles`` become optimization profiles 0, 1, ... in order, or one merged profile where the
    backend stores weights per profile (``merge_profiles=None``) or when ``merge_profiles`` is True.
    ``plugins`` are plugin library paths; when given, registered plugins override built-in importers
    for matching op types. ``max_positions`` (default: the graph's metadata, else its rotary table
    length) bounds past + seq.
    """

    def __init__(self, onnx_path: str | Path, *, precision: str, backend: str | Backend | None = None,
                 target_cc: Sequence[str] = (), profiles: Sequence[Profile], opt_level: int = 3,
                 workspace_mb: int | None = None, timing_cache: str | Path | None = None,
                 plugins: Sequence[str | Path] = (), max_positions: int | None = None, strip_weights: bool = False,
                 merge_profiles: bool | None = None) -> None:
        from llmtrt.exporter.onnx_layout import weightless_model
        from llmtrt.pipelines.engine.profiles import max_positions_from_model

        self.onnx_path = Path(onnx_path)
        self.be = backend if isinstance(backend, Backend) else get_backend(backend)
        check_flags(self.be, precision=precision, opt_level=opt_level, workspace_mb=workspace_mb, target_cc=target_cc,
                    strip_weights=strip_weights, plugins=plugins)
        if not self.onnx_path.is_file():
            raise LlmtrtUserError(f"{self.onnx_path}: no such ONNX file")
        self.model = weightless_model(self.onnx_path)
        check_precision(self.model, precision)
        validate_profiles(profiles, max_positions or max_positions_from_model(self.model))
        merge = self.be.weights_per_profile is True if merge_profiles is None else merge_profiles
        self.profiles = engine_profiles(profiles, graph_input_dims(self.model), merge=merge)
        self.plugin_paths, self.override = setup_plugins(self.be, self.model, self.onnx_path, plugins)
        self.precision, self.target_cc, self.opt_level = precision, list(target_cc), opt_level
        self.workspace_mb, self.timing_cache, self.strip_weights = workspace_mb, timing_cache, strip_weights

    def run(self, out_dir: str | Path, *, source: Mapping[str, str] | None = None,
            extra: Mapping[str, Any] | None = None, digests: Digests | None = None,
            before_manifest: Callable[[], None] | None = None,
            progress: Callable[[str], None] | None = None) -> BuildResult:
        """Parse, build, stream the plan into ``out_dir`` and write the manifest.

        ``source`` ({"onnx", "onnx_sha256"}) names the exported ONNX this file was lowered from: the
        manifest then points at it (the built file goes under ``built_onnx``). ``extra`` entries are
        added to (and override) the manifest. ``before_manifest`` runs after the plan is written
        (``build_from_export`` checks the export's hash there); ``progress`` gets one line per phase.
        """
        say = progress or (lambda _msg: None)
        t_start = time.perf_counter()
        digests = digests or Digests()
        built_sha256 = digests.later(self.onnx_path, self.model)
        try:
            return self._run(Path(out_dir), built_sha256, source, extra, before_manifest, say, t_start)
        except BaseException:
            digests.cancel()
            raise

    def _run(self, out_dir: Path, built_sha256: Future[str], source: Mapping[str, str] | None,
             extra: Mapping[str, Any] | None, before_manifest: Callable[[], None] | None,
             say: Callable[[str], None], t_start: float) -> BuildResult:
        be, trt = self.be, self.be.module()
        logger = be.logger()
        mark = logger.mark()
        builder = trt.Builder(logger)
        t_parse = time.perf_counter()
        say(f"parsing {self.onnx_path.name} with {be.name} {be.version()}")
        parsed = parse_network(be, builder, self.onnx_path, self.model, self.override)
        try:
            return self._build(parsed, builder, built_sha256, out_dir, source, extra, before_manifest, say,
                               t_start, time.perf_counter() - t_parse, mark)
        finally:
            parsed.close()

    def _build(self, parsed: ParsedNetwork, builder: Any, built_sha256: Future[str], out_dir: Path,
               source: Mapping[str, str] | None, extra: Mapping[str, Any] | None,
               before_manifest: Callable[[], None] | None, say: Callable[[str], None], t_start: float,
               parse_seconds: float, mark: int) -> BuildResult:
        be, network = self.be, parsed.network
        logger = be.logger()
        config, cc_names = builder_config(be, builder, network, self.profiles, opt_level=self.opt_level,
                                          workspace_mb=self.workspace_mb, target_cc=self.target_cc,
                                          strip_weights=self.strip_weights)
        cache, cache_note = attach_timing_cache(be, config, self.timing_cache)
        out_dir.mkdir(parents=True, exist_ok=True)
        plan_path, manifest_path = plan_paths(out_dir, self.precision)
        manifest_path.unlink(missing_ok=True)  # a plan never sits next to a manifest that is not its own
        t_build = time.perf_counter()
        say(f"building {self.precision} engine: {network.num_layers} network layers, "
            f"{'one profile for ' if len(self.profiles[0].members) > 1 else 'profiles '}"
            f"{', '.join(m.name for p in self.profiles for m in p.members)}, opt level {self.opt_level}"
            + (f", targets {', '.join(cc_names)}" if cc_names else "")
            + (", weights stripped" if self.strip_weights else ""))
        with parsed.weights.trimmed() if parsed.weights is not None else contextlib.nullcontext():
            written = build_plan(be, builder, network, config, plan_path, f"{self.onnx_path.name} as {self.precision}")
        build_seconds = time.perf_counter() - t_build
        if before_manifest is not None:
            before_manifest()
        facts = BuildFacts(
            backend=be, precision=self.precision, plan_path=plan_path, plan=written, onnx_path=self.onnx_path,
            built_sha256=built_sha256.result(), model=self.model, profiles=self.profiles, cc_names=cc_names,
            builder={"opt_level": self.opt_level, "workspace_mb": self.workspace_mb, "timing_cache": cache_note,
                     "plugins": [str(p) for p in self.plugin_paths], "plugin_override": self.override,
                     "python_plugins": python_plugin_manifest(self.model), "strip_weights": self.strip_weights,
                     "profiles_merged": len(self.profiles[0].members) > 1},
            stats={"parse_seconds": round(parse_seconds, 3), "build_seconds": round(build_seconds, 3),
                   "total_seconds": round(time.perf_counter() - t_start, 3), "peak_rss_bytes": peak_rss_bytes()},
            strip_weights=self.strip_weights, source=source, warnings=logger.since(mark, "WARNING"))
        manifest = engine_manifest(facts, network, extra)
        write_json_atomically(manifest_path, manifest)
        if cache is not None and self.timing_cache is not None:
            from llmtrt.exporter.files import write_bytes_atomically

            write_bytes_atomically(Path(self.timing_cache), memoryview(cache.serialize()))
        return BuildResult(plan_path, manifest_path, manifest)


def build_engine(onnx_path: str | Path, out_dir: str | Path, *, precision: str,
                 backend: str | Backend | None = None, target_cc: Sequence[str] = (),
                 profiles: Sequence[Profile], opt_level: int = 3, workspace_mb: int | None = None,
                 timing_cache: str | Path | None = None, plugins: Sequence[str | Path] = (),
                 max_positions: int | None = None, source: Mapping[str, str] | None = None,
                 extra: Mapping[str, Any] | None = None, strip_weights: bool = False,
                 merge_profiles: bool | None = None,
                 progress: Callable[[str], None] | None = None) -> BuildResult:
    """Check, parse ``onnx_path`` (from its path, so external data works) and write plan + manifest
    into ``out_dir``: ``EngineBuild(...).run(...)`` in one call (see both for the arguments)."""
    job = EngineBuild(onnx_path, precision=precision, backend=backend, target_cc=target_cc, profiles=profiles,
                      opt_level=opt_level, workspace_mb=workspace_mb, timing_cache=timing_cache, plugins=plugins,
                      max_positions=max_positions, strip_weights=strip_weights, merge_profiles=merge_profiles)
    return job.run(out_dir, source=source, extra=extra, progress=progress)
