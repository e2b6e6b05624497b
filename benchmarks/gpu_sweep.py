"""GPU sweep of the Triton kernels against the torch references, and attention speed vs SDPA.

    python benchmarks/gpu_sweep.py --out out/gpu_sweep.json          # full sweep (~ minutes on an H100)
    python benchmarks/gpu_sweep.py --quick                           # a few cases per kernel

Accuracy: each kernel in fp32/fp16/bf16 is compared with the reference run in fp32 on the same
(rounded) inputs; the reference run in the kernel's dtype is reported beside it as the baseline a
kernel should not be much worse than. Speed: GQA decode (batch 1, past 1024 / 4096) and prefill
against ``torch.nn.functional.scaled_dot_product_attention`` given the same KV cache (concatenated
past + new, as the op does). Prints a table and writes JSON. Needs CUDA, torch and triton; this
module imports neither at load time so the grid can be unit-tested on CPU.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

DTYPES = ("float32", "float16", "bfloat16")
# (q heads, kv heads, head_dim): MHA-as-GQA, Llama-3.2-1B, TinyLlama, Llama-3.1-8B, MQA
HEAD_CONFIGS = ((8, 8, 64), (32, 8, 64), (32, 4, 64), (32, 8, 128), (8, 1, 128))
# (batch, prompt, past): decode, long decode, batched decode, chunked prefill with past, prefill, long prefill
ATTENTION_SHAPES = ((1, 1, 0), (1, 1, 1024), (1, 1, 4096), (8, 1, 4096), (4, 128, 1024), (1, 2048, 0),
                    (8, 512, 0), (2, 16, 4096))
RMS_SHAPES = ((1, 1, 2048), (8, 2048, 2048), (1, 1, 4096), (8, 1, 8192))          # (batch, seq, hidden)
ROTARY_SHAPES = ((1, 32, 1, 128), (8, 32, 2048, 64), (8, 8, 2048, 128), (4, 8, 1, 64))  # (b, heads, seq, d)
TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 6e-2}   # max abs error, after baseline comparison
SPEED_CASES = (("decode", 1, 1, 1024), ("decode", 1, 1, 4096), ("prefill", 1, 2048, 0), ("prefill", 1, 512, 0))
SPEED_HEADS = (32, 8, 128)


def sweep_grid(quick: bool = False) -> list[dict]:
    """Every accuracy case: kernel, dtype and shape (batch 1-8, prompt 1-2048, past 0-4096,
    heads 8-32, kv heads 1-8, head_dim 64/128)."""
    dtypes = DTYPES
    heads = HEAD_CONFIGS[1::2] if quick else HEAD_CONFIGS
    shapes = ATTENTION_SHAPES[:3] + ATTENTION_SHAPES[5:6] if quick else ATTENTION_SHAPES
    cases = []
    for dtype, (b, s, h, d) in itertools.product(dtypes, ROTARY_SHAPES[:2] if quick else ROTARY_SHAPES):
        cases.append({"kernel": "rotary_embedding", "dtype": dtype, "batch": b, "heads": h, "seq": s, "head_dim": d})
    for dtype, (b, s, hidden) in itertools.product(dtypes, RMS_SHAPES[:2] if quick else RMS_SHAPES):
        cases.append({"kernel": "rms_norm", "dtype": dtype, "batch": b, "seq": s, "hidden": hidden})
    for dtype, (hq, hkv, d), (b, s, past) in itertools.product(dtypes, heads, shapes):
        for masked in (True, False):
            cases.append({"kernel": "gqa_attention", "dtype": dtype, "batch": b, "seq": s, "past": past,
                          "q_heads": hq, "kv_heads": hkv, "head_dim": d, "mask": "additive" if masked else "causal"})
    return cases


def speed_grid() -> list[dict]:
    hq, hkv, d = SPEED_HEADS
    return [{"phase": p, "batch": b, "seq": s, "past": past, "q_heads": hq, "kv_heads": hkv, "head_dim": d,
             "dtype": dt} for (p, b, s, past) in SPEED_CASES for dt in ("float16", "bfloat16")]


# --------------------------------------------------------------------------------------------
# GPU side (imports torch/triton lazily)
# --------------------------------------------------------------------------------------------
def _inputs(case: dict, torch, device="cuda"):
    dtype = getattr(torch, case["dtype"])
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    if case["kernel"] == "rms_norm":
        return (rnd(case["batch"], case["seq"], case["hidden"], scale=3.0), rnd(case["hidden"]), 1e-5)
    if case["kernel"] == "rotary_embedding":
        b, h, s, d = case["batch"], case["heads"], case["seq"], case["head_dim"]
        pos = torch.randint(0, 8192, (b, s), generator=g, device=device)
        inv = 1.0 / (500000.0 ** (torch.arange(0, d, 2, device=device).float() / d))
        angles = torch.arange(8192, device=device).float()[:, None] * inv
        return (rnd(b, h, s, d), pos, angles.cos().to(dtype), angles.sin().to(dtype))
    b, s, past, hq, hkv, d = (case[k] for k in ("batch", "seq", "past", "q_heads", "kv_heads", "head_dim"))
    total = past + s
    allowed = torch.arange(total, device=device)[None, :] <= (past + torch.arange(s, device=device))[:, None]
    mask = torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype).expand(b, 1, s, total).contiguous()
    return (rnd(b, hq, s, d), rnd(b, hkv, s, d), rnd(b, hkv, s, d), mask, rnd(b, hkv, past, d), rnd(b, hkv, past, d),
            hq, hkv, d ** -0.5)


def _run_case(case: dict, torch) -> dict:
    from llmtrt.plugins.gqa_attention import kernel as attention
    from llmtrt.plugins.gqa_attention import reference as attention_ref
    from llmtrt.plugins.rms_norm import kernel as rms
    from llmtrt.plugins.rms_norm import reference as rms_ref
    from llmtrt.plugins.rotary_embedding import kernel as rotary
    from llmtrt.plugins.rotary_embedding import reference as rotary_ref

    args = _inputs(case, torch)
    up = [a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
    if case["kernel"] == "rms_norm":
        out, ref, base = rms.rms_norm(*args), rms_ref(*up), rms_ref(*args)
    elif case["kernel"] == "rotary_embedding":
        out, ref, base = rotary.rotary_embedding(*args), rotary_ref(*up), rotary_ref(*args)
    else:
        kargs = list(args)
        if case["mask"] == "causal":
            kargs[3] = None
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        outs = attention.gqa_attention(*kargs, num_sms=sms)
        refs, bases = attention_ref(*up), attention_ref(*args)
        for name, o, r in zip(("present_key", "present_value"), outs[1:], refs[1:], strict=True):
            if not torch.equal(o.float(), r):
                return {**case, "error": f"{name} differs from the reference concat"}
        out, ref, base = outs[0], refs[0], bases[0]
    torch.cuda.synchronize()
    err = (out.float() - ref).abs().max().item()
    base_err = (base.float() - ref).abs().max().item()
    limit = max(2 * base_err, TOLERANCE[case["dtype"]])
    return {**case, "max_abs_error": err, "reference_in_dtype_error": base_err, "limit": limit, "ok": err <= limit}


def _speed_case(case: dict, torch) -> dict:
    import torch.nn.functional as F
    from triton.testing import do_bench

    from llmtrt.plugins.gqa_attention import kernel as attention

    q, k, v, mask, pk, pv, hq, hkv, scale = _inputs({**case, "kernel": "gqa_attention"}, torch)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    causal = case["phase"] == "prefill" and case["past"] == 0

    def sdpa():
        key, value = torch.cat((pk, k), 2), torch.cat((pv, v), 2)
        if causal:
            return F.scaled_dot_product_attention(q, key, value, is_causal=True, scale=scale, enable_gqa=True)
        return F.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scale, enable_gqa=True)

    timings = {
        "triton_mask_ms": do_bench(lambda: attention.gqa_attention(q, k, v, mask, pk, pv, hq, hkv, scale, num_sms=sms)),
        "triton_causal_ms": do_bench(lambda: attention.gqa_attention(q, k, v, None, pk, pv, hq, hkv, scale,
                                                                     num_sms=sms)),
        "sdpa_ms": do_bench(sdpa),
    }
    launch = attention.attention_launch(case["batch"], hq, hkv, case["seq"], case["past"] + case["seq"],
                                        case["head_dim"], num_sms=sms)
    return {**case, **timings, "num_splits": launch.num_splits,
            "speedup_vs_sdpa": timings["sdpa_ms"] / min(timings["triton_mask_ms"], timings["triton_causal_ms"])}


def _table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)
    widths = [max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in cols]
    lines = [" | ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(fmt(r.get(c, "")).ljust(w) for c, w in zip(cols, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few cases per kernel")
    parser.add_argument("--out", type=Path, default=Path("out/gpu_sweep.json"), help="JSON results file")
    parser.add_argument("--no-speed", action="store_true", help="skip the SDPA timing")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch

    if not torch.cuda.is_available():
        print("gpu_sweep: no CUDA device; run this on a GPU machine", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    results = []
    for case in sweep_grid(args.quick):
        try:
            results.append(_run_case(case, torch))
        except Exception as exc:  # a kernel that fails to compile/launch is a result, not a crash
            results.append({**case, "error": f"{type(exc).__name__}: {exc}"[:300], "ok": False})
        torch.cuda.empty_cache()
    speed = [] if args.no_speed else [_speed_case(c, torch) for c in speed_grid()]
    device = torch.cuda.get_device_name(0)
    cols = ["kernel", "dtype", "batch", "seq", "past", "q_heads", "kv_heads", "head_dim", "hidden", "mask",
            "max_abs_error", "reference_in_dtype_error", "ok", "error"]
    print(f"device: {device}\n")
    print(_table(results, cols))
    if speed:
        print("\nattention speed (ms, triton.testing.do_bench median):")
        print(_table(speed, ["phase", "dtype", "batch", "seq", "past", "num_splits", "triton_mask_ms",
                             "triton_causal_ms", "sdpa_ms", "speedup_vs_sdpa"]))
    failed = [r for r in results if not r.get("ok")]
    report = {"device": device, "torch": torch.__version__, "seconds": round(time.perf_counter() - t0, 1),
              "cases": len(results), "failed": len(failed), "accuracy": results, "speed": speed}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".partial")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"\n{len(results) - len(failed)}/{len(results)} accuracy cases OK; JSON: {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
