"""A session's memory on 2 MiB pages (pipelines/runtime/huge_pages.py): the range arithmetic, the
/proc parsing, that a real ONNX Runtime session's weights end up in AnonHugePages with outputs
unchanged, and how `llmtrt generate` chooses."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from llmtrt.exporter.config import resolve_model
from llmtrt.exporter.onnx_export import ExportOptions
from llmtrt.pipelines.artifacts import export_artifact
from llmtrt.pipelines.runtime import huge_pages as hp
from llmtrt.pipelines.runtime.runners import OnnxRuntimeRunner, ort_session

MiB = 1 << 20


def test_ranges_shrink_to_whole_huge_pages():
    huge = hp.HUGE
    assert hp.huge_aligned([(1, 3 * huge - 1)]) == [(huge, 2 * huge)]
    assert hp.huge_aligned([(1, 2 * huge - 1)]) == []
    assert hp.huge_aligned([(0, 4 * huge)]) == [(0, 4 * huge)]


SMAPS = """\
55d0a0000000-55d0a8000000 rw-p 00000000 00:00 0                          [heap]
Size:             131072 kB
Anonymous:        131000 kB
7f0000000000-7f0000400000 rw-p 00000000 00:00 0
Size:               4096 kB
Anonymous:            12 kB
7f0000400000-7f0000600000 r--p 00000000 fd:01 123                        /usr/lib/libc.so.6
Anonymous:             0 kB
7f0000600000-7f0000800000 rw-p 00000000 fd:01 123                        /usr/lib/libc.so.6
Anonymous:          2048 kB
7ffc00000000-7ffc00100000 rw-p 00000000 00:00 0                          [stack]
Anonymous:          1024 kB
"""


def test_anonymous_regions_are_the_heap_and_unnamed_private_writable_mappings():
    assert hp.anonymous_regions(SMAPS) == [(0x55D0A0000000, 0x55D0A8000000, 131000 << 10),
                                           (0x7F0000000000, 0x7F0000400000, 12 << 10)]


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert hp.thp_mode(f) == "madvise"
    f.write_text("[never]\n")
    assert hp.thp_mode(f) == "never"
    assert hp.thp_mode(tmp_path / "missing") is None


def _anon_huge_kib() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


def _matmul_graph(tmp_path, rows=2048, cols=6144):
    """x @ W with a 48 MiB fp32 weight: ONNX Runtime prepacks W into new anonymous memory."""
    w = np.random.default_rng(0).standard_normal((rows, cols), dtype=np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cols])],
                              [numpy_helper.from_array(w, "w")])
    path = tmp_path / "mm.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), path)
    return path


def _usable_here() -> str | None:
    mode = hp.thp_mode()
    if mode not in ("always", "madvise"):
        return f"transparent huge pages are {mode or 'absent'} on this machine"
    return None


@pytest.mark.skipif(_usable_here() is not None, reason=str(_usable_here()))
def test_a_sessions_new_memory_lands_on_huge_pages_with_the_same_outputs(tmp_path):
    path = _matmul_graph(tmp_path)
    x = np.random.default_rng(1).standard_normal((1, 2048), dtype=np.float32)
    plain = ort_session(path, threads=1)
    expected = plain.run(None, {"x": x})[0]
    hp.collapse_anonymous_memory()  # whatever the process held before the session
    before_huge = _anon_huge_kib()
    session = ort_session(path, threads=1)
    report = hp.collapse_anonymous_memory()
    if report.notes and not report.collapsed_bytes:
        pytest.skip(f"this kernel could not collapse: {report}")
    assert report.collapsed_bytes >= 40 * MiB, report  # the 48 MiB prepacked weight, less the unaligned ends
    assert _anon_huge_kib() - before_huge >= 40 * 1024
    assert report.huge_bytes == _anon_huge_kib() << 10
    assert np.array_equal(session.run(None, {"x": x})[0], expected)
    # what is on huge pages already is not moved again
    again = hp.collapse_anonymous_memory()
    assert again.collapsed_bytes < 4 * MiB and again.failed_bytes == 0, again


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """bytes-llama exported with its manifest (what `llmtrt generate` takes)."""
    out = tmp_path_factory.mktemp("onnx") / "bytes"
    export_artifact(resolve_model("bytes-llama"), out, ExportOptions())
    return out


def test_the_runner_reports_huge_pages_and_its_logits_do_not_move(tiny_export):
    rng = np.random.default_rng(0)
    outs = {}
    for flag in (False, True):
        runner = OnnxRuntimeRunner.from_artifact(tiny_export, huge_pages=flag)
        with runner:
            config = runner.config
            state = runner.new_cache(1, 16)
            ids = rng.integers(0, config.vocab_size, (1, 6)) if flag is False else outs["ids"]
            outs["ids"] = ids
            logits = [runner.step(ids, np.arange(6)[None], np.ones((1, 6), np.int64), state)]
            logits.append(runner.step(ids[:, :1], np.array([[6]]), np.ones((1, 1), np.int64), state))
        outs[flag] = logits
        assert (runner.huge_pages is not None) == flag
        assert ("huge pages:" in runner.description) == flag
        if flag and _usable_here() is None:  # bytes-llama: 11.5 MB of weights, prepacked by the session
            assert runner.huge_pages.huge_bytes >= 4 * MiB, runner.huge_pages
    for a, b in zip(outs[False], outs[True], strict=True):
        assert np.array_equal(a, b)


def test_env_turns_it_on_or_off(monkeypatch):
    monkeypatch.setenv(hp.ENV, "1")
    assert hp.wanted(False) is True
    monkeypatch.setenv(hp.ENV, "off")
    assert hp.wanted(True) is False
    monkeypatch.delenv(hp.ENV)
    assert hp.wanted(True) is True and hp.wanted(False) is False


def test_generate_turns_huge_pages_on_for_long_outputs_and_obeys_the_flag(tiny_export, monkeypatch):
    from llmtrt.pipelines.cli import main

    monkeypatch.delenv(hp.ENV, raising=False)
    monkeypatch.setattr(hp, "HUGE_PAGES_FROM_TOKENS", 3)  # a "long" output, cheaply

    def run(*extra):
        result = CliRunner().invoke(main, ["generate", str(tiny_export), "--prompt", "ab", "--json", *extra])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)["huge_pages"]

    assert run("--max-new-tokens", "2") is None
    assert run("--max-new-tokens", "4") is not None
    assert run("--max-new-tokens", "4", "--no-huge-pages") is None
    assert run("--max-new-tokens", "2", "--huge-pages") is not None
    monkeypatch.setenv(hp.ENV, "0")
    assert run("--max-new-tokens", "4") is None
