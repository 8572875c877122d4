"""PNG plots of what people would rather see than read: loss and recall over time, the
embedding-stability curve behind M, and the cold-to-warm transition."""
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


def maturity_curve(index_dir: Path, out: Path) -> Path | None:
    """Median drift per training update against interaction count, and the M it gives (MEMER Fig. 1),
    from the newest published version."""
    latest = index_dir / "LATEST"
    if not latest.exists():
        return None
    manifest = json.loads((index_dir / latest.read_text().strip() / "manifest.json").read_text())
    m = manifest.get("maturity", {})
    points = m.get("curve", [])
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([max(p["from_count"], 0.5) for p in points], [p["median_drift"] for p in points], "o-", label="median drift per update")
    ax.axhline(m["epsilon"], color="grey", ls=":", label=f"epsilon {m['epsilon']}")
    ax.axvline(max(m["threshold"], 0.5), color="k", ls="--", label=f"M = {m['threshold']}" + ("" if m.get("measured") else " (configured)"))
    ax.set(xscale="log", yscale="log", xlabel="interactions (bin start)", ylabel="1 - cosine per update, version to version",
           title=f"embedding stability, index v{manifest.get('version')}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def transition(result: dict, out: Path) -> Path:
    """Recall@20 per group of items by training interactions, with and without the MEMER mapping."""
    bins = result["bins"]
    fig, ax = plt.subplots(figsize=(7, 4))
    x = list(range(len(bins)))
    for name, style in (("with_mapping", "o-"), ("without_mapping", "s--")):
        ax.plot(x, [b[name] for b in bins], style, label=name.replace("_", " "))
    ax.set_xticks(x, [b["bin"] for b in bins])
    ax.set(xlabel=f"interactions in training (maturity threshold M = {result['maturity']})", ylabel="recall@20 within the group",
           title="cold-to-warm transition")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def validation_curve(validation: dict, out: Path) -> Path:
    """Validation recall@20 per published version (the learning curve), with the version evaluated marked."""
    h = validation["history"]
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [q["step"] for q in h]
    for key, style in (("cold", "o-"), ("warm", "s-"), ("score", "k--")):
        ax.plot(steps, [q[key] for q in h], style, label="mean (selection)" if key == "score" else f"{key} (pseudo-cold items)" if key == "cold" else "warm (held rows)")
    ax.axvline(validation["chosen_step"], color="grey", lw=1)
    ax.set(title=f"validation recall@20 per version (v{validation['chosen_version']} evaluated)", xlabel="step", ylabel="recall@20")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
