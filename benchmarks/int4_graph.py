"""A blocked-int4 weight-only graph of any Llama shape, with random weights, for build measurements.

    python -m benchmarks.int4_graph --model llama-3.1-8b --out /tmp/llmtrt-bench/int4-8b

The graph is the exporter's own (``exporter.streaming.capture`` on meta weights, the custom dialect
at opset 21), with each linear layer's weight ``[in, out]`` replaced the way ``llmtrt quantize
--to int4-*`` writes it: an INT4 initializer plus fp32 scales ``[in / block, out]`` feeding a
DequantizeLinear(axis 0, block_size) in front of the MatMul. The embedding and lm_head stay fp32
(as the quantizer keeps lm_head). Weights are random bytes and normal(0, 0.02) values, written in
blocks straight to ``model.onnx.data``: no checkpoint, no fp32 copy, memory of one block. It is for
measuring what a build holds, not for accuracy (the streaming int4 quantizer is another helper's
work; this stands in for its output's layout).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

BLOCK_BYTES = 64 << 20
OPSET = 21  # DequantizeLinear with block_size


class _OnesCheckpoint:
    """Stands in for a checkpoint: capture reads only weights of <= 1024 elements (the norms of a tiny
    model; a real-sized Llama has none), and gets ones."""

    def __init__(self, config) -> None:
        from llmtrt.exporter.weights import expected_shapes

        self.shapes = expected_shapes(config)

    def fp32_blocks(self, name: str, transpose: bool = False):
        yield from self.concat_fp32_blocks([name], transpose)

    def concat_fp32_blocks(self, names: list[str], transpose: bool = False):
        """Parts stacked along dim 0 (a fused weight), as ones."""
        shape = (sum(self.shapes[n][0] for n in names), *self.shapes[names[0]][1:])
        yield np.ones(shape[::-1] if transpose else shape, np.float32)


def int4_graph(model_spec: str, out_dir: str | Path, *, block_size: int = 128, seed: int = 0) -> dict:
    """Write ``out_dir/model.onnx`` + ``model.onnx.data`` + an export manifest (precision int4), so
    ``llmtrt build out_dir`` builds it as it would a quantized export; returns a summary dict."""
    from llmtrt.exporter import dialects, streaming
    from llmtrt.exporter.config import resolve_model
    from llmtrt.exporter.kv_cache import get_layout
    from llmtrt.exporter.onnx_export import ExportedModel
    from llmtrt.pipelines.artifacts import write_export_manifest

    source = resolve_model(model_spec)
    config = source.config
    proto = streaming.capture(_OnesCheckpoint(config), config, "dynamic")
    proto = dialects.finalize(proto, config, "custom", OPSET)
    get_layout("dynamic").io_spec(config).apply_dim_names(proto)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    layout = _quantize_linears(proto, block_size)
    with open(out_dir / "model.onnx.data", "wb") as data:
        for tensor, kind in layout:
            _write(tensor, kind, data, rng)
    # the lm_head stays fp32, recorded as kept (as quantize records its lm_head policy) so the
    # inventory judges the int4 linears
    helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props},
                                   "llmtrt.precision.kept": json.dumps({"lm_head": "synthetic graph: lm_head fp32"})})
    onnx.save(proto, str(out_dir / "model.onnx"))
    weights = (out_dir / "model.onnx.data").stat().st_size
    exported = ExportedModel(out_dir / "model.onnx", config, get_layout("dynamic").io_spec(config), "custom", OPSET,
                             {"weights_bytes": weights, "external_data": True}, "dynamic")
    write_export_manifest(exported, {"model_source": str(model_spec), "model_source_sha256": None, "seed": seed},
                          {"precision": "int4", "synthetic": "random blocked-int4 weights for build measurements "
                           f"(benchmarks/int4_graph.py, block_size {block_size}); not a model"})
    return {"onnx": str(out_dir / "model.onnx"), "weights_bytes": weights, "layers": config.num_hidden_layers,
            "hidden_size": config.hidden_size, "block_size": block_size}


def _quantize_linears(proto: onnx.ModelProto, block_size: int) -> list[tuple[TensorProto, str]]:
    """Replace linear weights by INT4 + scale + DequantizeLinear; returns every large tensor with the
    kind of bytes to write for it ("int4", "scale" or "fp32"), in file order."""
    g = proto.graph
    consumers = {}
    for node in g.node:
        for i, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, i))
    layout: list[tuple[TensorProto, str]] = []
    new_nodes: dict[int, list[onnx.NodeProto]] = {}
    for t in list(g.initializer):
        if not any(e.key == "location" for e in t.external_data):
            continue
        users = consumers.get(t.name, [])
        linear = (t.name.endswith(".weight_t") and not t.name.startswith("lm_head") and len(t.dims) == 2
                  and all(n.op_type == "MatMul" for n, _ in users))
        if not linear or t.dims[0] % block_size:
            layout.append((_placeholder(t, TensorProto.FLOAT), "fp32"))
            continue
        rows, cols = t.dims
        q = TensorProto(name=f"{t.name}.int4", data_type=TensorProto.INT4, dims=[rows, cols])
        scale = TensorProto(name=f"{t.name}.scale", data_type=TensorProto.FLOAT, dims=[rows // block_size, cols])
        dq = helper.make_node("DequantizeLinear", [q.name, scale.name], [f"{t.name}.dequantized"],
                              name=f"{t.name}/DequantizeLinear", axis=0, block_size=block_size)
        for node, i in users:
            node.input[i] = dq.output[0]
            new_nodes.setdefault(id(node), []).append(dq)
        g.initializer.remove(t)
        g.initializer.extend([q, scale])  # copies: write into the graph's own messages
        layout += [(g.initializer[-2], "int4"), (g.initializer[-1], "scale")]
    nodes = []
    for node in g.node:
        nodes.extend(new_nodes.get(id(node), [])[:1])
        nodes.append(node)
    del g.node[:]
    g.node.extend(nodes)
    for o in proto.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = max(o.version, OPSET)
    return layout


def _placeholder(t: TensorProto, dtype: int) -> TensorProto:
    del t.external_data[:]
    t.data_type = dtype
    return t


def _write(t: TensorProto, kind: str, data, rng: np.random.Generator) -> None:
    count = int(np.prod(t.dims))
    nbytes = count // 2 if kind == "int4" else 4 * count
    offset = data.tell()
    left = nbytes
    while left:
        n = min(left, BLOCK_BYTES)
        if kind == "int4":
            block = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        else:
            values = rng.standard_normal(n // 4, dtype=np.float32) * (0.002 if kind == "scale" else 0.02)
            block = (np.abs(values) if kind == "scale" else values).astype(np.float32).tobytes()
        data.write(block)
        left -= n
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    del t.external_data[:]
    for key, value in (("location", "model.onnx.data"), ("offset", str(offset)), ("length", str(nbytes))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="preset name or HF checkpoint dir (only its config is read)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--block-size", type=int, default=128)
    args = parser.parse_args(argv)
    print(int4_graph(args.model, args.out, block_size=args.block_size))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
