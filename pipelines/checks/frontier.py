"""The accuracy/size frontier of a compare run: perplexity against the bytes of the linear weights, one
point per artifact (uniform precisions and mixes alike), as frontier.json and frontier.png.

Bytes are what each artifact stores for its decoder linears' weights and scales (its manifest's precision
inventory, recomputed from the written graph by quantize and export; the lm_head, fp16 in every int8/int4
artifact, is left out), so a mixed artifact sits where its mix puts it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def points(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """{precision, artifact, weight_bytes, bits_per_weight, perplexity, perplexity_increase} per artifact
    that has a manifest with a precision inventory (sorted by bytes)."""
    from llmtrt.pipelines.artifacts import read_manifest

    out = []
    for name, m in metrics.items():
        try:
            inventory = read_manifest(m.artifact).get("precision_inventory")
        except Exception:  # noqa: BLE001 (a runner that is not an artifact directory: no point)
            continue
        if not inventory:
            continue
        rows = [x for x in inventory["linears"] if x["role"] != "lm_head"]
        nbytes = sum(x["weight_bytes"] for x in rows)
        params = sum(x["in_features"] * x["out_features"] for x in rows)
        out.append({"precision": name, "artifact": m.artifact, "weight_bytes": nbytes,
                    "bits_per_weight": 8 * nbytes / params if params else None, "perplexity": m.perplexity,
                    "perplexity_increase": m.perplexity_increase})
    return sorted(out, key=lambda p: p["weight_bytes"])


def write(metrics: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """frontier.json and (with matplotlib) frontier.png in ``out_dir``; {} when no artifact has an inventory."""
    from llmtrt.exporter.files import atomic_file, write_json_atomically

    pts = points(metrics)
    if not pts:
        return {}
    paths = {"frontier_json": out_dir / "frontier.json"}
    write_json_atomically(paths["frontier_json"], {"points": [
        {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in p.items()} for p in pts]})
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return paths
    fig, ax = plt.subplots(figsize=(7, 4.5))
    try:
        for p in pts:
            mixed = "@" in p["precision"]
            ax.scatter(p["weight_bytes"] / 1e6, p["perplexity"], marker="*" if mixed else "o", s=120 if mixed else 50,
                       color="tab:orange" if mixed else "tab:blue")
            ax.annotate(f"{p['precision']} ({p['bits_per_weight']:.2f} b/w)", (p["weight_bytes"] / 1e6, p["perplexity"]),
                        fontsize=7, xytext=(4, 4), textcoords="offset points")
        ax.set_xlabel("decoder linear weights + scales, MB (lm_head excluded)")
        ax.set_ylabel("perplexity on the evaluation text (lower is better)")
        ax.set_title("accuracy / size frontier (stars: mixed precisions)")
        fig.tight_layout()
        paths["frontier_png"] = out_dir / "frontier.png"
        with atomic_file(paths["frontier_png"], suffix=".png") as tmp:
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)
    return paths
