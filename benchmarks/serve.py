"""Goal: a brand-new item is embedded and servable in under 1 s (p95), over HTTP.

Starts `launch.py serve` on a published index (the demo's by default), then posts new items
one at a time, each with a real poster when MovieLens is at hand (else a generated frame),
a title and tags, and asks /similar for each right after. Prints one JSON line: client-side
p50 / p95 of POST /items and of /recommend, and the floor measured in the same run: the
published mapping embedding the same items in-process, without HTTP.

  python benchmarks/serve.py [--index runs/demo/index] [--items 200]
"""
from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import requests
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cluster.broker import free_port  # noqa: E402
from embeddings.mapping import EarlyStageMapper  # noqa: E402

POSTERS = ROOT.parent / "shared" / "datasets" / "movielens-100k" / "posters"


def images(n: int) -> list[bytes]:
    found = sorted(POSTERS.glob("*.jpg"))[:n] if POSTERS.exists() else []
    out = [p.read_bytes() for p in found]
    rng = np.random.default_rng(0)
    while len(out) < n:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def pct(values: list[float]) -> dict:
    p50, p95 = np.percentile(values, [50, 95])
    return {"p50_ms": round(float(p50), 2), "p95_ms": round(float(p95), 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--index", default=str(ROOT / "runs" / "demo" / "index"))
    p.add_argument("--items", type=int, default=200)
    args = p.parse_args()
    index = Path(args.index)
    if not (index / "LATEST").exists():
        raise SystemExit(f"no published index at {index}: run launch.py demo first, or pass --index")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "launch.py", "serve", "--index", str(index), "--port", str(port)], cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                health = requests.get(f"{url}/healthz", timeout=1)
                if health.status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("the service did not come up")
            time.sleep(0.2)
        version = health.json()["version"]
        user = requests.get(f"{url}/recommend", params={"user_id": 0, "k": 1})
        pics = images(args.items)
        post_ms, server_ms, similar_ok, rec_ms = [], [], 0, []
        for n, data in enumerate(pics):
            item_id = 10_000_000 + n
            t0 = time.perf_counter()
            r = requests.post(f"{url}/items", data={"item_id": item_id, "title": f"new item {n}", "tags": "Drama|Comedy"},
                              files=[("image", (f"{n}.jpg", data, "image/jpeg"))])
            post_ms.append((time.perf_counter() - t0) * 1000)
            r.raise_for_status()
            server_ms.append(r.json()["latency_ms"])
            similar_ok += requests.get(f"{url}/similar", params={"item_id": item_id, "k": 10}).status_code == 200
            if user.status_code == 200:
                t0 = time.perf_counter()
                requests.get(f"{url}/recommend", params={"user_id": 0, "k": 20}).raise_for_status()
                rec_ms.append((time.perf_counter() - t0) * 1000)
    finally:
        proc.terminate()
        proc.wait(10)
    mapper = EarlyStageMapper.load(index / (index / "LATEST").read_text().strip())
    floor = []
    for n, data in enumerate(pics):
        t0 = time.perf_counter()
        mapper.embed([data], f"new item {n}", ["Drama", "Comedy"])
        floor.append((time.perf_counter() - t0) * 1000)
    print(json.dumps({"benchmark": "serve", "index_version": version, "items_posted": len(pics), "servable_at_once": similar_ok,
                      "post_items": pct(post_ms), "post_items_server": pct(server_ms),
                      "recommend": pct(rec_ms) if rec_ms else None, "floor_embed_in_process": pct(floor),
                      "goal_p95_ms": 1000}), flush=True)


if __name__ == "__main__":
    main()
