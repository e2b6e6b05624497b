"""The TensorRT engine runner: an ``llmtrt build`` directory on Polygraphy's TrtRunner.

    with TensorRTRunner("out/engines/fp16") as runner:         # needs a CUDA GPU
        result = prefill_then_decode(runner, batch, steps=32)

The KV cache stays on the device between steps: the cache tensors are torch CUDA tensors fed back
as the next step's past (``copy_outputs_to_host=False``); only the ids, positions and mask go up
and only the logits come down. A static-cache engine (``--kv-cache static``) runs with the cache
length fixed at build time and ``write_indices``; where the engine updates its cache in place the
runner keeps the same buffers, otherwise it copies the present into them on the device.

Which optimization profile a step uses is decided by :func:`select_profile` from the engine
manifest's per-input ranges, a pure function tested on CPU; :class:`DeviceExecutor` is the only part
that needs a GPU, and tests substitute an ONNX Runtime executor to check, on CPU, that every step's
feeds satisfy the manifest's profiles for dynamic and static engines.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from llmtrt.exporter.errors import LlmtrtUserError
from llmtrt.exporter.kv_cache import get_layout
from llmtrt.pipelines.runtime.runners import DecoderRunner

ENGINE_MANIFEST_FIELDS = {"kind": str, "plan": str, "precision": str, "backend": dict, "profiles": list,
                          "onnx": str, "kv_cache": str}


def engine_manifest_path(directory: Path, precision: str | None = None) -> Path:
    found = sorted(directory.glob("engine.*.json"))
    if precision is not None:
        path = directory / f"engine.{precision}.json"
        if not path.is_file():
            names = ", ".join(p.name for p in found) or "none"
            raise LlmtrtUserError(f"{directory}: no engine.{precision}.json (engines here: {names})")
        return path
    if not found:
        raise LlmtrtUserError(f"{directory}: no engine.<precision>.json; pass a directory written by `llmtrt build`")
    if len(found) > 1:
        raise LlmtrtUserError(f"{directory}: several engines ({', '.join(p.name for p in found)}); "
                              "pick one with --precision")
    return found[0]


def read_engine_manifest(directory: str | Path, precision: str | None = None) -> tuple[Path, dict[str, Any]]:
    path = engine_manifest_path(Path(directory), precision)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise LlmtrtUserError(f"{path}: corrupt engine manifest ({type(exc).__name__}); re-run `llmtrt build`") from None
    if not isinstance(manifest, dict):
        raise LlmtrtUserError(f"{path}: corrupt engine manifest (not a JSON object); re-run `llmtrt build`")
    for key, kind in ENGINE_MANIFEST_FIELDS.items():
        if not isinstance(manifest.get(key), kind):
            raise LlmtrtUserError(f"{path}: field {key!r} is missing or not a {kind.__name__}; re-run `llmtrt build`")
    return path, manifest


def select_profile(profiles: Sequence[Mapping[str, Any]], shapes: Mapping[str, tuple[int, ...]],
                   where: str = "engine") -> int:
    """Index of the optimization profile whose min/max ranges admit every input shape; where several do
    (a static cache: prefill's seq range also holds one token), the tightest one (decode for one token)."""
    fitting = []
    for index, profile in enumerate(profiles):
        ranges = profile.get("shapes", {})
        if all(len(shape) == len(ranges[name]["min"]) and
               all(lo <= s <= hi for s, lo, hi in zip(shape, ranges[name]["min"], ranges[name]["max"], strict=True))
               for name, shape in shapes.items() if name in ranges):
            width = sum(hi - lo for r in ranges.values() for lo, hi in zip(r["min"], r["max"], strict=True))
            fitting.append((width, index))
    if fitting:
        return min(fitting)[1]
    described = ", ".join(f"{n}={list(s)}" for n, s in shapes.items() if not n.startswith("past_key_values.")
                          or n == "past_key_values.0.key")
    raise LlmtrtUserError(f"{where}: no optimization profile accepts these shapes ({described}); rebuild with "
                          "profiles that cover this batch, prompt length and context (--max-batch/--max-prompt/--max-kv)")


class Executor(Protocol):
    """Runs one engine call; owns the device memory."""

    def activate(self) -> None: ...
    def deactivate(self) -> None: ...
    def alloc(self, shape: tuple[int, ...], dtype: Any) -> Any: ...
    def to_host(self, tensor: Any) -> np.ndarray: ...
    def infer(self, feeds: dict[str, Any], profile: int) -> dict[str, Any]: ...
    def keep(self, present: Any, past: Any) -> Any: ...


class DeviceExecutor:
    """The plan on the GPU through Polygraphy's TrtRunner (TensorRT or, with its env switch, TensorRT-RTX)."""

    def __init__(self, plan_path: Path, backend_name: str, onnx_dir: Path | None = None) -> None:
        self.plan_path, self.backend_name, self.onnx_dir = plan_path, backend_name, onnx_dir
        self.runner, self.profile = None, None

    def activate(self) -> None:
        import torch

        if not torch.cuda.is_available():
            cpu = f"llmtrt generate {self.onnx_dir}" if self.onnx_dir else "the ONNX directory it was built from"
            raise LlmtrtUserError(f"TensorRT engines need a GPU; there is no CUDA device here, so {self.plan_path} "
                                  f"cannot run. Run it on a machine with the engine's target GPU, or run the ONNX "
                                  f"it was built from on the CPU: {cpu}")
        from polygraphy import config as polygraphy_config

        polygraphy_config.USE_TENSORRT_RTX = self.backend_name == "tensorrt-rtx"
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        self.runner = TrtRunner(EngineFromBytes(self.plan_path.read_bytes()))
        self.runner.activate()

    def deactivate(self) -> None:
        if self.runner is not None:
            self.runner.deactivate()
        self.runner = self.profile = None

    def alloc(self, shape, dtype):
        import torch

        torch_dtype = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32}[np.dtype(dtype)]
        if 0 in shape:  # TensorRT wants a non-null address even for an empty past
            return torch.empty(1, dtype=torch_dtype, device="cuda")[:0].view(shape)
        return torch.zeros(shape, dtype=torch_dtype, device="cuda")

    def to_host(self, tensor):
        return tensor.detach().float().cpu().numpy() if hasattr(tensor, "detach") else np.asarray(tensor)

    def infer(self, feeds, profile):
        import torch

        if profile != self.profile:
            self.runner.set_profile(profile)
            self.profile = profile
        device_feeds = {k: v if isinstance(v, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(v)).cuda()
                        for k, v in feeds.items()}
        return self.runner.infer(device_feeds, copy_outputs_to_host=False)

    def keep(self, present, past):
        # Output buffers belong to Polygraphy's allocator and are reused by the next call: own a copy,
        # unless the engine wrote the cache in place.
        if past.numel() and present.data_ptr() == past.data_ptr():
            return past
        if past.shape == present.shape:
            return past.copy_(present)
        return present.clone()


class TensorRTRunner(DecoderRunner):
    """An engine directory written by ``llmtrt build`` (engine.<precision>.plan + .json)."""

    def __init__(self, directory: str | Path, precision: str | None = None, *, name: str = "tensorrt",
                 executor: Executor | None = None) -> None:
        from llmtrt.pipelines.artifacts import load_exported

        self.directory = Path(directory)
        self.manifest_path, manifest = read_engine_manifest(self.directory, precision)
        plan = self.directory / manifest["plan"]
        if not plan.is_file():
            raise LlmtrtUserError(f"{plan}: listed in {self.manifest_path.name} but missing; re-run `llmtrt build`")
        onnx_dir = Path(manifest["onnx"]).parent
        exported = load_exported(onnx_dir)  # model config and tokenizer come from the ONNX it was built from
        layout = get_layout(manifest["kv_cache"], where=f"{self.manifest_path}: kv_cache")
        pinned = manifest.get("lowering", {}).get("pinned_dims", {}).get("max_cache_length")
        self.profiles = manifest["profiles"]
        mask_max = max((p["shapes"]["attention_mask"]["max"][-1] for p in self.profiles
                        if "attention_mask" in p.get("shapes", {})), default=exported.config.max_position_embeddings)
        backend = manifest["backend"].get("name", "tensorrt")
        super().__init__(exported.config, layout, int(mask_max), name,
                         f"{backend} {manifest['backend'].get('version', '')} engine ({plan})",
                         fixed_cache_length=int(pinned) if pinned else None)
        self.onnx_dir, self.manifest = onnx_dir, manifest
        self.executor = executor or DeviceExecutor(plan, backend, onnx_dir)
        self.cache_dtype = np.float16 if exported.io.inputs[3].dtype == "float16" else np.float32

    def activate_impl(self) -> None:
        self.executor.activate()

    def deactivate_impl(self) -> None:
        self.executor.deactivate()

    def _alloc(self, shape):
        return self.executor.alloc(shape, self.cache_dtype)

    def _host(self, tensor):
        return self.executor.to_host(tensor)

    def _call(self, feeds):
        shapes = {k: tuple(v.shape) for k, v in feeds.items()}
        profile = select_profile(self.profiles, shapes, where=str(self.manifest_path))
        outs = self.executor.infer(feeds, profile)
        present = []
        for i in range(self.config.num_hidden_layers):
            for kind in ("key", "value"):
                present.append(self.executor.keep(outs[f"present.{i}.{kind}"], feeds[f"past_key_values.{i}.{kind}"]))
        return np.asarray(self.executor.to_host(outs["logits"]), dtype=np.float32), present
