"""Scaling figures: what the catalogue's size and the worker count cost.

- Against catalogue size (10k, 100k, 1M, 10M items): the sharded embedding step (the project's
  managed-collision tables, row-wise over 2 gloo ranks, fused RowWiseAdagrad, batch 4,096 per rank) in examples/s,
  and publication (`benchmarks/publish.py`'s full base and 10k-item delta, real publisher and
  reader) in seconds.
- Against workers (1, 2): the whole demo loop (`benchmarks/pipeline.py`'s run of `launch.py demo`)
  in examples/s, read from the demo summaries given (run the demo with `--workers 1` for the first).

Prints one JSON line and writes `docs/scaling.png`.

  python benchmarks/scaling.py [--items 10000 100000 1000000 10000000] [--demo-summaries runs/w1/summary.json runs/bench-pipeline/summary.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from cluster.broker import free_port  # noqa: E402
from trainer.config import ModelConfig  # noqa: E402

BATCH, STEPS, USERS = 4096, 30, 100_000


def _rank(rank: int, world: int, port: int, items: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from embeddings.tables import eviction_interval, rounded_rows, shard_sparse_arch
    from train_step import _time_ms

    from trainer.batch import _kjt

    rng = np.random.default_rng(rank)
    empty = np.zeros(0, np.int64)
    kjt = _kjt(BATCH, rng.integers(0, USERS, BATCH), rng.integers(0, items, BATCH), empty, empty)  # keys, as the worker sends them
    sparse = shard_sparse_arch(ModelConfig(user_rows=USERS, item_rows=items), torch.device("cpu"), 0.05)

    def step():
        emb = sparse(kjt)
        (emb["user_id"] * emb["item_id"]).sum().backward()

    # at least two eviction checks in the timed window: a check re-sorts the shard, and is amortised
    # over `eviction_interval` steps on large tables (embeddings/tables.py)
    steps = max(STEPS, 2 * eviction_interval(rounded_rows(items), world))
    out[rank] = _time_ms(step, steps, torch.device("cpu"))
    dist.destroy_process_group()


def sparse_examples_per_s(items: int, world: int = 2) -> float:
    out = mp.Manager().dict()
    mp.spawn(_rank, args=(world, free_port(), items, out), nprocs=world, join=True)
    return BATCH * world / max(out.values()) * 1000


def publish_s(items: int) -> dict:
    from publish import run, unit

    with tempfile.TemporaryDirectory(prefix="coldstream-scaling-", dir=ROOT / "runs" if (ROOT / "runs").exists() else None) as d:
        got = run(items, 64, 10_000, Path(d), (np.arange(1000, dtype=np.int64), unit(1000, 64, 7)), diff=False)
    return {"full_s": round(got["full_s"], 3), "delta_s": round(got["delta_s"], 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--items", type=int, nargs="+", default=[10_000, 100_000, 1_000_000, 10_000_000])
    p.add_argument("--demo-summaries", nargs="*", default=[], help="summary.json of demo runs with 1, 2, ... workers")
    args = p.parse_args()
    by_items = []
    for n in args.items:
        started = time.perf_counter()
        row = {"items": n, "sparse_step_examples_per_s": round(sparse_examples_per_s(n)), **publish_s(n)}
        row["wall_s"] = round(time.perf_counter() - started, 1)
        by_items.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    by_workers = []
    for path in args.demo_summaries:
        s = json.loads(Path(path).read_text())
        by_workers.append({"workers": s.get("workers"), "examples_per_s": s["examples_per_s"], "step_examples_per_s": s["step_examples_per_s"],
                           "summary": path})
    plot(by_items, by_workers, ROOT / "docs" / "scaling.png")
    print(json.dumps({"benchmark": "scaling", "by_items": by_items, "by_workers": by_workers, "plot": "docs/scaling.png"}), flush=True)


def plot(by_items: list[dict], by_workers: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if by_workers else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.6))
    n = [r["items"] for r in by_items]
    axes[0].plot(n, [r["sparse_step_examples_per_s"] for r in by_items], "o-")
    axes[0].set(xscale="log", xlabel="items in the table", ylabel="examples/s", title="embedding step, 2 gloo ranks", ylim=(0, None))
    axes[1].plot(n, [r["full_s"] for r in by_items], "o-", label="full base")
    axes[1].plot(n, [r["delta_s"] for r in by_items], "s-", label="10k-item delta")
    axes[1].set(xscale="log", yscale="log", xlabel="items in the index", ylabel="seconds (publish + swap)", title="publication")
    axes[1].legend()
    if by_workers:
        w = [r["workers"] for r in by_workers]
        axes[2].bar([str(x) for x in w], [r["examples_per_s"] for r in by_workers])
        axes[2].set(xlabel="Ray workers", ylabel="examples/s over the loop", title="demo, 2-core machine")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
