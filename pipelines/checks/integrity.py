"""What an artifact *is*, checked before it is run: hashes, graph facts against the manifest and the
source model, and every weight against the source checkpoint.

    findings = check_artifact("out/int8-sq")      # list[Finding]; bool(f) means the check passed

- files: ``onnx_sha256`` (graph + external data) recomputed and compared with the manifest;
- model: the manifest's config is the source model's config (re-opened from ``model_source``, whose
  config+weights fingerprint must still match), and the graph agrees with it — RMSNorm epsilons,
  attention head counts and scale, the rotary cos/sin tables, the IO names;
- weights: every initializer that stands for a checkpoint tensor equals it — bit-exact for fp32,
  exactly the rounded value for fp16/bf16, and for quantized graphs the dequantized weight within half
  a quantization step of the (smoothed) source, as the precision step's weight map in the manifest
  describes (:mod:`llmtrt.pipelines.checks.weights`);
- precision: the precision inventory recomputed from the written graph matches the manifest's claim.

A truncated or unreadable model.onnx / manifest.json is a user error (exit 2) raised by the loaders;
everything here is a finding (exit 1 when one fails) naming the tensor and the largest difference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from llmtrt.exporter.errors import LlmtrtUserError
from llmtrt.pipelines.checks.findings import Finding


def check_artifact(directory: str | Path, manifest: dict[str, Any] | None = None, *,
                   weights: bool = True) -> list[Finding]:
    """All integrity findings for an ONNX artifact directory (see the module docstring)."""
    from llmtrt.pipelines.artifacts import MANIFEST, load_exported, load_graph, onnx_sha256, read_manifest

    directory = Path(directory)
    manifest = manifest if manifest is not None else read_manifest(directory)
    exported = load_exported(directory, manifest)
    graph = load_graph(exported.onnx_path)
    findings = [_hash_finding(exported.onnx_path, manifest, onnx_sha256(exported.onnx_path, graph))]
    source, reason = _source(manifest, directory / MANIFEST)
    if source is None:
        findings.append(Finding("model", "model_source", False, reason))
        return findings
    findings.append(_config_finding(manifest, source))
    findings += graph_facts(graph, exported.config, exported.io, exported.onnx_path.parent)
    findings += _precision_findings(graph, manifest)
    if weights:
        from llmtrt.pipelines.checks.weights import check_weights

        findings += check_weights(graph, exported.onnx_path.parent, manifest, source)
    return findings


def _hash_finding(onnx_path: Path, manifest: dict[str, Any], digest: str) -> Finding:
    ok = digest == manifest["onnx_sha256"]
    return Finding("files", onnx_path.name, ok, "sha256 of the graph and its external data matches the manifest"
                   if ok else f"sha256 {digest[:12]}... differs from the manifest's onnx_sha256 "
                   f"{manifest['onnx_sha256'][:12]}...: the files changed after they were written")


def _source(manifest: dict[str, Any], where: Path):
    from llmtrt.pipelines.artifacts import open_model_source

    try:
        return open_model_source(manifest, where), ""
    except LlmtrtUserError as exc:
        return None, str(exc)


def _config_finding(manifest: dict[str, Any], source) -> Finding:
    mine, theirs = manifest["config"], source.config.to_dict()
    diff = sorted(k for k in set(mine) | set(theirs) if k != "name" and mine.get(k) != theirs.get(k))
    return Finding("model", "config", not diff, "the manifest's config is the source model's" if not diff else
                   "manifest config differs from the source model's in " + ", ".join(
                       f"{k} ({mine.get(k)!r} vs {theirs.get(k)!r})" for k in diff))


# --------------------------------------------------------------------------------------------
# graph facts
# --------------------------------------------------------------------------------------------
def graph_facts(graph, config, io, base_dir: Path) -> list[Finding]:
    """The graph's epsilons, head counts, attention scale, rotary tables and IO against the config
    (tables in external data are read from ``base_dir``)."""
    from onnx import helper

    findings = []
    eps = _epsilons(graph)
    want = np.float32(config.rms_norm_eps)
    bad = [e for e in eps if np.float32(e) != want]
    findings.append(Finding("graph", "rms_norm_eps", bool(eps) and not bad,
                            f"{len(eps)} RMSNorm epsilon(s) equal config.rms_norm_eps {config.rms_norm_eps}"
                            if eps and not bad else f"RMSNorm epsilon {bad[0] if bad else None} in the graph, "
                            f"config.rms_norm_eps {config.rms_norm_eps}"))
    heads = {(helper.get_attribute_value(a)) for n in graph.graph.node if n.op_type in
             ("GroupQueryAttention", "GroupQueryAttentionStatic", "Attention") for a in n.attribute
             if a.name == "q_num_heads"}
    kv = {(helper.get_attribute_value(a)) for n in graph.graph.node if n.op_type in
          ("GroupQueryAttention", "GroupQueryAttentionStatic", "Attention") for a in n.attribute
          if a.name == "kv_num_heads"}
    if heads or kv:
        ok = heads == {config.num_attention_heads} and kv == {config.num_key_value_heads}
        findings.append(Finding("graph", "attention heads", ok, f"q_num_heads {sorted(heads)}, kv_num_heads "
                                f"{sorted(kv)}; config {config.num_attention_heads}/{config.num_key_value_heads}"))
    tables = {t.name: t for t in graph.graph.initializer if t.name in ("rope_cos", "rope_sin")}
    if tables:
        from llmtrt.exporter.model import rope_tables
        from llmtrt.pipelines.checks.tensors import read_initializer

        cos, sin = rope_tables(config, int(tables["rope_cos"].dims[0]))
        worst = max(float(np.abs(read_initializer(tables[n], base_dir).astype(np.float64) - ref.numpy()).max())
                    for n, ref in (("rope_cos", cos), ("rope_sin", sin)) if n in tables)
        findings.append(Finding("graph", "rope_cos/rope_sin", worst <= 2e-3, "rotary tables recomputed from the "
                                "config (theta, scaling)", worst))
    names = [v.name for v in graph.graph.input if v.name not in {t.name for t in graph.graph.initializer}]
    outputs = [v.name for v in graph.graph.output]
    ok = names == io.input_names and outputs == io.output_names
    findings.append(Finding("graph", "inputs/outputs", ok, "graph IO names equal the manifest's io" if ok else
                            f"graph IO {names + outputs} differs from the manifest's {io.input_names + io.output_names}"))
    return findings


def _epsilons(graph) -> list[float]:
    """Every RMSNorm epsilon: node attributes, or the constant (a Constant node or a scalar initializer)
    added to ReduceMean(x^2) when inlined."""
    from onnx import numpy_helper

    found = [a.f for n in graph.graph.node if n.op_type in ("RMSNorm", "RMSNormalization")
             for a in n.attribute if a.name == "epsilon"]
    producers = {o: n for n in graph.graph.node for o in n.output}
    scalars = {t.name: t for t in graph.graph.initializer if not t.dims and not t.external_data}
    for n in graph.graph.node:
        if n.op_type == "Add" and getattr(producers.get(n.input[0]), "op_type", "") == "ReduceMean":
            const = producers.get(n.input[1])
            if const is not None and const.op_type == "Constant" and const.attribute:
                attr = const.attribute[0]
                found.append(attr.f if attr.name == "value_float" else float(numpy_helper.to_array(attr.t)))
            elif n.input[1] in scalars:
                found.append(float(numpy_helper.to_array(scalars[n.input[1]])))
    return found


# --------------------------------------------------------------------------------------------
# precision
# --------------------------------------------------------------------------------------------
def _precision_findings(graph, manifest: dict[str, Any]) -> list[Finding]:
    """The precision inventory recomputed from the graph against the manifest's claim (where the precision
    step's inventory module is available)."""
    try:
        from llmtrt.pipelines.precision import inventory as inv
        from llmtrt.pipelines.precision.mix import LABELS
    except ImportError:
        return []
    found = inv.inventory(graph)
    mix = manifest.get("mix")
    if mix is None:
        problem = found.contradicts(manifest["precision"])
    else:  # a mixed precision: each linear as the mix says
        problem = found.contradicts_mix({m: LABELS[s] for m, s in mix["linears"].items()})
    findings = [Finding("precision", manifest["precision"], problem is None,
                        problem or f"the graph is {manifest['precision']}: {found.summary()}")]
    recorded = manifest.get("precision_inventory")
    if recorded is not None:
        same = inv.Inventory.from_dict(recorded) == found
        findings.append(Finding("precision", "manifest inventory", same, "the manifest's inventory is the graph's"
                                if same else "the manifest's precision inventory differs from the graph's"))
    return findings
