"""The ``llmtrt`` command line: a thin Click layer over the library.

Each command parses its options, calls one library function and prints. Heavy imports (torch,
onnx, TensorRT) happen inside the commands so ``--help`` is instant. A user error prints one line
and exits 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import json
import sys
import time

import click

from llmtrt.exporter.errors import LlmtrtUserError

EXIT_USAGE = 2


def one_line(message: str) -> str:
    """A user error on one line: lists (e.g. every node TensorRT refused) are joined with '; '."""
    parts = [p.strip() for p in message.splitlines() if p.strip()]
    parts = [p[2:] if p.startswith("- ") else p for p in parts]
    out = parts[0] if parts else ""
    for part in parts[1:]:
        out += (" " if out.endswith(":") else "; ") + part
    return out


def user_errors(func):
    """Turn LlmtrtUserError into ``error: ...`` on stderr and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except LlmtrtUserError as exc:
            click.echo(f"error: {one_line(str(exc))}", err=True)
            sys.exit(EXIT_USAGE)

    return wrapper


def _progress(message: str, *, quiet: bool = False) -> None:
    if not quiet:
        click.echo(message, err=True)


class _Llmtrt(click.Group):
    """Click's usage errors (a missing option, a bad choice) printed like llmtrt's own: one line, exit 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            command = f" {exc.ctx.command_path.split(' ', 1)[1]}" if getattr(exc, "ctx", None) and \
                " " in exc.ctx.command_path else ""
            click.echo(f"error: {one_line(exc.format_message())} (see `llmtrt{command} --help`)", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("aborted", err=True)
            sys.exit(1)


@click.group(cls=_Llmtrt, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="llmtrt")
def main() -> None:
    """Llama-family decoders from PyTorch to ONNX and TensorRT engines, with the numbers checked.

    \b
    Everything in one go (what `make demo` runs):
      llmtrt pipeline run configs/pipelines/demo.yaml --out out/demo
    \b
    Or stage by stage, on the built-in trained model:
      llmtrt export --model bytes-llama --out out/onnx
      llmtrt quantize out/onnx --to int8-sq --out out/int8-sq
      llmtrt validate out/int8-sq                   (PyTorch vs ONNX Runtime vs TensorRT)
      llmtrt compare out/onnx out/int8-sq --out out/compare
      llmtrt build out/int8-sq --out out/engines    (TensorRT / TensorRT-RTX)
      llmtrt generate out/onnx --prompt "The"

    Models: an HF checkpoint directory (config.json + safetensors) or a preset
    name (see `llmtrt export --help`). Exit codes: 0 ok, 1 a numerics gate failed,
    2 bad input (the message names the file or option and the fix).
    """


@main.command()
@click.option("--model", "model_spec", required=True, metavar="PRESET|DIR",
              help="Preset name (tiny, bytes-llama, tinyllama-1.1b, llama-3.2-1b, llama-3.1-8b, ...) or an HF "
                   "checkpoint directory with config.json and model.safetensors (or a sharded index).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--ops", "dialect", type=click.Choice(["custom", "standard", "decomposed"]), default="standard",
              show_default=True,
              help="standard: opset-23 RMSNormalization/RotaryEmbedding/Attention (fastest in ONNX Runtime; "
                   "TensorRT >= 10.15 / TensorRT-RTX import it); "
                   "custom: llmtrt RMSNorm/RotaryEmbedding/GroupQueryAttention nodes with ONNX function bodies "
                   "(any TensorRT: inlined or routed to plugins); "
                   "decomposed: primitive ops only (opset >= 17) for old runtimes.")
@click.option("--opset", type=int, default=None, help="Default-domain opset (default: 18 custom, 23 standard, 17 decomposed).")
@click.option("--max-positions", "max_positions", type=int, default=None,
              help="Longest sequence (past + new tokens) the graph supports; sizes the rotary tables. "
                   "Default: the model's max_position_embeddings.")
@click.option("--kv-cache", type=click.Choice(["dynamic", "static"]), default="dynamic", show_default=True,
              help="dynamic: past_key_values.* [batch, kv_heads, past, head_dim] in, present.* (past+seq) out "
                   "(ONNX Runtime); static: a fixed-size cache [batch, kv_heads, max_cache_length, head_dim] "
                   "updated in place at per-sequence write_indices [batch] (TensorRT's KV-cache update).")
@click.option("--logits", type=click.Choice(["all", "last"]), default="all", show_default=True,
              help="all: logits [batch, seq, vocab] for every position (what `llmtrt compare` scores); last: "
                   "[batch, 1, vocab] for the last position only (all that generate and engines need: no lm_head "
                   "over the prompt).")
@click.option("--fuse/--no-fuse", default=True, show_default=True,
              help="One MatMul for q/k/v (qkv_proj) and one for gate/up (gate_up_proj), weights concatenated "
                   "along the output axis and listed in the manifest's `fused`; same numbers, fewer kernels.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for presets without weights (random init).")
@click.option("--json", "as_json", is_flag=True, help="Print only the machine-readable summary.")
@user_errors
def export(model_spec: str, out_dir: str, dialect: str, opset: int | None, max_positions: int | None,
           kv_cache: str, logits: str, fuse: bool, seed: int, as_json: bool) -> None:
    """Export a model to DIR/model.onnx plus DIR/manifest.json.

    \b
    Graph IO (ONNX Runtime GenAI names; batch, sequence and past are dynamic):
      input_ids, position_ids [batch, seq] int64; attention_mask [batch, past+seq] int64
      past_key_values.{i}.key|value [batch, kv_heads, past, head_dim]
      -> logits [batch, seq, vocab] ([batch, 1, vocab] with --logits last),
         present.{i}.key|value [batch, kv_heads, past+seq, head_dim]

    \b
    Examples:
      llmtrt export --model tiny --out out/tiny
      llmtrt export --model ./Llama-3.2-1B --out out/llama --ops standard
      llmtrt export --model bytes-llama --out out/static --kv-cache static --ops standard
    """
    from llmtrt.exporter.config import resolve_model
    from llmtrt.exporter.files import check_out_dir
    from llmtrt.exporter.onnx_export import ExportOptions
    from llmtrt.pipelines.artifacts import MANIFEST, export_artifact

    options = ExportOptions(dialect=dialect, opset=opset, max_positions=max_positions, kv_cache=kv_cache,
                            logits=logits, fuse=fuse)
    options.resolved_opset()  # reject a bad --ops/--opset pair before any work
    check_out_dir(out_dir)
    t0 = time.perf_counter()
    source = resolve_model(model_spec, seed=seed)
    if source.is_checkpoint:  # file list, keys and shapes from the headers: fail before any progress or work
        from llmtrt.exporter.streaming import Checkpoint

        Checkpoint(source.config, source.checkpoint_dir)
    kind = f"weights from {source.checkpoint_dir}" if source.is_checkpoint else f"random init, seed {seed}"
    _progress(f"exporting {source.config.name} ({source.config.num_parameters / 1e6:.1f}M params, {kind}) "
              f"with --ops {dialect}", quiet=as_json)
    exported = export_artifact(source, out_dir, options)
    stats = {**exported.stats, "total_seconds": round(time.perf_counter() - t0, 3)}
    manifest = exported.onnx_path.parent / MANIFEST
    summary = {"onnx": str(exported.onnx_path), "manifest": str(manifest), "ops": dialect,
               "kv_cache": kv_cache, "opset": exported.opset, "logits": logits, "fused": len(exported.fused), **stats}
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        click.echo(f"wrote {exported.onnx_path} (opset {exported.opset}, {dialect} ops) in "
                   f"{stats['total_seconds']:.1f} s, peak RSS {stats['peak_rss_bytes'] / 2**20:.0f} MiB")
        click.echo(f"manifest: {manifest}")


# Each stage's command lives in its own module and attaches itself to ``main`` on import.
_COMMAND_MODULES = ("llmtrt.pipelines.cli.build", "llmtrt.pipelines.cli.quantize", "llmtrt.pipelines.cli.validate",
                    "llmtrt.pipelines.cli.compare", "llmtrt.pipelines.cli.generate", "llmtrt.pipelines.cli.pipeline")


def _load_commands() -> None:
    import importlib
    import importlib.util

    for module in _COMMAND_MODULES:
        if importlib.util.find_spec(module) is not None:  # stages not installed in this tree are absent
            importlib.import_module(module)


_load_commands()

if __name__ == "__main__":  # pragma: no cover
    main()
