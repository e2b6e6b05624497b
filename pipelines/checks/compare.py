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
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from llmtrt import configs
from llmtrt.pipelines.errors import LlmtrtUserError

REFERENCE = "fp32"
PYTORCH = "pytorch-fp32"
DEFAULT_SEQ_LEN = 256
DEFAULT_THRESHOLDS = configs.path("compare_thresholds.yaml")
DEFAULT_EVAL_TEXT = configs.path("text", "eval.txt")
_LOGITS_BUDGET = 1 << 26  # logits elements per batch of windows (256 MiB fp32)
# tokens per batch of windows: bounds every runner's activations too (attention scores grow with
# rows x heads x seq^2); without it a small vocabulary put all of a 97k-token text in one batch
_TOKENS_BUDGET = 1 << 13



# --------------------------------------------------------------------------------------------
# metrics math
# --------------------------------------------------------------------------------------------
def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log p over the last axis, in float64."""
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@dataclass
class Totals:
    """Running sums over scored positions; :meth:`add` takes one batch of windows."""

    tokens: int = 0
    nll: float = 0.0
    correct: int = 0          # argmax == the actual next token
    agree: int = 0            # argmax == the reference's argmax
    kl: float = 0.0           # sum of KL(p_ref || p)
    max_abs_logit_error: float = 0.0
    nonfinite: int = 0        # positions with a NaN/inf logit
    seconds: float = 0.0

    def add(self, logits: np.ndarray, targets: np.ndarray, ref_logits: np.ndarray) -> None:
        """``logits``/``ref_logits`` [positions, vocab] predict ``targets`` [positions]."""
        logits = logits.astype(np.float64)
        ref_logits = ref_logits.astype(np.float64)
        bad = ~np.isfinite(logits).all(axis=-1)
        self.nonfinite += int(bad.sum())
        logp = log_softmax(logits)
        ref_logp = log_softmax(ref_logits)
        rows = np.arange(len(targets))
        self.tokens += len(targets)
        self.nll += float(-logp[rows, targets].sum())
        top1 = logits.argmax(axis=-1)
        self.correct += int((top1 == targets).sum())
        self.agree += int((top1 == ref_logits.argmax(axis=-1)).sum())
        with np.errstate(invalid="ignore"):
            self.kl += float((np.exp(ref_logp) * (ref_logp - logp)).sum())
        self.max_abs_logit_error = max(self.max_abs_logit_error, float(np.abs(logits - ref_logits).max()))
        if bad.any():  # NaN compares false in max(); make it stick
            self.max_abs_logit_error = math.nan


@dataclass(frozen=True)
class PrecisionMetrics:
    precision: str
    artifact: str
    tokens: int
    perplexity: float
    mean_nll: float
    next_token_accuracy: float
    top1_agreement: float
    mean_kl: float
    max_abs_logit_error: float
    perplexity_increase: float  # perplexity / reference perplexity - 1
    nonfinite_positions: int
    tokens_per_second: float

    @classmethod
    def from_totals(cls, precision: str, artifact: str, t: Totals, ref_perplexity: float | None) -> PrecisionMetrics:
        mean_nll = t.nll / t.tokens
        ppl = math.exp(mean_nll) if math.isfinite(mean_nll) else math.nan
        ref = ppl if ref_perplexity is None else ref_perplexity
        return cls(precision, artifact, t.tokens, ppl, mean_nll, t.correct / t.tokens, t.agree / t.tokens,
                   t.kl / t.tokens, t.max_abs_logit_error, ppl / ref - 1.0, t.nonfinite,
                   t.tokens / t.seconds if t.seconds > 0 else math.nan)


def perplexity(token_log_probs: np.ndarray) -> float:
    """exp(-mean log p(token)); the quantity :class:`Totals` accumulates."""
    return float(np.exp(-np.mean(token_log_probs, dtype=np.float64)))


# --------------------------------------------------------------------------------------------
# thresholds (configs/compare_thresholds.yaml)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Threshold:
    """Limits for one precision against fp32; None means not checked."""

    max_perplexity_increase: float | None = None  # relative: 0.001 = 0.1 %
    min_top1_agreement: float | None = None
    max_mean_kl: float | None = None
    max_abs_logit_error: float | None = None


@dataclass(frozen=True)
class ReferenceCheck:
    """How closely the fp32 ONNX artifact must match the fp32 PyTorch model."""

    max_perplexity_rel_diff: float = 1e-4
    min_top1_agreement: float = 0.999
    max_abs_logit_error: float | None = None


@dataclass(frozen=True)
class Thresholds:
    precisions: Mapping[str, Threshold]
    pytorch_reference: ReferenceCheck = ReferenceCheck()
    must_beat: Mapping[str, str] = field(default_factory=dict)  # {"int4-awq": "int4-rtn"}: lower perplexity
    source: str = "<defaults>"


_TOP_KEYS = {"precisions": dict, "pytorch_reference": dict, "must_beat": dict}


def load_thresholds(path: str | Path) -> Thresholds:
    """Parse and check a thresholds YAML: unknown keys and wrong types are errors naming key and file."""
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LlmtrtUserError(f"{path}: no such thresholds file; see configs/compare_thresholds.yaml") from None
    except UnicodeDecodeError:
        raise LlmtrtUserError(f"{path}: not UTF-8 text") from None
    except yaml.YAMLError as exc:
        raise LlmtrtUserError(f"{path}: invalid YAML ({exc})".replace("\n", " ")) from None
    return parse_thresholds(raw, str(path))


def parse_thresholds(raw: Any, source: str) -> Thresholds:
    def fail(key: str, message: str):
        raise LlmtrtUserError(f"{source}: {key}: {message}")

    if not isinstance(raw, dict):
        raise LlmtrtUserError(f"{source}: expected a mapping with keys {', '.join(_TOP_KEYS)}, got {type(raw).__name__}")
    for key, value in raw.items():
        if key not in _TOP_KEYS:
            fail(str(key), f"unknown key; allowed: {', '.join(_TOP_KEYS)}")
        if not isinstance(value, _TOP_KEYS[key]):
            fail(key, f"expected a mapping, got {value!r}")
    if "precisions" not in raw:
        fail("precisions", "missing; give at least one precision's limits")
    precisions = {}
    for name, limits in raw["precisions"].items():
        if limits is None:
            limits = {}
        if not isinstance(limits, dict):
            fail(f"precisions.{name}", f"expected a mapping of limits, got {limits!r}")
        precisions[str(name)] = Threshold(**_numbers(limits, Threshold, f"precisions.{name}", fail))
    reference = ReferenceCheck(**_numbers(raw.get("pytorch_reference") or {}, ReferenceCheck, "pytorch_reference", fail))
    must_beat = {}
    for better, worse in (raw.get("must_beat") or {}).items():
        if not isinstance(worse, str):
            fail(f"must_beat.{better}", f"expected a precision name, got {worse!r}")
        must_beat[str(better)] = worse
    return Thresholds(precisions, reference, must_beat, source)


def _numbers(values: dict, cls: type, prefix: str, fail) -> dict[str, float | None]:
    allowed = [f.name for f in fields(cls)]
    out = {}
    for key, value in values.items():
        if key not in allowed:
            fail(f"{prefix}.{key}", f"unknown key; allowed: {', '.join(allowed)}")
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            fail(f"{prefix}.{key}", f"expected a number, got {value!r}")
        if value is not None and (not math.isfinite(value) or value < 0):
            fail(f"{prefix}.{key}", f"expected a finite number >= 0, got {value!r}")
        if key.startswith("min_") and value is not None and value > 1:
            fail(f"{prefix}.{key}", f"a fraction must be <= 1, got {value!r}")
        out[key] = None if value is None else float(value)
    return out


@dataclass(frozen=True)
class Check:
    """One gate: ``subject`` (a precision, or "awq vs rtn"), what was measured, the limit, passed."""

    subject: str
    metric: str
    value: float
    limit: float
    op: str  # "<=", ">=", "<"

    @property
    def passed(self) -> bool:
        if self.op == "<=":
            return self.value <= self.limit  # NaN fails
        if self.op == ">=":
            return self.value >= self.limit
        return self.value < self.limit

    def __str__(self) -> str:
        return (f"{self.subject}: {self.metric} {_fmt(self.value)} {self.op} {_fmt(self.limit)} "
                f"{'OK' if self.passed else 'NOT OK'}")


_THRESHOLD_METRICS = (("max_perplexity_increase", "perplexity_increase", "<="),
                      ("min_top1_agreement", "top1_agreement", ">="),
                      ("max_mean_kl", "mean_kl", "<="),
                      ("max_abs_logit_error", "max_abs_logit_error", "<="))


def gate(metrics: Mapping[str, PrecisionMetrics], thresholds: Thresholds) -> tuple[list[Check], list[str]]:
    """The checks the thresholds ask for, and the precisions that have no limits (not gated)."""
    checks, ungated = [], []
    for name, m in metrics.items():
        if name in (REFERENCE, PYTORCH):
            continue
        limits = thresholds.precisions.get(name)
        if limits is None:
            ungated.append(name)
            continue
        for limit_name, metric, op in _THRESHOLD_METRICS:
            limit = getattr(limits, limit_name)
            if limit is not None:
                checks.append(Check(name, metric, getattr(m, metric), limit, op))
        checks.append(Check(name, "nonfinite_positions", m.nonfinite_positions, 0, "<="))
    for better, worse in thresholds.must_beat.items():
        if better in metrics and worse in metrics:
            checks.append(Check(f"{better} vs {worse}", "perplexity", metrics[better].perplexity,
                                metrics[worse].perplexity, "<"))
    if PYTORCH in metrics:
        ref, limits = metrics[PYTORCH], thresholds.pytorch_reference
        checks.append(Check(f"{REFERENCE} onnx vs pytorch", "perplexity_rel_diff", abs(ref.perplexity_increase),
                            limits.max_perplexity_rel_diff, "<="))
        checks.append(Check(f"{REFERENCE} onnx vs pytorch", "top1_agreement", ref.top1_agreement,
                            limits.min_top1_agreement, ">="))
        if limits.max_abs_logit_error is not None:
            checks.append(Check(f"{REFERENCE} onnx vs pytorch", "max_abs_logit_error", ref.max_abs_logit_error,
                                limits.max_abs_logit_error, "<="))
    return checks, ungated


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
    from llmtrt.pipelines.runtime.runners import DecoderRunner, open_runner

    manifest = read_manifest(artifact_dir)
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


def _ppl(t: Totals) -> float:
    return math.exp(t.nll / t.tokens)


# --------------------------------------------------------------------------------------------
# the comparison and its reports
# --------------------------------------------------------------------------------------------
@dataclass
class CompareResult:
    metrics: dict[str, PrecisionMetrics]
    checks: list[Check]
    ungated: list[str]
    eval: dict[str, Any]
    thresholds: str
    notes: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def summary(self) -> dict[str, Any]:
        return {"perplexity": {k: round(m.perplexity, 6) for k, m in self.metrics.items()},
                "failed_checks": [str(c) for c in self.failed], "ungated": self.ungated}

    def to_dict(self) -> dict[str, Any]:
        return {"passed": bool(self), "reference": REFERENCE, "eval": self.eval, "thresholds": self.thresholds,
                "metrics": {k: _jsonable(asdict(m)) for k, m in self.metrics.items()},
                "checks": [{**_jsonable(asdict(c)), "passed": c.passed} for c in self.checks],
                "ungated": self.ungated, "notes": self.notes}

    def table(self) -> str:
        """Markdown table: one row per precision."""
        head = ("| precision | perplexity | vs fp32 | top-1 agree | mean KL | max abs logit err | next-token acc "
                "| gate |\n|---|---:|---:|---:|---:|---:|---:|---|")
        rows = []
        for name, m in self.metrics.items():
            mine = [c for c in self.checks if c.subject == name]
            status = ("reference" if name == REFERENCE else "check" if name == PYTORCH
                      else "not gated" if name in self.ungated
                      else "OK" if all(c.passed for c in mine) else "NOT OK")
            rows.append(f"| {name} | {m.perplexity:.4f} | {m.perplexity_increase * 100:+.3f}% | "
                        f"{m.top1_agreement:.4f} | {m.mean_kl:.2e} | {m.max_abs_logit_error:.3g} | "
                        f"{m.next_token_accuracy:.4f} | {status} |")
        return "\n".join([head, *rows])

    def markdown(self) -> str:
        e = self.eval
        lines = ["# Accuracy per precision", "",
                 f"Held-out text `{e['text']}` ({e['tokens']} tokens, {e['tokenizer']} tokenizer), "
                 f"non-overlapping windows of {e['seq_len']}"
                 f"{'' if e.get('bos_id') is None else ' each starting with BOS (id ' + str(e['bos_id']) + ')'}, "
                 f"{e['predictions']} predictions; reference "
                 f"{REFERENCE} ONNX; thresholds `{self.thresholds}`.", "", self.table(), "",
                 f"**{'PASSED' if self else 'FAILED'}**: {len(self.checks) - len(self.failed)}/{len(self.checks)} "
                 "checks met.", ""]
        lines += [f"- {c}" for c in self.checks]
        if self.ungated:
            lines += ["", f"Not gated (no thresholds for them): {', '.join(self.ungated)}."]
        lines += [f"\n{n}" for n in self.notes]
        return "\n".join(lines) + "\n"


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def _fmt(x: float) -> str:
    return f"{x:.6g}"


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
    from llmtrt.pipelines.runtime.runners import open_runner, reference_runner

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


def write_reports(result: CompareResult, out_dir: Path, say: Callable[[str], None] = print) -> dict[str, Path]:
    """compare.json, compare.md and (with matplotlib) compare.png, each written whole or not at all."""
    from llmtrt.exporter.files import write_json_atomically, write_text_atomically

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "compare.json", "md": out_dir / "compare.md"}
    write_json_atomically(paths["json"], result.to_dict())
    write_text_atomically(paths["md"], result.markdown())
    png = write_plot(result, out_dir / "compare.png")
    if png is None:
        say("note: matplotlib is not installed, so compare.png was not drawn (pip install matplotlib)")
    else:
        paths["png"] = png
    return paths


def write_plot(result: CompareResult, path: Path) -> Path | None:
    """Perplexity and top-1 agreement per precision as a PNG; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = [n for n in result.metrics if n != PYTORCH]
    ppl = [result.metrics[n].perplexity for n in names]
    agree = [result.metrics[n].top1_agreement for n in names]
    failed = {c.subject for c in result.failed}
    colors = ["tab:red" if n in failed else "tab:gray" if n == REFERENCE else "tab:blue" for n in names]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    finite = [p for p in ppl if math.isfinite(p)] or [1.0]
    bars = left.bar(names, [p if math.isfinite(p) else 0.0 for p in ppl], color=colors)
    left.bar_label(bars, labels=[f"{p:.4g}" for p in ppl], fontsize=8)
    left.axhline(result.metrics[REFERENCE].perplexity, color="black", linewidth=0.8, linestyle="--")
    left.set_ylabel("perplexity (lower is better)")
    left.set_ylim(min(finite) * 0.98, max(finite) * 1.03)
    bars = right.bar(names, agree, color=colors)
    right.bar_label(bars, labels=[f"{a:.4f}" for a in agree], fontsize=8)
    right.set_ylabel(f"top-1 agreement with {REFERENCE}")
    right.set_ylim(max(0.0, min(agree) - 0.02), 1.005)
    for ax in (left, right):
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(f"{result.eval['text']}: {result.eval['predictions']} predictions (red: over threshold)")
    fig.tight_layout()
    from llmtrt.exporter.files import atomic_file

    try:
        with atomic_file(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)
    return path
