"""Goal: know what an IVF index costs in recall before a large catalogue uses one.

`publish.index_factory` may name an IVF index (e.g. IVF1024,Flat with `publish.search_params`
nprobe=16). This measures it on real vectors: the items and users of a published version
(by default the demo's), with the real `build_index`. For each nprobe it prints IVF's
recall@20 against the exact (Flat) index, queried with every user vector of the version,
beside build time and search time per query; the Flat figures are the baseline, measured in
the same run. One JSON line.

  python benchmarks/ivf.py [--index runs/demo/index] [--nlist N (default 4 sqrt(items))]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import faiss
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from embeddings.publish import build_index  # noqa: E402
from embeddings.reader import IndexReader  # noqa: E402

K = 20


def timed(fn):
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--index", default=str(ROOT / "runs" / "demo" / "index"), help="a published index directory")
    p.add_argument("--nlist", type=int, default=None)
    args = p.parse_args()
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    reader = IndexReader(args.index, use_gpu=False)
    if not reader.refresh():
        raise SystemExit(f"no published version under {args.index}: run launch.py demo (or eval) first")
    cur = reader.current
    ids = cur.item_ids
    vecs = np.stack([cur.index.reconstruct(int(i)) for i in ids]).astype(np.float32)
    queries = np.ascontiguousarray(cur.user_vectors, np.float32)
    nlist = args.nlist or max(1, int(round(4 * np.sqrt(len(ids)))))
    k = min(K, len(ids))

    flat, flat_build = timed(lambda: build_index(vecs, ids, "Flat"))
    (_, exact), flat_search = timed(lambda: flat.search(queries, k))
    out = {"version": cur.version, "items": int(len(ids)), "queries": int(len(queries)), "dim": int(vecs.shape[1]),
           "baseline": {"factory": "Flat", "build_s": round(flat_build, 4), "search_us_per_query": round(1e6 * flat_search / len(queries), 1),
                        "recall_at_20": 1.0},
           "factory": f"IVF{nlist},Flat", "nprobe": []}
    ivf_index, ivf_build = timed(lambda: build_index(vecs, ids, f"IVF{nlist},Flat"))
    out["build_s"] = round(ivf_build, 4)
    ivf = faiss.extract_index_ivf(ivf_index)
    for nprobe in [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= nlist]:
        ivf.nprobe = nprobe
        (_, got), took = timed(lambda: ivf_index.search(queries, k))
        recall = np.mean([len(set(g.tolist()) & set(e.tolist())) / k for g, e in zip(got, exact)])
        out["nprobe"].append({"nprobe": nprobe, "recall_at_20": round(float(recall), 4),
                              "search_us_per_query": round(1e6 * took / len(queries), 1)})
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
