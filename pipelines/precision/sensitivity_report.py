"""The sensitivity table (sensitivity.md, sensitivity.json) and its bar plot (sensitivity.png, with
matplotlib: ``pip install 'llmtrt[plot]'``), as bytes for the artifact directory."""

from __future__ import annotations

import io
import json
from typing import Any


def table(rows: list[dict[str, Any]], target: str, windows: str) -> str:
    lines = [f"# Layer sensitivity to {target}", "",
             f"Each group of linears alone at {target}, every other linear fp32; {windows}. Ranked by mean "
             "KL(p_fp32 || p) of the final logits, most sensitive first.", "",
             "| rank | group | linears | mean KL | perplexity increase | top-1 agreement |",
             "|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['rank']} | {r['group']} | {len(r['linears'])} | {r['mean_kl']:.3e} | "
                     f"{100 * r['ppl_increase']:+.3f}% | {r['top1_agreement']:.4f} |")
    return "\n".join(lines) + "\n"


def files(rows: list[dict[str, Any]], target: str, windows: str) -> dict[str, bytes]:
    out = {"sensitivity.md": table(rows, target, windows).encode(),
           "sensitivity.json": json.dumps({"target": target, "windows": windows, "groups": rows}, indent=2).encode()}
    png = plot(rows, target)
    if png is not None:
        out["sensitivity.png"] = png
    return out


def plot(rows: list[dict[str, Any]], target: str) -> bytes | None:
    """Horizontal bars of mean KL per group, most sensitive on top; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = [r["group"].removeprefix("model.") for r in rows][::-1]
    kl = [r["mean_kl"] for r in rows][::-1]
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.28 * len(rows) + 1)))
    try:
        ax.barh(names, kl, color="tab:blue")
        ax.set_xscale("log" if min(kl, default=0) > 0 else "linear")
        ax.set_xlabel(f"mean KL from fp32 with the group alone at {target} (nats per token)")
        ax.tick_params(axis="y", labelsize=7)
        ax.set_title(f"layer sensitivity to {target} (most sensitive on top)")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        return buf.getvalue()
    finally:
        plt.close(fig)
