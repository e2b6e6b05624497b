"""Polygraphy files that reproduce validate's check by hand, with the same verdict.

    polygraphy run model.onnx --onnxrt --load-inputs inputs.json --load-outputs reference_outputs.json \\
        --atol 0.0001 logits:0.0001 --rtol 0.001 logits:0.001 --check-error-stat max

Each prompt of the validation batch is its own sequence (no padding: a padded position's outputs mean
nothing and backends legitimately differ there, so a padded feed would fail by hand what validate
passes). Iteration 0 of a prompt is its prefill from an empty cache; iteration i feeds decode token i
with the PyTorch reference's own cache as the past, so every step is checked on exactly the inputs the
reference saw. ``reference_outputs.json`` holds the fp32 PyTorch model's logits and present cache for
every iteration; the tolerances are the artifact precision's logits and present groups.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np

from llmtrt.exporter.kv_cache import CacheState, KVLayout
from llmtrt.pipelines.checks.tolerances import Tolerances, _lookup

COMMAND = ("polygraphy run {onnx} --onnxrt --load-inputs {inputs} --load-outputs {reference} "
           "--atol {atol_present:g} logits:{atol_logits:g} --rtol {rtol_present:g} logits:{rtol_logits:g} "
           "--check-error-stat max")


def reproduction_feeds(model, layout: KVLayout, prompts: list[list[int]], decode_tokens: np.ndarray,
                       cache_dtype=np.float32, logits: str = "all") -> tuple[list[OrderedDict], list[OrderedDict]]:
    """(feeds, reference outputs): per prompt, its prefill then each decode step on the reference's cache
    (``logits``: the positions the graph returns logits for, "all" or "last")."""
    from llmtrt.pipelines.runtime.runners import PyTorchRunner

    reference = PyTorchRunner(model=model, layout=layout, logits=logits)
    config = model.config
    feeds, outputs = [], []
    with reference:
        for row, prompt in enumerate(prompts):
            steps = decode_tokens.shape[1]
            capacity = len(prompt) + steps
            shape = layout.cache_shape(config, 1, capacity)
            past = [np.zeros(shape, dtype=np.float32) for _ in range(2 * config.num_hidden_layers)]
            state = CacheState(past, np.zeros((1, 0), dtype=np.int64), capacity)
            ids = np.asarray([prompt], dtype=np.int64)
            positions = np.arange(len(prompt), dtype=np.int64)[None]
            for step in range(steps + 1):
                feed = OrderedDict(input_ids=ids, position_ids=positions,
                                   **layout.step_inputs(np.ones_like(ids), state))
                for i in range(config.num_hidden_layers):
                    for k, kind in enumerate(("key", "value")):
                        feed[f"past_key_values.{i}.{kind}"] = state.tensors[2 * i + k].astype(cache_dtype)
                feed.move_to_end("attention_mask", last=False)
                for name in ("position_ids", "input_ids"):
                    feed.move_to_end(name, last=False)
                out = reference.infer(feed)
                feeds.append(feed)
                outputs.append(OrderedDict((k, np.asarray(v, dtype=np.float32)) for k, v in out.items()))
                state.tensors = [out[f"present.{i}.{kind}"] for i in range(config.num_hidden_layers)
                                 for kind in ("key", "value")]
                state.mask = np.concatenate([state.mask, np.ones_like(ids)], axis=1)
                if step < steps:
                    ids = decode_tokens[row:row + 1, step:step + 1].astype(np.int64)
                    positions = np.array([[state.length]], dtype=np.int64)
    return feeds, outputs


def write_reproduction(directory: Path, onnx_path: Path, model, layout: KVLayout, prompts: list[list[int]],
                       decode_tokens: np.ndarray, tol: Tolerances, atol: dict, rtol: dict,
                       cache_dtype=np.float32, logits: str = "all") -> dict[str, str]:
    """inputs.json and reference_outputs.json in ``directory``; returns their paths and the command."""
    from polygraphy.comparator import RunResults
    from polygraphy.comparator.struct import IterationResult
    from polygraphy.json import save_json
    from polygraphy.logger import G_LOGGER

    feeds, outputs = reproduction_feeds(model, layout, prompts, decode_tokens, cache_dtype, logits)
    inputs, reference = directory / "inputs.json", directory / "reference_outputs.json"
    results = RunResults()
    results.append(("pytorch-fp32", [IterationResult(o, runner_name="pytorch-fp32") for o in outputs]))
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        save_json(feeds, str(inputs))
        results.save(str(reference))
    logits, present = tol.groups["logits"], tol.groups["present"]
    command = COMMAND.format(onnx=onnx_path, inputs=inputs, reference=reference,
                             atol_logits=_lookup(atol, "logits", logits.atol),
                             rtol_logits=_lookup(rtol, "logits", logits.rtol),
                             atol_present=_lookup(atol, "present", present.atol),
                             rtol_present=_lookup(rtol, "present", present.rtol))
    return {"inputs": str(inputs), "reference_outputs": str(reference), "reproduce": command}
