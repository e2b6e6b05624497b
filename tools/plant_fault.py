"""Plant one known fault in a copy of a correct artifact, the way a buggy exporter or a tamperer would.

    python -m tools.plant_fault out/int4-awq --fault interleaved_rope --out /tmp/faulty
    python -m tools.plant_fault --list

A check is only a check once it has failed: every fault here must make ``llmtrt validate`` fail
(tests/pipelines/test_faults.py plants each one in fp32, fp16, int8-sq and int4-awq artifacts of every
dialect). Graph faults are planted at tensors every dialect and precision share — the outputs of the
named q/k/v/o projection MatMuls (in a fused graph, the columns of ``qkv_proj``'s output that hold q, k
or v, as the manifest's ``fused`` orders them), ``position_ids``, the embedding Gather — so the same
surgery works on custom, standard and decomposed graphs, fused or not. After the surgery the manifest's ``onnx_sha256`` is
recomputed ("re-signed"), so the fault has to be found by looking at what the artifact is, not by
its hash; ``tampered_manifest`` is the one fault that leaves the hash wrong.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

Fault = Callable[[onnx.ModelProto, dict, Path], str]  # (model, manifest, artifact dir) -> what was done
FAULTS: dict[str, tuple[str, Fault]] = {}


def fault(name: str, summary: str):
    def register(fn: Fault) -> Fault:
        FAULTS[name] = (summary, fn)
        return fn
    return register


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _node(model: onnx.ModelProto, suffix: str, layer: int = 0, required: bool = True) -> onnx.NodeProto | None:
    """The node of a named projection (``q_proj`` ...) in ``layer``, however the dialect/precision wrote it."""
    want = f"/model/layers/{layer}/" + suffix + "/"
    for n in model.graph.node:
        if n.name.startswith(want) and n.op_type in ("MatMul", "MatMulNBits", "Gemm"):
            return n
    if not required:
        return None
    raise SystemExit(f"no {want}MatMul node: is this an llmtrt artifact?")


def _columns(model: onnx.ModelProto, manifest: dict, layer: int, proj: str) -> tuple[str, int, int, int]:
    """(tensor, first column, columns, the tensor's width): where attention projection ``proj`` (q_proj,
    k_proj, v_proj) puts its output in ``layer``: its own MatMul's output, or its columns of a fused one."""
    c = _config(manifest)
    d = c["head_dim"]
    widths = {"q_proj": c["num_attention_heads"] * d, "k_proj": c["num_key_value_heads"] * d,
              "v_proj": c["num_key_value_heads"] * d}
    node = _node(model, f"self_attn/{proj}", layer, required=False)
    if node is not None:
        return node.output[0], 0, widths[proj], widths[proj]
    module = f"model.layers.{layer}.self_attn.{proj}"
    for fused, parts in (manifest.get("fused") or {}).items():
        if module in parts:
            names = [part.rsplit(".", 1)[1] for part in parts]
            node = _node(model, "self_attn/" + fused.rsplit(".", 1)[1], layer)
            first = sum(widths[n] for n in names[:names.index(proj)])
            return node.output[0], first, widths[proj], sum(widths[n] for n in names)
    raise SystemExit(f"no {proj} MatMul in layer {layer} and no fused module holding it: is this an llmtrt artifact?")


def _permute(model: onnx.ModelProto, manifest: dict, layer: int, perms: dict[str, np.ndarray], tag: str) -> None:
    """Reorder the output columns of the named projections of ``layer``: column j of projection p becomes
    its column ``perms[p][j]`` (a Gather after the MatMul, fused or not; other columns unchanged)."""
    by_tensor: dict[str, np.ndarray] = {}
    for proj, perm in perms.items():
        tensor, first, count, width = _columns(model, manifest, layer, proj)
        index = by_tensor.setdefault(tensor, np.arange(width))
        index[first:first + count] = first + perm
    for k, (tensor, index) in enumerate(by_tensor.items()):
        _gather_last(model, tensor, index, f"{tag}{layer}_{k}")


def _insert_after(model: onnx.ModelProto, tensor: str, make: Callable[[str, str], list[onnx.NodeProto]]) -> None:
    """Route every consumer of ``tensor`` through new nodes ``make(tensor, new_name)``."""
    new = f"{tensor}.planted"
    for n in model.graph.node:
        for i, name in enumerate(n.input):
            if name == tensor:
                n.input[i] = new
    nodes = list(model.graph.node)
    at = next((k for k, n in enumerate(nodes) if tensor in n.output), -1) + 1
    nodes[at:at] = make(tensor, new)
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def _gather_last(model: onnx.ModelProto, tensor: str, index: np.ndarray, tag: str) -> None:
    init = numpy_helper.from_array(index.astype(np.int64), f"planted.{tag}.index")
    model.graph.initializer.append(init)
    _insert_after(model, tensor, lambda src, dst: [
        helper.make_node("Gather", [src, init.name], [dst], axis=-1, name=f"/planted/{tag}/Gather")])


def _config(manifest: dict) -> dict:
    return manifest["config"]


def _array(model: onnx.ModelProto, name: str, base: Path) -> tuple[onnx.TensorProto, np.ndarray]:
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    t = next(t for t in model.graph.initializer if t.name == name)
    if uses_external_data(t):
        load_external_data_for_tensor(t, str(base))
    return t, numpy_helper.to_array(t)


def _set(t: onnx.TensorProto, value: np.ndarray) -> None:
    t.CopyFrom(numpy_helper.from_array(value.astype(numpy_helper.to_array(t).dtype), t.name))


# --------------------------------------------------------------------------------------------
# the faults
# --------------------------------------------------------------------------------------------
@fault("embedding_row", "one row of the token embedding +0.05, of a token the validation prompts never hold")
def embedding_row(model, manifest, base):
    gather = next(n for n in model.graph.node if n.op_type == "Gather" and n.input[1] == "input_ids")
    t, table = _array(model, gather.input[0], base)
    token = _config(manifest)["vocab_size"] - 1  # byte 255 for byte-level models: never in UTF-8 text
    table = table.copy()
    table[token] += np.asarray(0.05, dtype=table.dtype)
    _set(t, table)
    return f"{t.name}[{token}] += 0.05"


@fault("mlp_row", "one output row of layer 0's down_proj weight +0.05 (or its quantization scale x1.5)")
def mlp_row(model, manifest, base):
    node = _node(model, "mlp/down_proj")
    weight = node.input[1]
    producer = next((n for n in model.graph.node if weight in n.output), None)
    if producer is not None and producer.op_type == "DequantizeLinear":  # int8 / int4: scale the row's scales
        t, scale = _array(model, producer.input[1], base)
        scale = scale.copy()
        scale[..., 3] *= 1.5
        _set(t, scale)
        return f"{t.name}[..., 3] *= 1.5"
    if producer is not None and producer.op_type == "Cast":  # a weight cast at run time
        weight = producer.input[0]
    t, w = _array(model, weight, base)
    w = w.copy()
    w[:, 3] += np.asarray(0.05, dtype=w.dtype)
    _set(t, w)
    return f"{t.name}[:, 3] += 0.05"


def _head_perm(heads: int, kv_heads: int) -> np.ndarray:
    """Position of query head h when heads are regrouped as h -> kv head h % kv_heads (repeat instead of
    repeat_interleave), so the graph's h // groups mapping then pairs it with the wrong K/V head."""
    groups = heads // kv_heads
    return np.array([(h % kv_heads) * groups + h // kv_heads for h in range(heads)])


@fault("wrong_kv_group", "query head h attends to K/V head h % kv_heads instead of h // groups (all layers)")
def wrong_kv_group(model, manifest, base):
    c = _config(manifest)
    heads, kv, d = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    place = _head_perm(heads, kv)
    if heads == kv or np.array_equal(place, np.arange(heads)):
        raise SystemExit("wrong_kv_group needs grouped-query attention with more than one K/V head")
    source = np.argsort(place)  # head at position p is the query head source[p]
    cols = np.concatenate([np.arange(d) + d * source[p] for p in range(heads)])
    back = np.concatenate([np.arange(d) + d * place[h] for h in range(heads)])
    for layer in range(c["num_hidden_layers"]):
        _permute(model, manifest, layer, {"q_proj": cols}, "q_heads")
        _gather_last(model, _node(model, "self_attn/o_proj", layer).input[0], back, f"o_heads{layer}")
    return "query heads regrouped before attention and restored after it"


@fault("kv_swapped", "K and V projections swapped into attention in layer 0")
def kv_swapped(model, manifest, base):
    k, k_first, count, width = _columns(model, manifest, 0, "k_proj")
    v, v_first, _, _ = _columns(model, manifest, 0, "v_proj")
    if k == v:  # fused: exchange the k and v columns of the one output
        index = np.arange(width)
        index[k_first:k_first + count], index[v_first:v_first + count] = (index[v_first:v_first + count].copy(),
                                                                          index[k_first:k_first + count].copy())
        _gather_last(model, k, index, "kv_swap")
        return f"k and v columns of {k} exchanged"
    for n in model.graph.node:
        for i, name in enumerate(n.input):
            if name == k:
                n.input[i] = v
            elif name == v:
                n.input[i] = k
    return f"consumers of {k} and {v} exchanged"


@fault("interleaved_rope", "rotary pairs interleaved channels (2i, 2i+1) instead of half-split (i, i + d/2)")
def interleaved_rope(model, manifest, base):
    # interleaved(x) = P^T half_split(P x) per head; q.k is unchanged by the common P^T, so permuting the
    # q and k projections' channels into P order gives exactly interleaved-RoPE scores.
    c = _config(manifest)
    d = c["head_dim"]
    per_head = np.concatenate([np.arange(0, d, 2), np.arange(1, d, 2)])
    for layer in range(c["num_hidden_layers"]):
        perms = {proj: np.concatenate([per_head + h * d for h in range(heads)])
                 for proj, heads in (("q_proj", c["num_attention_heads"]), ("k_proj", c["num_key_value_heads"]))}
        _permute(model, manifest, layer, perms, "rope")
    return "q/k channels permuted to the interleaved pairing in every layer"


@fault("position_off_by_one", "position_ids + 1 everywhere")
def position_off_by_one(model, manifest, base):
    one = numpy_helper.from_array(np.array(1, dtype=np.int64), "planted.one")
    model.graph.initializer.append(one)
    _insert_after(model, "position_ids", lambda src, dst: [
        helper.make_node("Add", [src, one.name], [dst], name="/planted/positions/Add")])
    return "position_ids -> position_ids + 1"


@fault("rmsnorm_eps_zero", "RMSNorm epsilon 0 instead of the config's")
def rmsnorm_eps_zero(model, manifest, base):
    count = 0
    for n in model.graph.node:
        if n.op_type in ("RMSNorm", "RMSNormalization"):
            for a in n.attribute:
                if a.name == "epsilon":
                    a.f = 0.0
                    count += 1
    if not count:  # decomposed: Add(ReduceMean(x^2), eps) with eps a Constant or a scalar initializer
        producers = {o: n for n in model.graph.node for o in n.output}
        scalars = {t.name: t for t in model.graph.initializer if not t.dims}
        for n in model.graph.node:
            if n.op_type == "Add" and producers.get(n.input[0], onnx.NodeProto()).op_type == "ReduceMean":
                const = producers.get(n.input[1])
                if n.input[1] in scalars:
                    value = numpy_helper.to_array(scalars[n.input[1]])
                    scalars[n.input[1]].CopyFrom(numpy_helper.from_array(np.zeros_like(value), n.input[1]))
                    count += 1
                elif const is not None and const.op_type == "Constant":
                    attr = const.attribute[0]
                    if attr.name == "value_float":
                        attr.f = 0.0
                    else:
                        value = numpy_helper.to_array(attr.t)
                        attr.t.CopyFrom(numpy_helper.from_array(np.zeros_like(value)))
                    count += 1
    if not count:
        raise SystemExit("found no RMSNorm epsilon to change")
    return f"{count} epsilon(s) set to 0"


@fault("precision_mislabel", "the graph is not the precision its manifest claims (an fp16 artifact holding an "
       "fp32 graph; an fp32 one holding fp16)")
def precision_mislabel(model, manifest, base):
    source = manifest.get("source_onnx")
    if manifest["precision"] == "fp32" or not source:
        from llmtrt.pipelines.precision.quantize import PrecisionOptions, quantize

        tmp = base.parent / f".{base.name}.fp16"
        quantize(base, tmp, "fp16", PrecisionOptions(progress=False))
        other = onnx.load(str(tmp / "model.onnx"))
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        other = onnx.load(source)
    model.CopyFrom(other)
    return f"graph replaced by one of another precision; manifest still says {manifest['precision']}"


@fault("tampered_manifest", "manifest.json edited: onnx_sha256 no longer matches model.onnx")
def tampered_manifest(model, manifest, base):
    digest = manifest["onnx_sha256"]
    manifest["onnx_sha256"] = ("0" if digest[0] != "0" else "1") + digest[1:]
    return "onnx_sha256 changed"


@fault("manifest_config", "manifest.json edited: rms_norm_eps differs from the graph's")
def manifest_config(model, manifest, base):
    manifest["config"]["rms_norm_eps"] = manifest["config"]["rms_norm_eps"] * 10
    return "config.rms_norm_eps x10 in the manifest"


# --------------------------------------------------------------------------------------------
def plant(artifact: str | Path, name: str, out: str | Path) -> str:
    """Copy ``artifact`` to ``out`` with fault ``name`` planted; returns what was done."""
    from llmtrt.pipelines.artifacts import onnx_sha256

    artifact, out = Path(artifact), Path(out)
    if name not in FAULTS:
        raise SystemExit(f"unknown fault {name!r}; choose from {', '.join(FAULTS)}")
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(artifact, out)
    manifest = json.loads((out / "manifest.json").read_text())
    model = onnx.load(str(out / manifest["onnx"]), load_external_data=False)
    graph_before = model.SerializeToString()
    done = FAULTS[name][1](model, manifest, out)
    if model.SerializeToString() != graph_before:
        for f in out.glob(manifest["onnx"] + ".data"):
            f.unlink()
        onnx.save(model, str(out / manifest["onnx"]))
        if name != "tampered_manifest":
            manifest["onnx_sha256"] = onnx_sha256(out / manifest["onnx"])  # re-signed
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return done


def catch_report(artifacts: list[Path], work: Path, layerwise: bool = False) -> list[dict]:
    """Plant every fault in each artifact, validate it, and say what caught it (and, with ``layerwise``,
    which node --layerwise names)."""
    from llmtrt.pipelines.artifacts import read_manifest
    from llmtrt.pipelines.checks.validate import ValidateOptions, validate

    rows = []
    for artifact in artifacts:
        manifest = read_manifest(artifact)
        label = f"{manifest['precision']} {manifest['dialect']}"
        for name in FAULTS:
            out = work / f"{artifact.name}-{name}"
            plant(artifact, name, out)
            report = validate(out, ValidateOptions(layerwise=layerwise))
            failed = report.summary()["failed"]
            kinds = sorted({f.split(":", 1)[0] for f in failed})
            node = (report.layerwise or {}).get("first_jump") or {}
            rows.append({"artifact": label, "fault": name, "caught": not report.passed, "by": kinds,
                         "first_failure": failed[0] if failed else None, "layerwise_node": node.get("node")})
            shutil.rmtree(out, ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.plant_fault", description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", nargs="?", help="a correct artifact directory (manifest.json + model.onnx)")
    parser.add_argument("--fault", choices=sorted(FAULTS))
    parser.add_argument("--out", help="where the faulty copy goes (replaced if present)")
    parser.add_argument("--list", action="store_true", help="list the faults")
    parser.add_argument("--report", nargs="+", metavar="ARTIFACT",
                        help="plant every fault in each ARTIFACT, validate, print what caught it (a table)")
    parser.add_argument("--layerwise", action="store_true", help="with --report: also the node --layerwise names")
    args = parser.parse_args(argv)
    if args.report:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="llmtrt-faults-") as tmp:
            rows = catch_report([Path(a) for a in args.report], Path(tmp), args.layerwise)
        print("| artifact | fault | caught | by | first failing check | --layerwise names |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['artifact']} | {r['fault']} | {'yes' if r['caught'] else '**NO**'} | {', '.join(r['by'])} "
                  f"| {r['first_failure'] or '-'} | {r['layerwise_node'] or '-'} |")
        caught = sum(r["caught"] for r in rows)
        print(f"\ncatch rate: {caught}/{len(rows)} = {100 * caught / len(rows):.0f}%")
        return 0 if caught == len(rows) else 1
    if args.list or not args.artifact:
        for name, (summary, _) in FAULTS.items():
            print(f"{name:<22} {summary}")
        return 0
    if not (args.fault and args.out):
        parser.error("give --fault and --out")
    print(plant(args.artifact, args.fault, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
