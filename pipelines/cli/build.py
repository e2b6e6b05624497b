"""``llmtrt build``: a TensorRT / TensorRT-RTX engine from an export directory."""

from __future__ import annotations

import json
from pathlib import Path

import click

from llmtrt.pipelines.cli import main, user_errors
from llmtrt.pipelines.errors import LlmtrtUserError

__all__ = ["build"]

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4", "fp8")


def _kv_cache(export_dir: str) -> str:
    """The export's cache layout, read as plain JSON (the build reads and checks the manifest fully)."""
    from llmtrt.pipelines.artifacts import read_manifest

    try:
        return str(json.loads((Path(export_dir) / "manifest.json").read_text(encoding="utf-8"))["kv_cache"])
    except (OSError, ValueError, KeyError, TypeError):
        return str(read_manifest(export_dir).get("kv_cache", "dynamic"))  # says what is wrong with it


def _target_cc(ctx: click.Context, param: click.Parameter, value: str | None) -> list[str]:
    return [cc.strip() for cc in value.split(",") if cc.strip()] if value else []


@main.command()
@click.argument("export_dir", type=click.Path(file_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Engine directory: model.<lower>.onnx, engine.<precision>.plan and engine.<precision>.json.")
@click.option("--backend", type=click.Choice(["tensorrt", "tensorrt-rtx"]), default=None,
              help="TensorRT (10.x/11.x, builds for the GPU it runs on) or TensorRT-RTX (ahead-of-time, no GPU "
                   "needed). Default: whichever is installed, tensorrt first.")
@click.option("--precision", default=None, metavar="|".join(PRECISIONS),
              help="What the engine must be. Engines are strongly typed: the precision comes from the graph, so "
                   "this is a check, never a conversion. Default: the export manifest's precision.")
@click.option("--lower", type=click.Choice(["native", "inline", "plugin"]), default="native", show_default=True,
              help="How custom ops reach TensorRT. native: built-in RMSNormalization, RotaryEmbedding, Attention "
                   "(+ TensorScatter KV-cache update for a static cache); inline: their ONNX function bodies "
                   "(primitive ops); plugin: keep the nodes for plugin libraries given with --plugins.")
@click.option("--plugins", "plugins", callback=lambda _c, _p, v: [p.strip() for p in (v or "").split(",") if p.strip()],
              default=None, metavar="LIB[,LIB]",
              help="Plugin libraries (.so) to load, comma-separated. Plugins override built-in importers.")
@click.option("--target-cc", callback=_target_cc, default=None, metavar="8.6,8.9,...",
              help="TensorRT-RTX: compute capabilities to build for, comma-separated (default: the backend's).")
@click.option("--opt-level", type=click.IntRange(0, 5), default=3, show_default=True,
              help="Builder optimization level (0 fastest build .. 5 most tuning).")
@click.option("--workspace-mb", type=click.IntRange(min=1), default=None,
              help="Workspace memory-pool limit in MiB (default: TensorRT's).")
@click.option("--timing-cache", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="TensorRT timing cache to read and update (TensorRT-RTX has none: noted and ignored).")
@click.option("--max-batch", type=int, default=1, show_default=True, help="Largest batch both profiles accept.")
@click.option("--max-prompt", type=int, default=None,
              help="Longest prompt of the prefill profile (default: 512, or fewer if the model has fewer positions).")
@click.option("--max-kv", type=int, default=None,
              help="KV-cache capacity. Growing cache: most cached tokens in the decode profile (default: max "
                   "positions - 1). Static cache: the fixed cache length max_cache_length (default: max positions).")
@click.option("--profiles", "profiles_yaml", type=click.Path(dir_okay=False), default=None, metavar="YAML",
              help="Profiles from a file instead of --max-batch/--max-prompt/--max-kv (see the example below).")
@click.option("--strip-weights", is_flag=True,
              help="Leave the weights out of the plan (a few MB instead of the weights' size); the runtime refits "
                   "them from OUT/model.<lower>.onnx, whose sha256 the manifest's `refit` records. TensorRT-RTX "
                   "needs the NVIDIA driver (libcuda.so.1) installed to build one, GPU or not.")
@click.option("--separate-profiles", is_flag=True,
              help="Build prefill and decode as separate optimization profiles. By default TensorRT-RTX gets one "
                   "profile covering both, because it stores the weights once per profile (2 profiles: plan = 2x).")
@click.option("--verbose", is_flag=True,
              help="Also print TensorRT's own log (its warnings and errors are kept in the engine manifest).")
@click.option("--json", "as_json", is_flag=True, help="Print only the machine-readable summary.")
@user_errors
def build(export_dir: str, out_dir: str, backend: str | None, precision: str | None, lower: str,
          plugins: list[str], target_cc: list[str], opt_level: int, workspace_mb: int | None,
          timing_cache: str | None, max_batch: int, max_prompt: int | None, max_kv: int | None,
          profiles_yaml: str | None, strip_weights: bool, separate_profiles: bool, verbose: bool, as_json: bool) -> None:
    """Build a TensorRT engine from EXPORT_DIR (written by `llmtrt export` or `llmtrt quantize`).

    The ONNX named by EXPORT_DIR/manifest.json is lowered to OUT/model.<lower>.onnx and built into
    OUT/engine.<precision>.plan for prefill and decode shapes: TensorRT gets a profile for each,
    TensorRT-RTX one profile covering both (it stores the weights once per profile; see
    --separate-profiles).
    OUT/engine.<precision>.json records the backend and version, target compute capabilities,
    profiles, the exported ONNX's sha256, plan sha256, plan size against the weights', build
    seconds, peak RSS and the network's layers with their precisions. Flags are checked before any
    file is hashed; the plan is streamed to disk; nothing is left in OUT when the build fails.

    \b
    An fp16 (bf16, int8, ...) engine needs a graph in that precision: run
    `llmtrt quantize --to fp16` on the export first; asking for fp16 on an fp32 graph is an error.
    A node TensorRT cannot import is listed with the parser's message and the --lower to try.

    \b
    Examples:
      llmtrt build out/onnx --out out/engines
      llmtrt build out/onnx --out out/engines --backend tensorrt-rtx --target-cc 8.6,8.9,12.0
      llmtrt build out/fp16 --out out/engines-fp16 --precision fp16 --max-batch 4 --max-prompt 256 --max-kv 1024
      llmtrt build out/static --out out/engines-static --max-kv 1024   (static cache: 1024 slots)
      llmtrt build out/onnx --out out/engines --lower inline --json
      llmtrt build out/onnx --out out/engines --profiles profiles.yaml
      llmtrt build out/onnx --out out/engines-stripped --strip-weights   (refit from the ONNX when loaded)

    \b
    profiles.yaml (growing cache; each range is N, [min, opt, max] or {min:, opt:, max:}):
      prefill: {batch: [1, 1, 4], seq: [1, 128, 512], past: 0}
      decode:  {batch: [1, 1, 4], seq: 1, past: [1, 512, 2047]}
    For a static-cache export add `max_cache_length: 2048` and leave out past.
    """
    from llmtrt.pipelines.engine.profiles import profiles_from_yaml

    profiles = None
    if profiles_yaml is not None:
        given = [flag for flag, value in (("--max-prompt", max_prompt), ("--max-kv", max_kv)) if value is not None]
        if click.get_current_context().get_parameter_source("max_batch") == click.core.ParameterSource.COMMANDLINE:
            given.insert(0, "--max-batch")
        if given:
            raise LlmtrtUserError(f"--profiles {profiles_yaml} and {', '.join(given)} both set profiles; use one")
        profiles = profiles_from_yaml(profiles_yaml, _kv_cache(export_dir))

    import logging

    logging.getLogger("llmtrt.pipelines.engine.backends").setLevel(logging.DEBUG if verbose else logging.CRITICAL)

    def progress(message: str) -> None:
        if not as_json:
            click.echo(message, err=True)

    from llmtrt.pipelines.engine.from_export import build_from_export

    result = build_from_export(export_dir, out_dir, precision=precision, backend=backend, lower=lower,
                               target_cc=target_cc, max_batch=max_batch, max_prompt=max_prompt, max_kv=max_kv,
                               profiles=profiles, opt_level=opt_level, workspace_mb=workspace_mb,
                               timing_cache=timing_cache, plugins=plugins, strip_weights=strip_weights,
                               merge_profiles=False if separate_profiles else None, progress=progress)
    _print_result(result, as_json)


def _print_result(result, as_json: bool) -> None:
    m = result.manifest
    summary = {"plan": str(result.plan_path), "manifest": str(result.manifest_path), "precision": m["precision"],
               "backend": m["backend"]["name"], "backend_version": m["backend"]["version"],
               "lower": m["lowering"]["mode"], "kv_cache": m["kv_cache"],
               "target_compute_capabilities": m["target_compute_capabilities"],
               "profiles": [{k: v for k, v in p.items() if k != "shapes"} for p in m["profiles"]],
               "plan_bytes": m["plan_bytes"], "weights_bytes": m["weights"]["bytes"],
               "plan_over_weights": m["weights"]["plan_over_weights"], "weights_stripped": m["weights"]["stripped"],
               "layers": m["network"]["num_layers"],
               "onnx_sha256": m["onnx_sha256"], **m["stats"]}
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    ratio = m["weights"]["plan_over_weights"]
    click.echo(f"wrote {result.plan_path} ({m['plan_bytes'] / 2**20:.1f} MiB"
               + (f" = {ratio:.2f}x the weights" if ratio is not None else "")
               + (", weights stripped: refit from " + m["refit"]["onnx"] if m["weights"]["stripped"] else "")
               + f", {m['network']['num_layers']} network "
               f"layers, {m['precision']}, {m['backend']['name']} {m['backend']['version']}) in "
               f"{m['stats']['total_seconds']:.1f} s (build {m['stats']['build_seconds']:.1f} s), peak RSS "
               f"{m['stats']['peak_rss_bytes'] / 2**20:.0f} MiB")
    click.echo(f"manifest: {result.manifest_path}")
