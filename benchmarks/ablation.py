"""Goal: show what each cold-start part adds. Runs `launch.py eval` for the seed model (every part
off), each part alone on top of it, everything on, and the shipped defaults, per seed, and prints one JSON line with the
cold / warm / all Recall@20 and NDCG@20 of each (means over seeds), next to the best learned
baselines of the same runs (ALS on warm and all, content->ALS on cold). Writes docs/ablation.png.

  python benchmarks/ablation.py --movielens --seeds 0 1 2 --minutes 10
  python benchmarks/ablation.py --movielens --seeds 0 --minutes 4 --only seed all
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OFF = ["model.user_tower=id", "model.interest_intensity=false", "model.orthogonality_weight=0", "model.popularity_gate=false",
       "model.loss=symmetric", "model.clcrec_weight=0", "model.alignment_weight=0", "model.infer_missing=false", "optim.lr_schedule=constant",
       "model.skip_negatives=0", "model.cold_regression=false"]
PARTS = {  # each part's settings on top of OFF
    "attention_tower": ["model.user_tower=attention"],
    "interest_intensity": ["model.user_tower=attention", "model.interest_intensity=true", "model.orthogonality_weight=1"],
    "popularity_gate": ["model.popularity_gate=true"],
    "user_to_item": ["model.loss=softmax"],
    "bpr": ["model.loss=bpr"],
    "clcrec": ["model.clcrec_weight=0.2"],
    "alignment": ["model.alignment_weight=0.2"],
    "cierec": ["model.infer_missing=true"],
    "lr_schedule": ["optim.lr_schedule=cosine"],
    "skip_negatives": ["model.skip_negatives=0.25"],
    "cold_regression": ["model.cold_regression=true"],
}
VARIANTS = {"seed": []} | PARTS | {"all": sorted({s for p, sets in PARTS.items() if p != "bpr" for s in sets}), "defaults": None}


def run(name: str, seed: int, minutes: float, data_args: list[str]) -> dict:
    sets = [] if VARIANTS[name] is None else [a for s in OFF + VARIANTS[name] for a in ("--set", s)]  # None: the config's defaults
    cmd = [sys.executable, str(ROOT / "launch.py"), "eval", *data_args, "--seed", str(seed), "--minutes", str(minutes),
           "--run-name", f"ablation-{name}-seed{seed}", *sets]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        sys.exit(f"{name} seed {seed} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def plot(table: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(table["variants"])  # "defaults" is what the configuration ships with
    fig, ax = plt.subplots(figsize=(11, 4))
    for j, s in enumerate(("cold", "warm", "all")):
        ax.bar(np.arange(len(names)) + (j - 1) * 0.27, [table["variants"][n][s]["recall@20"] for n in names], 0.27, label=s)
        ax.axhline(table["baselines"][s], ls=":", color=f"C{j}", lw=1)
    ax.set_xticks(np.arange(len(names)), names, rotation=30, ha="right")
    ax.set(ylabel="recall@20", title=f"ablation: each part alone on the seed model (seeds {table['seeds']}, {table['minutes_per_run']} min); "
           "dotted: best learned baseline")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--only", nargs="+", choices=list(VARIANTS), help="run these variants only")
    ap.add_argument("--plot", default=str(ROOT / "docs" / "ablation.png"))
    args, data_args = ap.parse_known_args()
    names = args.only or list(VARIANTS)
    runs: dict[str, list[dict]] = {}
    for name in names:
        for seed in args.seeds:
            r = run(name, seed, args.minutes, data_args)
            runs.setdefault(name, []).append(r)
            print(f"{name} seed {seed}: cold {r['cold']['recall@20']:.4f} warm {r['warm']['recall@20']:.4f} "
                  f"all {r['all']['recall@20']:.4f}", file=sys.stderr, flush=True)

    def mean(values) -> float:
        values = list(values)
        return round(sum(values) / len(values), 4)

    every = [r for rs in runs.values() for r in rs]
    table = {"goal": "ablation", "seeds": args.seeds, "minutes_per_run": args.minutes, "variants": {}, "baselines": {
        "cold": mean(r["baselines"]["content_to_als"]["cold"]["recall@20"] for r in every),
        "warm": mean(r["baselines"]["als"]["warm"]["recall@20"] for r in every),
        "all": mean(r["baselines"]["als"]["all"]["recall@20"] for r in every)}, "settings": {n: VARIANTS[n] for n in names}}
    for name, rs in runs.items():
        table["variants"][name] = {s: {m: mean(r[s][m] for r in rs) for m in ("recall@20", "ndcg@20")} for s in ("cold", "warm", "all")}
        withheld = [r["cold_images_withheld"]["images_withheld"]["recall@20"] for r in rs if "cold_images_withheld" in r]
        if withheld:
            table["variants"][name]["cold_images_withheld"] = {"recall@20": mean(withheld)}
    plot(table, Path(args.plot))
    print(json.dumps(table))


if __name__ == "__main__":
    main()
