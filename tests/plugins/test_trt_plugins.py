"""TensorRT plugin definitions: manifest, shape/type inference vs the torch fakes, registration, AOT PTX.

Full TensorRT (the only backend with ``tensorrt.plugin``) cannot be installed here, so the plugin
definitions are registered against a stub with the documented ``tensorrt.plugin`` surface (names,
decorators, TensorDesc.like / from_shape_expr, KernelLaunchParams); what that proves is the
definitions' own logic and their signatures against the ONNX schemas, not TensorRT's acceptance.
Anything that imports a TensorRT backend or compiles kernels runs in a subprocess.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import onnx
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import llmtrt.plugins.gqa_attention  # noqa: F401  (registers the torch ops and ONNX schemas)
import llmtrt.plugins.rms_norm  # noqa: F401
import llmtrt.plugins.rotary_embedding  # noqa: F401
from llmtrt.exporter.errors import LlmtrtUserError
from llmtrt.plugins import trt_plugins
from llmtrt.plugins.gqa_attention import trt_plugin as gqa
from llmtrt.plugins.registry import DOMAIN, DOMAIN_VERSION
from llmtrt.plugins.rms_norm import trt_plugin as rms
from llmtrt.plugins.rotary_embedding import trt_plugin as rope

REPO = Path(__file__).resolve().parents[2]
PLUGINS = [rms, rope, gqa]


def run_python(code: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (real Triton compiler: TRITON_INTERPRET is dropped)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout, env=env)


# --------------------------------------------------------------------------------------------
# manifest
# --------------------------------------------------------------------------------------------
def test_manifest_names_versions_and_checksums():
    manifest = trt_plugins.plugin_manifest()
    assert [e["plugin_id"] for e in manifest] == ["llmtrt::RMSNorm", "llmtrt::RotaryEmbedding",
                                                  "llmtrt::GroupQueryAttention"]
    for entry in manifest:
        assert entry["namespace"] == DOMAIN and entry["version"] == "1"
        assert onnx.defs.has(entry["name"], DOMAIN)               # plugin name == the exported node's op type
        assert all((REPO / f).is_file() for f in entry["code_files"])
        assert len(entry["code_sha256"]) == 64
    assert len({e["code_sha256"] for e in manifest}) == 3
    assert trt_plugins.plugin_manifest() == manifest               # deterministic


def test_checksum_changes_with_code(tmp_path):
    root = Path(trt_plugins.__file__).parent
    a = root / "launch.py"
    before = trt_plugins.code_checksum([a])
    assert before == trt_plugins.code_checksum([a])
    # same algorithm over a modified copy placed beside the real file's package root
    copy = root / f".checksum_probe_{tmp_path.name}.py"
    try:
        copy.write_bytes(a.read_bytes() + b"\n# changed\n")
        assert trt_plugins.code_checksum([copy]) != before
    finally:
        copy.unlink(missing_ok=True)


def test_manifest_imports_neither_tensorrt_nor_triton():
    proc = run_python("""
        import sys, json
        from llmtrt.plugins.trt_plugins import plugin_manifest
        plugin_manifest()
        print(json.dumps([m for m in ("tensorrt", "tensorrt_rtx_bindings", "triton") if m in sys.modules]))
    """)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


# --------------------------------------------------------------------------------------------
# shape and type inference vs the torch fake implementations
# --------------------------------------------------------------------------------------------
def fake_shapes(op, *shapes_and_dtypes, **attrs):
    with FakeTensorMode():
        args = [torch.empty(s, dtype=d) for s, d in shapes_and_dtypes]
        out = op(*args, *attrs.values())
    return [tuple(t.shape) for t in (out if isinstance(out, tuple) else (out,))]


@pytest.mark.parametrize("shape", [(1, 1, 64), (2, 7, 2048), (3, 4096)])
def test_rms_norm_shapes_match_fake(shape):
    f = torch.float16
    expected = fake_shapes(torch.ops.llmtrt.rms_norm, (shape, f), ((shape[-1],), f), epsilon=1e-5)
    assert rms.output_shapes(shape, (shape[-1],)) == expected
    with pytest.raises(ValueError, match="scale has"):
        rms.output_shapes(shape, (shape[-1] + 1,))


@pytest.mark.parametrize("b,h,s,d", [(1, 32, 1, 128), (4, 8, 17, 64)])
def test_rotary_shapes_match_fake(b, h, s, d):
    f = torch.float32
    expected = fake_shapes(torch.ops.llmtrt.rotary_embedding, ((b, h, s, d), f), ((b, s), torch.int64),
                           ((4096, d // 2), f), ((4096, d // 2), f))
    assert rope.output_shapes((b, h, s, d), (b, s), (4096, d // 2), (4096, d // 2)) == expected
    with pytest.raises(ValueError, match="head_dim"):
        rope.output_shapes((b, h, s, d), (b, s), (4096, d), (4096, d))


@pytest.mark.parametrize("b,hq,hkv,s,past,d", [(1, 32, 8, 1, 4096, 128), (8, 8, 1, 2048, 0, 64),
                                               (2, 16, 4, 5, 300, 64)])
def test_attention_shapes_match_fake(b, hq, hkv, s, past, d):
    f = torch.bfloat16
    shapes = [(b, hq, s, d), (b, hkv, s, d), (b, hkv, s, d), (b, 1, s, past + s), (b, hkv, past, d),
              (b, hkv, past, d)]
    expected = fake_shapes(torch.ops.llmtrt.gqa_attention, *((x, f) for x in shapes), q_num_heads=hq,
                           kv_num_heads=hkv, scale=d ** -0.5)
    assert gqa.output_shapes(*shapes, hq, hkv) == expected


def test_attention_shapes_are_symbolic_and_checked():
    class Dim:
        def __init__(self, text):
            self.text = text

        def __add__(self, other):
            return Dim(f"{self.text}+{other.text}")

    B, S, P = Dim("B"), Dim("S"), Dim("P")
    y, present_k, present_v = gqa.output_shapes(
        (B, 32, S, 128), (B, 8, S, 128), (B, 8, S, 128), (B, 1, S, Dim("T")), (B, 8, P, 128), (B, 8, P, 128), 32, 8)
    assert present_k[2].text == "P+S" and present_k[1] == 8 and y[1] == 32 and present_v == present_k
    with pytest.raises(ValueError, match="head count"):
        gqa.output_shapes((1, 32, 1, 64), (1, 4, 1, 64), (1, 4, 1, 64), (1, 1, 1, 2), (1, 4, 1, 64),
                          (1, 4, 1, 64), 32, 8)
    with pytest.raises(ValueError, match="multiple"):
        gqa.output_shapes(*[(1, 1, 1, 1)] * 6, 6, 4)


def dt(name):
    return SimpleNamespace(name=name)


def test_dtype_inference():
    assert rms.output_dtypes(dt("HALF"), dt("HALF")) == ["HALF"]
    assert rope.output_dtypes(dt("BF16"), dt("INT64"), dt("BF16"), dt("BF16")) == ["BF16"]
    assert gqa.output_dtypes(*[dt("FLOAT")] * 6) == ["FLOAT"] * 3
    with pytest.raises(ValueError, match="share"):
        rms.output_dtypes(dt("HALF"), dt("FLOAT"))
    with pytest.raises(ValueError, match="INT64"):
        rope.output_dtypes(dt("HALF"), dt("INT32"), dt("HALF"), dt("HALF"))
    with pytest.raises(ValueError, match="one of"):
        gqa.output_dtypes(*[dt("INT8")] * 6)


# --------------------------------------------------------------------------------------------
# registration against a stub of the tensorrt.plugin API
# --------------------------------------------------------------------------------------------
class StubDesc:
    def __init__(self, shape, dtype):
        self.shape_expr, self.dtype = tuple(shape), dtype

    def like(self):
        return StubDesc(self.shape_expr, self.dtype)


class StubCombination:
    def __init__(self, types):
        self.types, self.tactic_ids = types, None

    def tactics(self, ids):
        self.tactic_ids = list(ids)


class StubTrtp:
    """The parts of ``tensorrt.plugin`` the definitions use (names as documented by NVIDIA)."""

    TensorDesc, Tensor, SymExprs = StubDesc, object, tuple
    AutoTuneCombination = StubCombination
    KernelLaunchParams = SimpleNamespace

    def __init__(self):
        self.defined = {}

    def _decorator(self, kind):
        def named(plugin_id):
            def wrap(fn):
                assert (kind, plugin_id) not in self.defined, f"{kind} {plugin_id} defined twice"
                self.defined[(kind, plugin_id)] = fn
                return fn
            return wrap
        return named

    def __getattr__(self, kind):
        if kind in ("register", "autotune", "impl", "aot_impl"):
            return self._decorator(kind)
        raise AttributeError(kind)

    @staticmethod
    def from_shape_expr(shape, dtype):
        return StubDesc(shape, dtype)

    @staticmethod
    def SymInt32(expr):  # noqa: N802 - TensorRT's name
        return expr

    class SymIntExprs:
        @staticmethod
        def from_tuple(exprs):
            return tuple(exprs)


@pytest.fixture(scope="module")
def stub():
    trtp = StubTrtp()
    for mod in PLUGINS:
        mod.define(trtp, None)
    return trtp


@pytest.mark.parametrize("mod", PLUGINS, ids=lambda m: m.PLUGIN_NAME)
def test_definitions_match_onnx_schema(stub, mod):
    kinds = {k for k, pid in stub.defined if pid == mod.PLUGIN_ID}
    assert kinds == {"register", "autotune", "impl", "aot_impl"}
    schema = onnx.defs.get_schema(mod.PLUGIN_NAME, DOMAIN_VERSION, DOMAIN)
    inputs = [p.name for p in schema.inputs]
    attrs = {name: a.type for name, a in schema.attributes.items()}
    kind_of = {onnx.defs.OpSchema.AttrType.INT: int, onnx.defs.OpSchema.AttrType.FLOAT: float}
    params = inspect.signature(stub.defined[("register", mod.PLUGIN_ID)]).parameters
    assert list(params)[:len(inputs)] == inputs == list(mod.INPUTS)
    assert {n: p.annotation for n, p in list(params.items())[len(inputs):]} == {n: kind_of[t] for n, t in attrs.items()}
    for kind, tail in (("aot_impl", ["outputs", "tactic"]), ("autotune", ["outputs"])):
        assert list(inspect.signature(stub.defined[(kind, mod.PLUGIN_ID)]).parameters)[-len(tail):] == tail
    assert list(inspect.signature(stub.defined[("impl", mod.PLUGIN_ID)]).parameters)[len(params):][:2] == \
        ["outputs", "stream"]


def test_registered_descriptors_compute_shapes(stub):
    half = dt("HALF")
    (y,) = [stub.defined[("register", rms.PLUGIN_ID)](StubDesc((2, 3, 64), half), StubDesc((64,), half), 1e-5)]
    assert y.shape_expr == (2, 3, 64)
    outs = stub.defined[("register", gqa.PLUGIN_ID)](
        StubDesc((1, 8, 3, 64), half), StubDesc((1, 2, 3, 64), half), StubDesc((1, 2, 3, 64), half),
        StubDesc((1, 1, 3, 13), half), StubDesc((1, 2, 10, 64), half), StubDesc((1, 2, 10, 64), half), 8, 2, 0.125)
    assert [o.shape_expr for o in outs] == [(1, 8, 3, 64), (1, 2, 13, 64), (1, 2, 13, 64)]
    combo = stub.defined[("autotune", gqa.PLUGIN_ID)](*[None] * 10)[0]
    assert combo.types.count(",") == 8 and combo.tactic_ids == [1, 2]
    rope_combo = stub.defined[("autotune", rope.PLUGIN_ID)](*[None] * 5)[0]
    assert rope_combo.types == "FP32|FP16|BF16, INT64|INT64|INT64, FP32|FP16|BF16, FP32|FP16|BF16, FP32|FP16|BF16"
    with pytest.raises(ValueError, match="share"):
        stub.defined[("register", rms.PLUGIN_ID)](StubDesc((2, 64), half), StubDesc((64,), dt("FLOAT")), 1e-5)


def test_plugin_node_attributes():
    assert trt_plugins.plugin_node_attributes() == {"plugin_namespace": "llmtrt", "aot": 1}
    assert trt_plugins.plugin_node_attributes(aot=False) == {"plugin_namespace": "llmtrt"}


def test_aot_kernel_needs_build_time_constant_dims():
    class Dynamic:
        is_fake, is_constant = False, False
    with pytest.raises(ValueError, match="build-time constant"):
        rms.aot_kernel((1, Dynamic()), dt("HALF"), 1e-5)


# --------------------------------------------------------------------------------------------
# AOT: the aot_impl functions compile their Triton kernels to PTX (no GPU needed), in a subprocess
# --------------------------------------------------------------------------------------------
AOT_SCRIPT = """
import json, sys
sys.path.insert(0, "tests/plugins")
from types import SimpleNamespace
from test_trt_plugins import StubTrtp, StubDesc, PLUGINS
from llmtrt.plugins import trt_plugins
from llmtrt.plugins.rms_norm import trt_plugin as rms
from llmtrt.plugins.rotary_embedding import trt_plugin as rope
from llmtrt.plugins.gqa_attention import trt_plugin as gqa

trt_plugins.AOT_TARGET = ("cuda", int(sys.argv[1]), 32)
trtp = StubTrtp()
for mod in PLUGINS:
    mod.define(trtp, None)
d = lambda shape, name: StubDesc(shape, SimpleNamespace(name=name))
B, S, P = 2, 5, 40
calls = {
    "rms_fp16": (rms.PLUGIN_ID, [d((B, S, 2048), "HALF"), d((2048,), "HALF"), 1e-5, None, 0]),
    "rope_bf16": (rope.PLUGIN_ID, [d((B, 32, S, 128), "BF16"), d((B, S), "INT64"), d((4096, 64), "BF16"),
                                   d((4096, 64), "BF16"), None, 0]),
    "gqa_fp16_decode": (gqa.PLUGIN_ID, [d((B, 32, 1, 128), "HALF")] + [d((B, 8, 1, 128), "HALF")] * 2
                        + [d((B, 1, 1, P + 1), "HALF")] + [d((B, 8, P, 128), "HALF")] * 2 + [32, 8, 0.088, None, 1]),
    "gqa_fp32_prefill": (gqa.PLUGIN_ID, [d((B, 8, S, 64), "FLOAT")] + [d((B, 2, S, 64), "FLOAT")] * 2
                         + [d((B, 1, S, P + S), "FLOAT")] + [d((B, 2, P, 64), "FLOAT")] * 2 + [8, 2, 0.125, None, 2]),
}
out = {}
for key, (pid, args) in calls.items():
    name, ptx, params, extra = trtp.defined[("aot_impl", pid)](*args)
    out[key] = {"name": name.decode(), "entry": f".entry {name.decode()}" in ptx.decode(),
                "target": next(l for l in ptx.decode().splitlines() if l.startswith(".target")),
                "grid": [getattr(params, f"grid_{a}", 1) for a in "xyz"], "block_x": params.block_x,
                "shared": params.shared_mem, "extra": list(extra)}
print(json.dumps(out))
"""


@pytest.mark.parametrize("cc", [90, 87])   # H100; Jetson AGX Orin (JetPack 6)
def test_aot_impl_compiles_ptx_without_gpu(cc):
    pytest.importorskip("triton", reason="triton not installed: pip install triton (CPU wheel, no torch)")
    proc = run_python(AOT_SCRIPT.replace("sys.argv[1]", str(cc)), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for key, res in out.items():
        assert res["entry"] and res["target"].startswith(f".target sm_{cc}"), (key, res)
        assert res["block_x"] % 32 == 0 and res["block_x"] > 0
    assert out["rms_fp16"]["grid"] == [10, 1, 1] and out["rms_fp16"]["extra"] == [2048]
    assert out["rope_bf16"]["grid"] == [10, 1, 1] and out["rope_bf16"]["extra"] == [32, 5, 128]
    assert out["gqa_fp16_decode"]["grid"] == [1, 16, 1] and out["gqa_fp16_decode"]["extra"] == [1, 40, 4, 8]
    assert out["gqa_fp32_prefill"]["grid"] == [1, 4, 1] and out["gqa_fp32_prefill"]["extra"] == [5, 40, 4, 2]


# --------------------------------------------------------------------------------------------
# backends
# --------------------------------------------------------------------------------------------
def test_register_all_refuses_tensorrt_rtx():
    if importlib.util.find_spec("tensorrt_rtx_bindings") is None:
        pytest.skip("tensorrt_rtx_bindings not installed")
    proc = run_python("""
        import tensorrt_rtx_bindings as trt
        from llmtrt.plugins.trt_plugins import register_all
        from llmtrt.exporter.errors import LlmtrtUserError
        try:
            register_all(trt)
        except LlmtrtUserError as exc:
            print(exc)
    """)
    assert proc.returncode == 0, proc.stderr
    assert "tensorrt_rtx_bindings 1.7" in proc.stdout and "has no Python plugin API" in proc.stdout
    assert "--lower native" in proc.stdout


def test_register_all_error_names_the_backend():
    fake = SimpleNamespace(__name__="not_a_tensorrt_module", __version__="0.0")
    with pytest.raises(LlmtrtUserError, match="not_a_tensorrt_module 0.0 has no Python plugin API"):
        trt_plugins.register_all(fake)


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_register_all_with_full_tensorrt():
    pytest.importorskip("tensorrt", reason="full NVIDIA TensorRT (tensorrt.plugin) is not installable here")
    proc = run_python("""
        import tensorrt as trt
        from llmtrt.plugins.trt_plugins import register_all
        ids = register_all(trt)
        names = {c.name for c in trt.get_plugin_registry().all_creators}
        print(sorted(ids), all(i.split("::")[1] in names for i in ids))
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("True")
