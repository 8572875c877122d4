"""Goal: publication near the FAISS floor, and a delta that costs what changed.

With the real `IndexPublisher` and `IndexReader` (write, fsync, checksums, rename, LATEST,
read back, verify, swap), on unit random vectors:
- full_s: a whole base of N items published and swapped in by a reader;
- delta_s: a 10k-item delta at N items (half new vectors for known items, half new items,
  plus 100 removals) through `publish_delta`, and swapped in by the same reader;
- delta_diff_s: the same delta through `publish`, which is handed the whole catalogue and
  finds the change by diffing it against the last version (what the trainer calls);
- delta_s_10m: the delta of delta_s at 10x the items;
- floor_s, measured in the same run: a flat index add + write + fsync + read back of N items,
  which is what any full publication must at least do.
Goals on the 2-core machine: full_s <= 3 s (2.5x the floor), delta_s <= 1 s, delta_s_10m <= 1 s.
Each swap is checked: the new items are found and the removed ones are not.

  python benchmarks/publish.py [--items 1000000] [--dim 64] [--delta 10000] [--big 10000000]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from embeddings.publish import IndexPublisher  # noqa: E402
from embeddings.reader import IndexReader  # noqa: E402


def unit(n: int, dim: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v


def floor_s(vecs: np.ndarray, where: Path) -> float:
    started = time.perf_counter()
    index = faiss.IndexFlatIP(vecs.shape[1])
    index.add(vecs)
    path = where / "floor.faiss"
    faiss.write_index(index, str(path))
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    faiss.read_index(str(path))
    took = time.perf_counter() - started
    path.unlink()
    return took


def a_delta(n: int, size: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    changed = rng.choice(n, size // 2, replace=False)
    upserts = np.concatenate([changed, np.arange(n, n + size - size // 2)]).astype(np.int64)
    removed = np.setdiff1d(rng.choice(n, 100, replace=False), changed).astype(np.int64)
    return upserts, unit(len(upserts), dim, seed + 1), removed


def check(reader: IndexReader, upserts: np.ndarray, vecs: np.ndarray, removed: np.ndarray) -> None:
    _, top = reader.search(vecs[-3:], 1)
    assert top[:, 0].tolist() == upserts[-3:].tolist(), (top, upserts[-3:])
    assert not reader.current.index.contains(removed).any()


def run(n: int, dim: int, delta: int, root: Path, users: tuple[np.ndarray, np.ndarray], diff: bool) -> dict:
    ids, vecs = np.arange(n, dtype=np.int64), unit(n, dim, 0)
    pub, reader = IndexPublisher(root, keep=2), IndexReader(root, use_gpu=False)
    started = time.perf_counter()
    pub.publish(ids, vecs, *users, {"step": 1})
    assert reader.refresh()
    out = {"full_s": time.perf_counter() - started}

    upserts, new_vecs, removed = a_delta(n, delta, dim, 1)
    started = time.perf_counter()
    pub.publish_delta(upserts, new_vecs, removed, *users, {"step": 2})
    assert reader.refresh()
    out["delta_s"] = time.perf_counter() - started
    check(reader, upserts, new_vecs, removed)

    if diff:  # the trainer's call: the whole catalogue, the change found by a diff
        pub.publish(ids, vecs, *users, {"step": 3})  # the first catalogue again: the diff undoes the last delta
        assert reader.refresh()
        upserts, new_vecs, removed = a_delta(n, delta, dim, 2)
        known = upserts < n
        vecs[upserts[known]] = new_vecs[known]
        keep = np.ones(n, bool)
        keep[removed] = False
        all_ids = np.concatenate([ids[keep], upserts[~known]])
        all_vecs = np.concatenate([vecs[keep], new_vecs[~known]])
        started = time.perf_counter()
        got = pub.publish(all_ids, all_vecs, *users, {"step": 4})
        assert reader.refresh() and got.manifest.get("base"), "expected a delta segment"
        out["delta_diff_s"] = time.perf_counter() - started
        check(reader, upserts, new_vecs, removed)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--delta", type=int, default=10_000)
    p.add_argument("--big", type=int, default=10_000_000, help="catalogue size of delta_s_10m (0: skip)")
    p.add_argument("--users", type=int, default=10_000)
    args = p.parse_args()
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    users = (np.arange(args.users, dtype=np.int64), unit(args.users, args.dim, 7))
    with tempfile.TemporaryDirectory(prefix="coldstream-publish-", dir=ROOT / "runs" if (ROOT / "runs").exists() else None) as d:
        d = Path(d)
        floor = min(floor_s(unit(args.items, args.dim, 0), d) for _ in range(3))
        small = run(args.items, args.dim, args.delta, d / "small", users, diff=True)
        big = run(args.big, args.dim, args.delta, d / "big", users, diff=False) if args.big else {}
    out = {
        "items": args.items, "dim": args.dim, "delta_items": args.delta, "users": args.users,
        "full_s": round(small["full_s"], 3), "delta_s": round(small["delta_s"], 3), "delta_diff_s": round(small["delta_diff_s"], 3),
        "floor_s": round(floor, 3), "full_over_floor": round(small["full_s"] / floor, 2),
        "delta_s_10m": round(big["delta_s"], 3) if big else None, "full_s_10m": round(big["full_s"], 3) if big else None,
        "big_items": args.big,
        "goals": {"full_s": 3.0, "delta_s": 1.0, "delta_s_10m": 1.0},
    }
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
