"""Each op's lowerings (standard form, TensorRT built-in form, plugin routing) live in its own folder
and are reached through its registry entry; the engine's lowering module is only the driver."""

from __future__ import annotations

import inspect

from onnx import helper

from llmtrt.pipelines.engine import lowering
from llmtrt.plugins.registry import DOMAIN, registry, tensorrt_rewrites
from llmtrt.plugins.rewrite import Names
from llmtrt.plugins.trt_plugins import PLUGIN_MODULES


def test_every_op_lowering_lives_in_its_folder():
    for name, op in registry().items():
        package = inspect.getmodule(op.function).__name__
        assert inspect.getmodule(op.to_standard).__name__ == f"{package}.lowering", name
        assert op.tensorrt is not None and inspect.getmodule(op.tensorrt.fn).__name__ == f"{package}.lowering", name


def test_tensorrt_rewrites_come_from_the_registry():
    rewrites = tensorrt_rewrites()
    assert set(rewrites) == {(DOMAIN, "RMSNorm"), (DOMAIN, "RotaryEmbedding"), (DOMAIN, "GroupQueryAttention"),
                             (DOMAIN, "GroupQueryAttentionStatic"), ("", "Attention")}
    standard = rewrites[("", "Attention")].fn
    assert inspect.getmodule(standard).__name__ == "llmtrt.plugins.gqa_attention.lowering"
    driver = inspect.getsource(lowering)
    for op_name in ("RMSNormalization", "TensorScatter", "TRT_decomposable", "def native_"):
        assert op_name not in driver, f"{op_name} belongs in an op folder, not the generic driver"


def test_plugin_routing_is_per_op():
    with_plugins = {m.rsplit(".", 2)[-2] for m in PLUGIN_MODULES}
    for name, op in registry().items():
        package = inspect.getmodule(op.function).__name__.rsplit(".", 1)[-1]
        assert (op.to_plugin is not None) == (package in with_plugins), name
        if op.to_plugin is not None:
            node = helper.make_node(name, ["x"], ["y"], domain=DOMAIN, epsilon=1e-5)
            tagged = op.to_plugin(node)
            attrs = {a.name: helper.get_attribute_value(a) for a in tagged.attribute}
            assert attrs["plugin_namespace"] == b"llmtrt" and attrs["aot"] == 1 and not node.attribute[1:]


def test_names_are_fresh():
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["a"], ["b"])], "g", [], []))
    names = Names(model)
    assert names.fresh("a") == "a_1" and names.fresh("c") == "c" and names.fresh("c") == "c_1"
