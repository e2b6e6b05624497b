"""Text generation with the KV cache from any artifact: PyTorch model, ONNX (ONNX Runtime), TensorRT engine.

    with open_artifact("out/onnx") as runner:                 # or open_model("bytes-llama")
        tok = load_tokenizer("out/onnx")
        result = generate(runner, tok, ["The for statement"], max_new_tokens=32)
    result.texts[0], result.stats.decode_tokens_per_s

A *runner* is a context manager that knows its model config, how many positions its graph holds and
how to make a :data:`llmtrt.pipelines.runtime.decoding.Stepper`; the decode loop here is the same for all of them:
prefill the (left-padded) prompts in one call, then one token per call, feeding ``present`` back as
``past``. Tokens are greedy or temperature + top-p samples from a seeded numpy Generator, so a seed
reproduces a sample on every backend that computes the same logits.
"""

from __future__ import annotations

import codecs
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from llmtrt.exporter.config import ModelConfig
from llmtrt.pipelines.errors import LlmtrtUserError
from llmtrt.pipelines.runtime.decoding import (
    Batch,
    Stepper,
    empty_cache,
    ort_static_stepper,
    ort_stepper,
    static_cache_adapter,
    torch_stepper,
)

PROVIDERS = ("auto", "cpu", "cuda")
_ORT_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
STOP_REASONS = ("max_new_tokens", "eos", "max_positions")


# --------------------------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sampling:
    """Greedy (argmax) or temperature + nucleus (top-p) sampling with a seeded numpy Generator."""

    greedy: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.greedy:
            if not self.temperature > 0:
                raise LlmtrtUserError(f"--temperature must be > 0, got {self.temperature} (use --greedy for argmax)")
            if not 0 < self.top_p <= 1:
                raise LlmtrtUserError(f"--top-p must be in (0, 1], got {self.top_p}")

    def chooser(self) -> Callable[[np.ndarray], np.ndarray]:
        """A function from last-position logits [batch, vocab] to tokens [batch] (stateful when sampling)."""
        if self.greedy:
            return lambda logits: logits.argmax(-1).astype(np.int64)
        rng = np.random.default_rng(self.seed)

        def sample(logits: np.ndarray) -> np.ndarray:
            z = logits.astype(np.float64) / self.temperature
            probs = np.exp(z - z.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            out = np.empty(len(probs), dtype=np.int64)
            for row, p in enumerate(probs):
                order = np.argsort(-p, kind="stable")  # ties keep the lower id first, like argmax
                cumulative = np.cumsum(p[order])
                # smallest prefix whose mass reaches top_p (the cumsum may end a hair below 1.0)
                keep = min(int(np.searchsorted(cumulative, self.top_p)) + 1, len(p))
                kept = p[order[:keep]]
                out[row] = order[rng.choice(keep, p=kept / kept.sum())]
            return out

        return sample


# --------------------------------------------------------------------------------------------
# runners
# --------------------------------------------------------------------------------------------
class Runner(Protocol):
    """What the decode loop needs from a backend; every runner is a context manager."""

    description: str         # e.g. "onnxruntime 1.32 CPUExecutionProvider (out/onnx/model.onnx)"
    config: ModelConfig
    max_positions: int       # past + new tokens the graph can hold (rotary table / engine profile)
    cache_dtype: type

    def stepper(self, max_cache_len: int) -> Stepper: ...

    def __enter__(self) -> Runner: ...

    def __exit__(self, *exc: object) -> None: ...


class _Closing:
    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        pass


class TorchRunner(_Closing):
    """The fp32 PyTorch model (the reference)."""

    def __init__(self, spec: str, max_positions: int | None = None) -> None:
        from llmtrt.exporter.config import resolve_model
        from llmtrt.exporter.weights import load_model

        self.source = resolve_model(spec)
        self.config = self.source.config
        self.max_positions = max_positions or self.config.max_position_embeddings
        self.model = load_model(self.source, max_positions=self.max_positions)
        self.cache_dtype = np.float32
        self.description = f"pytorch fp32 ({spec})"

    def stepper(self, max_cache_len: int) -> Stepper:
        return torch_stepper(self.model)


class OrtRunner(_Closing):
    """An exported (or quantized) ONNX directory run with ONNX Runtime; static caches go through the adapter."""

    def __init__(self, directory: str | Path, provider: str = "auto") -> None:
        import onnxruntime as ort

        from llmtrt.pipelines.artifacts import load_exported

        directory = Path(directory)
        try:
            exported = load_exported(directory)
        except (KeyError, TypeError) as exc:
            raise LlmtrtUserError(f"{directory / 'manifest.json'}: missing or bad field {exc}; "
                                  "re-run the stage that wrote it (`llmtrt export`)") from None
        self.config = exported.config
        self.kv_cache = exported.kv_cache
        from llmtrt.pipelines.engine.profiles import max_positions_from_file

        self.max_positions = max_positions_from_file(exported.onnx_path) or self.config.max_position_embeddings
        name = _ort_provider(provider, ort.get_available_providers())
        providers = [name, "CPUExecutionProvider"] if name != "CPUExecutionProvider" else [name]
        try:
            options = ort.SessionOptions()
            options.log_severity_level = 3  # errors only: static caches log a TensorScatter copy note per node per step
            self.session = ort.InferenceSession(str(exported.onnx_path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise LlmtrtUserError(f"{exported.onnx_path}: ONNX Runtime cannot load it ({str(exc)[:300]})") from None
        past = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.cache_dtype = np.float16 if past and past[0].type == "tensor(float16)" else np.float32
        self.description = (f"onnxruntime {ort.__version__} {self.session.get_providers()[0]} "
                            f"({exported.onnx_path}, {exported.dialect} ops, {self.kv_cache} cache)")

    def stepper(self, max_cache_len: int) -> Stepper:
        if self.kv_cache == "static":
            return static_cache_adapter(ort_static_stepper(self.session), max_cache_len)
        return ort_stepper(self.session)

    def close(self) -> None:
        self.session = None


def _ort_provider(provider: str, available: Sequence[str]) -> str:
    if provider not in PROVIDERS:
        raise LlmtrtUserError(f"--provider must be one of {', '.join(PROVIDERS)}, got {provider!r}")
    if provider == "auto":
        return _ORT_PROVIDERS["cuda"] if _ORT_PROVIDERS["cuda"] in available else _ORT_PROVIDERS["cpu"]
    name = _ORT_PROVIDERS[provider]
    if name not in available:
        raise LlmtrtUserError(f"--provider {provider}: this onnxruntime has no {name} (available: "
                              f"{', '.join(available)}); pip install onnxruntime-gpu, or use --provider cpu")
    return name


class TensorRTRunner(_Closing):
    """A serialized engine written by ``llmtrt build``; needs a GPU (CUDA memory via torch)."""

    def __init__(self, directory: str | Path, precision: str | None = None) -> None:
        from llmtrt.pipelines.artifacts import load_exported
        from llmtrt.pipelines.engine.backends import get_backend

        directory = Path(directory)
        self.manifest_path = _engine_manifest(directory, precision)
        try:
            manifest = json.loads(self.manifest_path.read_text(encoding="utf-8"))
            plan_path = directory / manifest["plan"]
            backend = get_backend(manifest["backend"]["name"])
            onnx_dir = Path(manifest["onnx"]).parent
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise LlmtrtUserError(f"{self.manifest_path}: corrupt engine manifest ({exc}); re-run `llmtrt build`") from None
        if not plan_path.is_file():
            raise LlmtrtUserError(f"{plan_path}: listed in {self.manifest_path.name} but missing; re-run `llmtrt build`")
        exported = load_exported(onnx_dir)  # model config, cache layout and tokenizer come from the ONNX's manifest
        self.config, self.kv_cache, self.onnx_dir = exported.config, exported.kv_cache, onnx_dir
        self.profiles = manifest.get("profiles", [])
        self.max_positions = max((p["shapes"]["attention_mask"]["max"][-1] for p in self.profiles
                                  if "attention_mask" in p.get("shapes", {})), default=self.config.max_position_embeddings)
        trt = backend.module()
        logger = backend.logger()
        mark = logger.mark()
        self.runtime = trt.Runtime(logger)
        try:
            self.engine = self.runtime.deserialize_cuda_engine(plan_path.read_bytes())
        except Exception as exc:  # some versions raise instead of returning None
            self.engine, reason = None, str(exc)
        else:
            reason = " ".join(logger.since(mark, "ERROR", "INTERNAL_ERROR")[-1:])
        if self.engine is None:
            import torch

            if not torch.cuda.is_available():
                raise LlmtrtUserError(
                    f"TensorRT engines need a GPU; there is no CUDA device here, so {backend.name} "
                    f"{backend.version()} cannot deserialize {plan_path}. Run on a machine with the engine's target "
                    f"GPU, or generate on the CPU from the ONNX directory: llmtrt generate {onnx_dir}")
            raise LlmtrtUserError(f"{plan_path}: {backend.name} could not deserialize it ({reason or 'no message'}); "
                                  "rebuild it with `llmtrt build` for this GPU and TensorRT version")
        import torch

        self.trt, self.torch = trt, torch
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self.cache_dtype = trt.nptype(self.engine.get_tensor_dtype("past_key_values.0.key"))
        self.description = f"{backend.name} {backend.version()} ({plan_path})"

    def _profile_for(self, shapes: dict[str, tuple[int, ...]]) -> int:
        for index, profile in enumerate(self.profiles):
            ranges = profile.get("shapes", {})
            if all(all(lo <= s <= hi for s, lo, hi in zip(shape, ranges[n]["min"], ranges[n]["max"], strict=True))
                   for n, shape in shapes.items() if n in ranges):
                return index
        raise LlmtrtUserError(f"{self.manifest_path}: no optimization profile accepts shapes {shapes}; "
                              "rebuild with profiles covering this prompt length")

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch, trt = self.torch, self.trt
        self.context.set_optimization_profile_async(self._profile_for({k: v.shape for k, v in feeds.items()}),
                                                    self.stream.cuda_stream)
        keep = []
        for name, array in feeds.items():
            dtype = trt.nptype(self.engine.get_tensor_dtype(name))
            host = np.ascontiguousarray(array.astype(dtype, copy=False))
            # an empty past (prefill) still needs a non-null address
            tensor = torch.from_numpy(host if host.size else np.zeros(1, dtype)).cuda()
            keep.append(tensor)
            self.context.set_input_shape(name, tuple(array.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            if self.engine.get_tensor_mode(name) != trt.TensorIOMode.OUTPUT:
                continue
            dtype = torch.from_numpy(np.zeros(0, trt.nptype(self.engine.get_tensor_dtype(name)))).dtype
            shape = tuple(self.context.get_tensor_shape(name))
            out = torch.empty(max(1, int(np.prod(shape))), dtype=dtype, device="cuda")
            self.context.set_tensor_address(name, out.data_ptr())
            outputs[name] = out[: int(np.prod(shape))].view(shape)
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        self.stream.synchronize()
        return {k: v.cpu().numpy() for k, v in outputs.items()}

    def stepper(self, max_cache_len: int) -> Stepper:
        layers = self.config.num_hidden_layers

        def run(input_ids, position_ids, attention_mask, past, write_indices=None):
            feeds = {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": attention_mask}
            for i in range(layers):
                feeds[f"past_key_values.{i}.key"], feeds[f"past_key_values.{i}.value"] = past[2 * i], past[2 * i + 1]
            if write_indices is not None:
                feeds["write_indices"] = write_indices
            outs = self._run(feeds)
            present = [outs[f"present.{i}.{kv}"] for i in range(layers) for kv in ("key", "value")]
            return outs["logits"], present

        if self.kv_cache == "static":
            return static_cache_adapter(lambda ids, pos, mask, wi, cache: run(ids, pos, mask, cache, wi), max_cache_len)
        return run

    def close(self) -> None:
        self.context = self.engine = None


def _engine_manifest(directory: Path, precision: str | None) -> Path:
    found = sorted(directory.glob("engine.*.json"))
    if precision is not None:
        path = directory / f"engine.{precision}.json"
        if not path.is_file():
            names = ", ".join(p.name for p in found) or "none"
            raise LlmtrtUserError(f"{directory}: no engine.{precision}.json (engines here: {names})")
        return path
    if len(found) > 1:
        raise LlmtrtUserError(f"{directory}: several engines ({', '.join(p.name for p in found)}); "
                              "pick one with --precision")
    return found[0]


def artifact_kind(path: str | Path) -> str:
    """"onnx" (manifest.json) or "engine" (engine.<precision>.json); a user error otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise LlmtrtUserError(f"{path}: no such artifact directory; pass a directory written by `llmtrt export` "
                              "(manifest.json) or `llmtrt build` (engine.<precision>.plan/.json), or use --model")
    if (path / "manifest.json").is_file():
        return "onnx"
    if any(path.glob("engine.*.json")):
        return "engine"
    raise LlmtrtUserError(f"{path}: neither manifest.json nor engine.<precision>.json here; pass a directory "
                          "written by `llmtrt export` or `llmtrt build`, or use --model PRESET|HF_DIR")


def open_artifact(path: str | Path, *, provider: str = "auto", precision: str | None = None) -> Runner:
    """The runner for an artifact directory, chosen from what its manifest says it is."""
    if artifact_kind(path) == "onnx":
        return OrtRunner(path, provider)
    return TensorRTRunner(path, precision)


def open_model(spec: str, max_positions: int | None = None) -> Runner:
    """The fp32 PyTorch model for a preset name or an HF checkpoint directory."""
    return TorchRunner(spec, max_positions)


# --------------------------------------------------------------------------------------------
# model facts: tokenizer source and EOS ids
# --------------------------------------------------------------------------------------------
def model_dir_for(artifact: str | Path) -> str:
    """What to hand ``load_tokenizer``: the ONNX directory (its manifest names the model) for any artifact."""
    if artifact_kind(artifact) == "engine":
        manifest = json.loads(_engine_manifest(Path(artifact), None).read_text(encoding="utf-8"))
        return str(Path(manifest["onnx"]).parent)
    return str(artifact)


def eos_token_ids(model: str | Path) -> list[int]:
    """``eos_token_id`` from generation_config.json (else config.json) of the checkpoint behind ``model``
    (a preset, an HF dir, or an artifact whose manifest names one); [] when there is none (bytes-llama)."""
    from llmtrt.exporter.config import resolve_model

    path = Path(model)
    spec = str(model)
    if path.is_dir() and (path / "manifest.json").is_file():
        spec = json.loads((path / "manifest.json").read_text(encoding="utf-8")).get("model_source") or ""
    try:
        checkpoint = resolve_model(spec).checkpoint_dir if spec else None
    except LlmtrtUserError:
        return []
    if checkpoint is None:
        return []
    for name in ("generation_config.json", "config.json"):
        file = checkpoint / name
        if not file.is_file():
            continue
        value = json.loads(file.read_text(encoding="utf-8")).get("eos_token_id")
        if value is not None:
            return [int(v) for v in (value if isinstance(value, list) else [value])]
    return []


# --------------------------------------------------------------------------------------------
# incremental detokenization
# --------------------------------------------------------------------------------------------
class TextStream:
    """Decode tokens as they arrive, never emitting half a character.

    Byte tokenizers go through an incremental UTF-8 decoder (an incomplete multi-byte sequence is
    held back until its last byte arrives); other tokenizers re-decode the whole sequence and emit
    the new suffix once it no longer ends in U+FFFD. ``finish()`` flushes, so the concatenated
    chunks equal ``tokenizer.decode(all ids)``.
    """

    def __init__(self, tokenizer: Any) -> None:
        from llmtrt.pipelines.runtime.tokenizer import ByteTokenizer

        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""
        self._bytes = codecs.getincrementaldecoder("utf-8")(errors="replace") \
            if isinstance(tokenizer, ByteTokenizer) else None

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        if self._bytes is not None:
            chunk = self._bytes.decode(bytes([int(token)]))
        else:
            text = self.tokenizer.decode(self.ids)
            if text.endswith("\ufffd") or not text.startswith(self.emitted):
                return ""
            chunk = text[len(self.emitted):]
        self.emitted += chunk
        return chunk

    def finish(self) -> str:
        if self._bytes is not None:
            chunk = self._bytes.decode(b"", final=True)
        else:
            text = self.tokenizer.decode(self.ids)
            chunk = text[len(self.emitted):] if text.startswith(self.emitted) else ""
        self.emitted += chunk
        return chunk


# --------------------------------------------------------------------------------------------
# the decode loop
# --------------------------------------------------------------------------------------------
@dataclass
class GenerationStats:
    prompt_tokens: int             # real (unpadded) prompt tokens over the batch
    new_tokens: int                # generated tokens over the batch (EOS not counted)
    prefill_ms: float
    decode_ms: float
    decode_steps: int              # one-token forward calls after prefill
    prefill_tokens_per_s: float
    decode_tokens_per_s: float     # batch * decode_steps / decode time


@dataclass
class Generation:
    tokens: list[list[int]]        # new tokens per prompt, EOS excluded
    stop_reasons: list[str]        # per prompt: max_new_tokens | eos | max_positions
    stats: GenerationStats
    texts: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "texts": self.texts, "stop_reasons": self.stop_reasons,
                **asdict(self.stats)}


def generate_ids(runner: Runner, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
                 sampling: Sampling = Sampling(), eos_ids: Sequence[int] = (), pad_id: int = 0,
                 on_token: Callable[[int, int], None] | None = None, warmup: bool = True) -> Generation:
    """Decode ``max_new_tokens`` tokens for each prompt (left-padded into one batch) with the KV cache.

    A row stops at an EOS id (not included in its tokens) or when the cache is full
    (``runner.max_positions``); the loop ends when every row has stopped. ``on_token(row, token)``
    is called for each kept token as soon as it is chosen (streaming). ``warmup`` runs one untimed
    one-token forward first, so the timings measure steady state, not lazy initialization.
    """
    if max_new_tokens < 1:
        raise LlmtrtUserError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise LlmtrtUserError("every prompt needs at least one token (an empty --prompt has none)")
    cfg = runner.config
    bad = sorted({t for p in prompts for t in p if not 0 <= t < cfg.vocab_size})
    if bad:
        raise LlmtrtUserError(f"prompt token ids {bad[:5]} are outside the model's vocabulary (0..{cfg.vocab_size - 1})")
    batch = Batch.left_padded(prompts, pad_id)
    width = batch.input_ids.shape[1]
    if width > runner.max_positions:
        raise LlmtrtUserError(f"the prompt is {width} tokens but {runner.description} holds {runner.max_positions} "
                              "positions; shorten the prompt or re-export with a larger --max-seq")
    # the last chosen token is never fed back, so a full cache still yields one more token
    budget = min(max_new_tokens, runner.max_positions - width + 1)
    step = runner.stepper(min(runner.max_positions, width + budget - 1))
    cache = empty_cache(cfg.num_hidden_layers, len(prompts), cfg.num_key_value_heads, cfg.head_dim, runner.cache_dtype)
    choose = sampling.chooser()
    eos = {int(e) for e in eos_ids}
    rows = len(prompts)
    if warmup:
        one = np.zeros((1, 1), dtype=np.int64)
        step(one, one, np.ones_like(one), empty_cache(cfg.num_hidden_layers, 1, cfg.num_key_value_heads,
                                                      cfg.head_dim, runner.cache_dtype))
    tokens: list[list[int]] = [[] for _ in range(rows)]
    reasons = [""] * rows

    t0 = time.perf_counter()
    logits, present = step(batch.input_ids, batch.position_ids, batch.attention_mask, cache)
    prefill_s = time.perf_counter() - t0
    mask, positions = batch.attention_mask, batch.position_ids[:, -1:]
    t1 = time.perf_counter()
    steps = 0
    while True:
        chosen = choose(logits[:, -1])
        for row, token in enumerate(chosen.tolist()):
            if reasons[row]:
                continue
            if token in eos:
                reasons[row] = "eos"
                continue
            tokens[row].append(token)
            if on_token is not None:
                on_token(row, token)
            if len(tokens[row]) == max_new_tokens:
                reasons[row] = "max_new_tokens"
            elif len(tokens[row]) == budget:
                reasons[row] = "max_positions"
        if all(reasons):
            break
        fed = chosen.reshape(rows, 1).astype(np.int64)
        mask = np.concatenate([mask, np.ones_like(fed)], axis=1)
        positions = positions + 1
        logits, present = step(fed, positions, mask, present)
        steps += 1
    decode_s = time.perf_counter() - t1

    prompt_tokens = int(batch.attention_mask.sum())
    stats = GenerationStats(
        prompt_tokens=prompt_tokens, new_tokens=sum(len(t) for t in tokens),
        prefill_ms=round(prefill_s * 1e3, 3), decode_ms=round(decode_s * 1e3, 3), decode_steps=steps,
        prefill_tokens_per_s=round(prompt_tokens / prefill_s, 1) if prefill_s > 0 else 0.0,
        decode_tokens_per_s=round(rows * steps / decode_s, 1) if steps and decode_s > 0 else 0.0)
    return Generation(tokens, reasons, stats)


def generate(runner: Runner, tokenizer: Any, prompts: str | Sequence[str], *, max_new_tokens: int = 64,
             sampling: Sampling = Sampling(), eos_ids: Sequence[int] = (),
             on_text: Callable[[int, str], None] | None = None) -> Generation:
    """Text in, text out: encode, :func:`generate_ids`, decode. ``on_text(row, chunk)`` streams text."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    streams = [TextStream(tokenizer) for _ in prompts]

    def on_token(row: int, token: int) -> None:
        chunk = streams[row].push(token)
        if chunk and on_text is not None:
            on_text(row, chunk)

    result = generate_ids(runner, [tokenizer.encode(p) for p in prompts], max_new_tokens=max_new_tokens,
                          sampling=sampling, eos_ids=eos_ids, on_token=on_token)
    for row, stream in enumerate(streams):
        tail = stream.finish()
        if tail and on_text is not None:
            on_text(row, tail)
    result.texts = [tokenizer.decode(t) for t in result.tokens]
    return result
