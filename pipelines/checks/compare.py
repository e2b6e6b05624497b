"""Accuracy of each precision on held-out text, measured against the fp32 reference.

    result = compare_artifacts({"fp32": "out/fp32", "int8-wo": "out/int8-wo"}, eval_text="configs/text/eval.txt")
    bool(result)          # every threshold met
    result.metrics["int8-wo"].perplexity

The text is tokenized (:mod:`llmtrt.pipelines.runtime.tokenizer`), cut into non-overlapping windows of ``seq_len``
tokens (the last, shorter window too), each starting with BOS when the checkpoint's tokenizer adds
one, and each window is scored independently: its first text token is context only, every later
one is a prediction. All artifacts see the same windows,
side by side, so nothing but running sums is kept. Per precision:

- perplexity: ``exp(mean next-token cross-entropy)``, and its relative increase over fp32;
- top-1 agreement: fraction of positions whose argmax equals the fp32 argmax;
- mean KL: mean over positions of ``KL(p_fp32 || p_precision)`` in nats;
- max abs logit error: ``max |logits - fp32 logits|``.

The reference is the fp32 ONNX artifact; the fp32 PyTorch model its manifest names is run on the
same windows and must agree with it (``pytorch_reference`` in the thresholds file). Artifacts run
through the runner their manifest calls for (runtime/runners.py: ONNX Runtime for an ONNX directory,
TensorRT for an engine directory).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from llmtrt import configs
from llmtrt.pipelines.checks.accuracy import (
    DEFAULT_THRESHOLDS,
    PYTORCH,
    REFERENCE,
    PrecisionMetrics,
    Thresholds,
    Totals,
    gate,
    load_thresholds,
)
from llmtrt.pipelines.checks.compare_report import CompareResult, write_reports
from llmtrt.pipelines.errors import LlmtrtUserError

DEFAULT_SEQ_LEN = 256
DEFAULT_EVAL_TEXT = configs.path("text", "eval.txt")
_LOGITS_BUDGET = 1 << 26  # logits elements per batch of windows (256 MiB fp32)
# tokens per batch of windows: bounds every runner's activations too (attention scores grow with
# rows x heads x seq^2); without it a small vocabulary put all of a 97k-token text in one batch
_TOKENS_BUDGET = 1 << 13



# --------------------------------------------------------------------------------------------
# eval text and windows
# --------------------------------------------------------------------------------------------
def read_eval_tokens(path: str | Path, tokenizer, max_tokens: int | None = None) -> np.ndarray:
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise LlmtrtUserError(f"{path}: no such eval text file; pass --eval-text FILE "
                              f"(e.g. {DEFAULT_EVAL_TEXT})") from None
    except IsADirectoryError:
        raise LlmtrtUserError(f"{path}: is a directory; --eval-text takes a UTF-8 text file") from None
    except UnicodeDecodeError as exc:
        raise LlmtrtUserError(f"{path}: not UTF-8 text (bad byte at offset {exc.start}); "
                              "convert it, e.g. iconv -t UTF-8") from None
    tokens = np.asarray(tokenizer.encode(text), dtype=np.int64)
    if max_tokens is not None:
        if max_tokens < 2:
            raise LlmtrtUserError(f"--max-tokens must be at least 2, got {max_tokens}")
        tokens = tokens[:max_tokens]
    if len(tokens) < 2:
        raise LlmtrtUserError(f"{path}: {len(tokens)} token(s); at least 2 are needed to score one prediction")
    return tokens


def windows(tokens: np.ndarray, seq_len: int, bos_id: int | None = None) -> list[np.ndarray]:
    """Non-overlapping windows of ``seq_len`` tokens; a last shorter window is kept if it predicts something.

    With ``bos_id`` (a checkpoint that starts every sequence with BOS) each window is BOS followed by
    the next ``seq_len - 1`` text tokens: the model reads every window the way it reads a prompt.
    Either way a window's first text token is context only (:func:`context_tokens`): predicting a
    token cut out of the middle of a text from BOS alone measures the cut, not the model."""
    if seq_len < 2 + (bos_id is not None):
        raise LlmtrtUserError(f"--seq-len must be at least {2 + (bos_id is not None)}, got {seq_len}")
    if bos_id is None:
        out = [tokens[i:i + seq_len] for i in range(0, len(tokens), seq_len)]
    else:
        step, head = seq_len - 1, np.asarray([bos_id], dtype=np.int64)
        out = [np.concatenate([head, tokens[i:i + step]]) for i in range(0, len(tokens), step)]
    return [w for w in out if len(w) > context_tokens(bos_id)]


def context_tokens(bos_id: int | None) -> int:
    """Leading tokens of a window that are context only: the first text token, and BOS before it."""
    return 1 if bos_id is None else 2


def _batches(wins: list[np.ndarray], vocab: int) -> list[np.ndarray]:
    """Equal-length windows stacked into [batch, n] arrays within the logits and token budgets."""
    per = max(1, min(_LOGITS_BUDGET // (len(wins[0]) * vocab), _TOKENS_BUDGET // len(wins[0])))
    out, i = [], 0
    while i < len(wins):
        j = i
        while j < len(wins) and j - i < per and len(wins[j]) == len(wins[i]):
            j += 1
        out.append(np.stack(wins[i:j]))
        i = j
    return out


# --------------------------------------------------------------------------------------------
# runners
# --------------------------------------------------------------------------------------------
def _scorer(runner):
    """input_ids [batch, n] -> logits [batch, n, vocab] from an empty cache, with an active runner."""
    from llmtrt.pipelines.runtime.decoding import Batch, forward

    def run(input_ids: np.ndarray) -> np.ndarray:
        mask = np.ones_like(input_ids, dtype=np.int64)
        positions = np.broadcast_to(np.arange(input_ids.shape[1], dtype=np.int64), input_ids.shape).copy()
        return np.asarray(forward(runner, Batch(input_ids, mask, positions)), dtype=np.float32)

    return run


# --------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------
def evaluate_runners(runners: Mapping[str, Any], tokens: np.ndarray, seq_len: int, vocab: int,
                     reference: str = REFERENCE, progress: Callable[[int, int], None] | None = None,
                     bos_id: int | None = None) -> dict[str, Totals]:
    """Score every runner (runtime/runners.py, or a plain ``ids -> logits`` function) on the same windows
    (:func:`windows`, BOS first when ``bos_id`` is given); metrics against ``runners[reference]``."""
    from contextlib import ExitStack

    from llmtrt.pipelines.runtime.runners import DecoderRunner

    if reference not in runners:
        raise LlmtrtUserError(f"no {reference} artifact to compare against; include {reference}")
    totals = {name: Totals() for name in runners}
    batches = _batches(windows(tokens, seq_len, bos_id), vocab)
    skip = context_tokens(bos_id) - 1  # logits at these positions predict context, not scored
    with ExitStack() as stack:
        scorers = {name: _scorer(stack.enter_context(r)) if isinstance(r, DecoderRunner) else r
                   for name, r in runners.items()}
        for done, ids in enumerate(batches, start=1):
            targets = ids[:, skip + 1:].reshape(-1)
            logits = {}
            for name, run in scorers.items():
                t0 = time.perf_counter()
                out = run(ids)
                totals[name].seconds += time.perf_counter() - t0
                if out.shape != (*ids.shape, vocab):
                    raise RuntimeError(f"{name}: logits shape {out.shape}, expected {(*ids.shape, vocab)}")
                logits[name] = out[:, skip:-1].reshape(-1, vocab)
            for name in runners:
                totals[name].add(logits[name], targets, logits[reference])
            if progress is not None:
                progress(done, len(batches))
    return totals


def evaluate(artifact_dir: str | Path, eval_tokens: np.ndarray, seq_len: int = DEFAULT_SEQ_LEN,
             reference: str | Path | Any | None = None, bos_id: int | None = None) -> PrecisionMetrics:
    """One artifact's metrics on ``eval_tokens``; against ``reference`` (an fp32 artifact dir or a runner),
    or against itself when None (agreement 1, KL 0: perplexity only). ``bos_id``: see :func:`windows`."""
    from llmtrt.pipelines.artifacts import read_manifest
    from llmtrt.pipelines.runtime.artifact_runners import open_runner
    from llmtrt.pipelines.runtime.runners import DecoderRunner

    manifest = read_manifest(artifact_dir)
    _require_every_position(manifest, artifact_dir)
    runners: dict[str, Any] = {}
    if reference is not None:
        runners[REFERENCE] = reference if isinstance(reference, DecoderRunner) else open_runner(reference)
    name = manifest.get("precision", "artifact")
    key = name if name != REFERENCE or reference is None else f"{name} ({artifact_dir})"
    runners[key] = open_runner(artifact_dir)
    totals = evaluate_runners(runners, eval_tokens, seq_len, manifest["config"]["vocab_size"],
                              reference=REFERENCE if reference is not None else key, bos_id=bos_id)
    ref_ppl = None if reference is None else _ppl(totals[REFERENCE])
    return PrecisionMetrics.from_totals(name, str(artifact_dir), totals[key], ref_ppl)


def _require_every_position(manifest: Mapping[str, Any], where: str | Path) -> None:
    """Perplexity scores the prediction at every position: a graph with last-position logits cannot be scored."""
    if manifest.get("logits", "all") != "all":
        raise LlmtrtUserError(f"{where}: exported with --logits {manifest['logits']} (logits for the last position "
                              "only), but perplexity needs the logits at every position; compare an export made "
                              "with --logits all (the default)")


def _ppl(t: Totals) -> float:
    return math.exp(t.nll / t.tokens)


def compare_artifacts(artifacts: Mapping[str, str | Path], eval_text: str | Path = DEFAULT_EVAL_TEXT,
                      max_tokens: int | None = None, thresholds: str | Path | Thresholds | None = None,
                      out_dir: str | Path | None = None, seq_len: int = DEFAULT_SEQ_LEN,
                      pytorch_reference: bool = True, progress: Callable[[str], None] | None = None,
                      add_bos: bool | None = None) -> CompareResult:
    """Evaluate ``{precision: artifact_dir}`` (fp32 included) and gate them; write reports to ``out_dir``.

    Windows start with BOS when the checkpoint's tokenizer adds it (``add_bos=False``: ``--no-bos``)."""
    from llmtrt.exporter.files import sha256_file
    from llmtrt.pipelines.artifacts import read_manifest
    from llmtrt.pipelines.runtime.tokenizer import load_tokenizer

    say = progress or (lambda _msg: None)
    if REFERENCE not in artifacts:
        raise LlmtrtUserError(f"no {REFERENCE} artifact among {', '.join(artifacts) or 'none'}; the comparison "
                              f"needs the {REFERENCE} export as its reference")
    limits = thresholds if isinstance(thresholds, Thresholds) else load_thresholds(thresholds or DEFAULT_THRESHOLDS)
    manifests = {name: read_manifest(d) for name, d in artifacts.items()}
    ref_manifest = manifests[REFERENCE]
    if ref_manifest.get("precision", REFERENCE) != REFERENCE:
        raise LlmtrtUserError(f"{artifacts[REFERENCE]}: manifest precision is {ref_manifest.get('precision')!r}, "
                              f"not {REFERENCE}; pass the fp32 export as the reference")
    cfg = ref_manifest["config"]
    for name, m in manifests.items():
        _require_every_position(m, artifacts[name])
        m.setdefault("config", cfg)  # a stage that does not repeat the model config inherits the reference's
        m.setdefault("onnx", "model.onnx")
        if m["config"] != cfg:
            raise LlmtrtUserError(f"{artifacts[name]}: a different model than the {REFERENCE} artifact "
                                  f"({artifacts[REFERENCE]}); compare artifacts of one model")
    if seq_len > cfg["max_position_embeddings"]:
        raise LlmtrtUserError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings "
                              f"{cfg['max_position_embeddings']}")
    tokenizer = load_tokenizer(artifacts[REFERENCE], add_bos=add_bos)
    bos_id = tokenizer.bos_id if tokenizer.add_bos else None
    tokens = read_eval_tokens(eval_text, tokenizer, max_tokens)
    if int(tokens.max()) >= cfg["vocab_size"]:
        raise LlmtrtUserError(f"{eval_text}: token id {int(tokens.max())} >= vocab_size {cfg['vocab_size']}; "
                              "the tokenizer does not match the model")
    from llmtrt.pipelines.runtime.artifact_runners import open_runner, reference_runner

    runners: dict[str, Any] = {REFERENCE: open_runner(artifacts[REFERENCE])}
    notes = []
    if pytorch_reference:
        try:
            runners[PYTORCH] = reference_runner(ref_manifest, Path(artifacts[REFERENCE]) / "manifest.json")
        except LlmtrtUserError as exc:
            notes.append(f"fp32 PyTorch cross-check not run: {exc}")
    for name, d in artifacts.items():
        if name != REFERENCE:
            runners[name] = open_runner(d)
            if getattr(runners[name], "bf16_emulated", False):
                notes.append(f"{name}: ONNX Runtime CPU has no bf16 kernels; scored through its fp32 emulation "
                             "(bf16 weights and bf16-rounded results, fp32 arithmetic: what a GPU computes)")
    wins = windows(tokens, seq_len, bos_id)
    say(f"scoring {len(runners)} runners ({', '.join(runners)}) on {len(tokens)} tokens in {len(wins)} windows "
        f"of {seq_len}")
    totals = evaluate_runners(runners, tokens, seq_len, cfg["vocab_size"], bos_id=bos_id,
                              progress=lambda i, n: say(f"  batch {i}/{n}") if i == n or i % 8 == 0 else None)
    ref_ppl = _ppl(totals[REFERENCE])
    metrics = {name: PrecisionMetrics.from_totals(name, str(artifacts.get(name, ref_manifest.get("model_source"))),
                                                  t, ref_ppl) for name, t in totals.items()}
    checks, ungated = gate(metrics, limits)
    result = CompareResult(metrics, checks, ungated, {
        "text": str(eval_text), "text_sha256": sha256_file(eval_text), "tokens": int(len(tokens)),
        "seq_len": seq_len, "windows": len(wins), "predictions": totals[REFERENCE].tokens, "tokenizer": tokenizer.name,
        "bos_id": bos_id, "bos_from": tokenizer.special.add_bos_from if bos_id is not None else None,
        "max_tokens": max_tokens,
    }, limits.source, [*notes, *tokenizer.special.notes])
    if out_dir is not None:
        write_reports(result, Path(out_dir), say)
    return result


