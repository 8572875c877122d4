"""PNG plots of what people would rather see than read: loss and recall over time."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def training_curves(metrics_jsonl: Path, history: list[dict], out: Path) -> Path:
    rows = [json.loads(l) for l in metrics_jsonl.read_text().splitlines()] if metrics_jsonl.exists() else []
    t0 = min([r["t"] for r in rows] + [h["t"] for h in history] or [0])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot([r["t"] - t0 for r in rows], [r["loss"] for r in rows], marker=".")
    ax1.set(title="training loss (rank 0, mean of last 20 steps)", xlabel="seconds", ylabel="in-batch softmax loss")
    ts = [h["t"] - t0 for h in history]
    for key, style in (("oracle", "k-."), ("model", "o-"), ("popularity", "s--"), ("random", "x:")):
        if history and key in history[0]:
            ax2.plot(ts, [h[key]["recall@20"] for h in history], style, label="true taste (ceiling)" if key == "oracle" else key)
    ax2.set(title="cold-item recall@20 per published index version", xlabel="seconds", ylabel="recall@20")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
