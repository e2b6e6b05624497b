"""Scoring a mix without writing it: the fp32 export in one ONNX Runtime session whose linear weights
(and embedding tables) are graph inputs, fed the weights each group would have in the written graph.

    ev = MixEvaluator("out/onnx", windows)            # reference logits of the fp32 weights, once
    fig = ev.run({"model.layers.0.mlp.down_proj.weight_t": w_int4_dequantized, ...})
    fig.ppl_increase, fig.mean_kl                     # on the calibration windows, against fp32

A quantized weight feeds the session as what its DequantizeLinear hands the MatMul, in the fp32
export's coordinates (an AWQ smoothing folded into a norm is undone: ``x W = (x / s) (diag(s) W)``),
so one session scores every mix: nothing is re-exported, re-quantized or re-built per evaluation.
Activations stay fp32 (the int4 / int8-wo schemes quantize weights only; an fp16 group's half
activations are the one thing not modelled). The session holds the whole fp32 model: fine for the
models this search has been run on (stories260k, bytes-llama); an 8B export would need the
stage-by-stage runner of :mod:`.layerwise` instead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmtrt.pipelines.errors import LlmtrtUserError


@dataclass(frozen=True)
class Figures:
    """One mix on the calibration windows, against the fp32 weights."""

    perplexity: float
    ppl_increase: float       # perplexity / fp32 perplexity - 1
    mean_kl: float            # mean over positions of KL(p_fp32 || p_mix), nats
    top1_agreement: float
    tokens: int

    def to_dict(self) -> dict[str, Any]:
        return {"perplexity": self.perplexity, "ppl_increase": self.ppl_increase, "mean_kl": self.mean_kl,
                "top1_agreement": self.top1_agreement, "tokens": self.tokens}


@dataclass(frozen=True)
class LinearInfo:
    module: str
    weight: str               # initializer name of its fp32 [in, out] weight in the export
    shape: tuple[int, int]


class MixEvaluator:
    """The export's groups of linears (as quantize forms them) and a session that scores weights."""

    def __init__(self, src_dir: str | Path, windows: np.ndarray, keep: tuple[str, ...] = ()) -> None:
        import onnx
        from onnx import numpy_helper

        from llmtrt.exporter.kv_cache import get_layout
        from llmtrt.pipelines.artifacts import load_exported, read_manifest
        from llmtrt.pipelines.precision.graph import Source, find_linears, groups_of

        src_dir = Path(src_dir)
        raw = read_manifest(src_dir)
        exported = load_exported(src_dir, raw)
        if exported.logits != "all":
            raise LlmtrtUserError(f"{src_dir}: exported with --logits {exported.logits}; the sensitivity and budget "
                                  "search score every position, so export with --logits all (the default)")
        self.onnx_path = exported.onnx_path
        source = Source.open(src_dir, exported.onnx_path, raw, exported)
        lins = [lin for lin in find_linears(source.graph) if lin.role != "lm_head" and lin.module not in keep
                and lin.node.name not in keep and not lin.transposed]
        self.groups: dict[str, list[LinearInfo]] = {
            g[0].module: [LinearInfo(lin.module, lin.weight.name, lin.shape) for lin in g] for g in groups_of(lins)}
        fed = {info.weight for g in self.groups.values() for info in g}
        head = next((lin for lin in find_linears(source.graph) if lin.role == "lm_head"), None)
        self.half_stored = {n.inputs[0].name for n in source.graph if n.op_type == "Gather" and n.inputs[0] is not None
                            and n.inputs[0].is_initializer() and len(n.inputs[0].shape or ()) == 2}
        if head is not None:
            self.half_stored.add(head.weight.name)  # the lm_head stays fp16 in every int8/int4 artifact
        types = source.types
        del source
        proto = onnx.load(str(exported.onnx_path))
        self.fp32: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t).astype(np.float32)
                                            for t in proto.graph.initializer if t.name in fed | self.half_stored}
        self._stages = _stage_sessions(proto, types, set(self.fp32))
        del proto
        layout = get_layout(exported.kv_cache)
        from llmtrt.pipelines.precision.calibration import prefill_feeds
        from llmtrt.pipelines.precision.layerwise import chunk_size

        c = exported.config
        batch = chunk_size(len(windows), windows.shape[1], max(2 * c.intermediate_size, c.vocab_size))
        self.batches = [prefill_feeds(layout, c, windows[i:i + batch]) for i in range(0, len(windows), batch)]
        self.targets = [b["input_ids"][:, 1:].reshape(-1) for b in self.batches]
        self.evaluations = 0
        self.seconds = 0.0
        self.stage_runs = 0
        self._runs: list[tuple[list[tuple], dict[str, list[np.ndarray]]]] = []   # (keys, tensors): reference, last
        self.reference = self._forward(self.fp32)
        self.reference_nll = self._nll(self.reference)
        self._base = {n: _fp16(self.fp32[n]) for n in self.half_stored}

    def half_base(self) -> dict[str, np.ndarray]:
        """Weights of a quantized artifact outside the groups: embedding tables and lm_head fp16."""
        return dict(self._base)

    def run(self, weights: dict[str, np.ndarray]) -> Figures:
        """``weights`` (initializer name -> fp32 array) over the fp32 ones; figures on every window."""
        from llmtrt.pipelines.checks.accuracy import Totals

        t0 = time.perf_counter()
        totals = Totals()
        for logits, ref, targets in zip(self._forward({**self.fp32, **weights}), self.reference, self.targets,
                                        strict=True):
            vocab = logits.shape[-1]
            totals.add(logits[:, :-1].reshape(-1, vocab), targets, ref[:, :-1].reshape(-1, vocab))
        self.evaluations += 1
        self.seconds += time.perf_counter() - t0
        mean_nll = totals.nll / totals.tokens
        return Figures(float(np.exp(mean_nll)), float(np.exp(mean_nll - self.reference_nll) - 1.0),
                       totals.kl / totals.tokens, totals.agree / totals.tokens, totals.tokens)

    def _forward(self, weights: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Logits per batch. Stages run in order; a stage whose weights (and every earlier stage's) are the
        very arrays of the reference run or of the last run is not run again: its tensors are reused."""
        keys = [tuple(weights[n] for n in fed) for _, fed, _ in self._stages]
        start, tensors = 0, {}
        for run_keys, run_tensors in self._runs:
            same = 0
            while same < len(keys) and all(a is b for a, b in zip(keys[same], run_keys[same], strict=True)):
                same += 1
            if same > start:
                start, tensors = same, run_tensors
        tensors = {k: list(v) for k, v in tensors.items()}
        for session, fed, stage in self._stages[start:]:
            self.stage_runs += 1
            wanted = [o.name for o in session.get_outputs()]
            for b, batch in enumerate(self.batches):
                feeds = {n: (batch[n] if n in batch else tensors[n][b]) for n in stage.inputs}
                feeds.update({n: weights[n] for n in fed})
                for name, value in zip(wanted, session.run(wanted, feeds), strict=True):
                    tensors.setdefault(name, [None] * len(self.batches))[b] = value
        run = (keys, tensors)
        self._runs = [self._runs[0], run] if self._runs else [run]
        return tensors["logits"]

    def _nll(self, logits_list: list[np.ndarray]) -> float:
        from llmtrt.pipelines.checks.accuracy import log_softmax

        total, count = 0.0, 0
        for logits, targets in zip(logits_list, self.targets, strict=True):
            logp = log_softmax(logits[:, :-1].reshape(len(targets), -1))
            total -= float(logp[np.arange(len(targets)), targets].sum())
            count += len(targets)
        return total / count


def _fp16(w: np.ndarray) -> np.ndarray:
    return np.clip(w, -65504.0, 65504.0).astype(np.float16).astype(np.float32)


def _stage_sessions(proto, types: dict[str, int], fed: set[str]) -> list[tuple[Any, list[str], Any]]:
    """(session, fed weights, stage) per stage of :func:`.layerwise.plan_stages`; a stage outputs only the
    tensors later stages read, and the logits."""
    from onnx import helper

    from llmtrt.pipelines.precision.layerwise import plan_stages, stage_model

    out = []
    for stage in plan_stages(proto, types):
        if not stage.nodes:
            continue
        model = stage_model(proto, stage, types, fed)
        made = {o for n in stage.nodes for o in n.output}
        keep = list(dict.fromkeys(stage.outputs + (["logits"] if "logits" in made else [])))
        del model.graph.output[:]
        model.graph.output.extend(helper.make_tensor_value_info(o, types.get(o, 0), None) for o in keep)
        out.append((_session(model), [n for n in stage.weights if n in fed], stage))
    return out


def _session(proto):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
