"""Every weight of a graph against the source checkpoint it was made from.

    findings = check_weights(graph, artifact_dir, manifest, source)

Which checkpoint tensor an initializer stands for comes from its name (the exporter names linear
weights ``<module>.weight_t`` = W^T, norms and embeddings by their checkpoint names, a tied lm_head
shares ``model.embed_tokens.weight``; a fused module such as ``qkv_proj``, listed in the manifest's
``fused``, stands for its parts' weights concatenated along the output axis) or, for quantized graphs,
from the weight map the precision step writes into the manifest (``weight_map``: per linear, its
source, scheme, scales and smoothing).
Tensors are read one at a time (graph initializers from external data, checkpoint tensors from
safetensors), so memory stays about one tensor whatever the model size.

Rules: fp32 bit-exact; fp16/bf16 exactly the source rounded to that type; int8/int4 dequantized within
half a quantization step (+ fp32 rounding) of the source scaled by its smoothing factor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from llmtrt.pipelines.checks.findings import Finding
from llmtrt.pipelines.checks.tensors import SourceTensors, read_initializer, rounded
from llmtrt.pipelines.checks.weight_map import check_linear, covered_initializers

_FLOATS = {1: np.float32, 10: np.float16, 16: "bfloat16"}


def source_of(name: str, config, fused: dict[str, list[str]] | None = None) -> tuple[str, bool] | None:
    """(checkpoint tensor, transposed) an fp32/half export initializer stands for, or None. A fused
    module's weight (``fused``: module -> parts, from the manifest) stands for ``part1.weight+part2.weight...``,
    which :meth:`SourceTensors.get` concatenates."""
    from llmtrt.exporter.weights import expected_shapes

    known = expected_shapes(config)
    for module, parts in (fused or {}).items():
        known[f"{module}.weight"] = "+".join(f"{part}.weight" for part in parts)
    if config.tie_word_embeddings:
        known["lm_head.weight"] = known["model.embed_tokens.weight"]
    base = name
    for suffix in (".fp16", ".bf16"):
        base = base.removesuffix(suffix)
    if base.endswith(".weight_t") and base[: -len("_t")] in known:
        base = base[: -len("_t")]
        return (known[base] if isinstance(known[base], str) else base), True
    if base in known:
        return (known[base] if isinstance(known[base], str) else base), False
    return None


def check_weights(graph, base_dir: Path, manifest: dict[str, Any], source) -> list[Finding]:
    """Findings for the weights: one per mismatching tensor, plus one summary finding."""
    sources = SourceTensors(source)
    config = source.config
    weight_map = manifest.get("weight_map") or {}
    linears = weight_map.get("linears") or {}
    mapped = _quantized_findings(graph, base_dir, linears, sources) if linears else []
    covered = covered_initializers(weight_map)
    findings, checked, largest = [], 0, 0.0
    for tensor in graph.graph.initializer:
        if tensor.name in covered or tensor.data_type not in _FLOATS:
            continue
        where = source_of(tensor.name, config, manifest.get("fused"))
        if where is None:
            if tensor.name.removesuffix(".fp16").removesuffix(".bf16").endswith(".weight_t"):  # a linear's weight
                findings.append(Finding("weights", tensor.name, False, "a linear weight with no checkpoint tensor "
                                        "behind it: neither the checkpoint nor the manifest's fused modules name it"))
            continue
        name, transposed = where
        have = read_initializer(tensor, base_dir)
        want = sources.get(name)
        want = rounded(want.T if transposed else want, tensor.data_type)
        checked += 1
        if have.shape != want.shape:
            findings.append(Finding("weights", tensor.name, False, f"shape {have.shape}, source {name} gives "
                                    f"{want.shape}"))
            continue
        diff = float(np.abs(have.astype(np.float64) - want).max()) if have.size else 0.0
        largest = max(largest, diff)
        if diff != 0.0:
            row = np.unravel_index(int(np.argmax(np.abs(have - want))), have.shape)
            findings.append(Finding("weights", tensor.name, False, f"differs from {name}"
                                    f"{'^T' if transposed else ''} of the source checkpoint by up to {diff:.3g} "
                                    f"(at {tuple(int(i) for i in row)})", diff))
    checked += len(linears)
    largest = max([largest, *(f.max_abs_diff for f in mapped if f.max_abs_diff is not None)])
    summary = Finding("weights", f"{checked} tensors", not findings and all(mapped),
                      f"every weight equals its source ({'exactly' if not weight_map else 'within its quantization'})"
                      if not findings and all(mapped) else "weights differ from the source checkpoint", largest)
    return [summary, *findings, *[f for f in mapped if not f]]


def _quantized_findings(graph, base_dir: Path, linears: dict[str, Any], sources: SourceTensors) -> list[Finding]:
    """The weight map's linears against their (smoothed) source (see checks/weight_map.py)."""
    inits = {t.name: t for t in graph.graph.initializer}
    return [check_linear(module, entry, inits, base_dir, sources) for module, entry in linears.items()]
