"""Goal: freshness, measured per event. One live `train` (2 Ray workers, local broker) on a
world whose new items and their events keep arriving, publishing every few seconds.

Each version's manifest holds, for the events it trains for the first time, the seconds from
the broker's timestamp to the version (p50 / p95), and the same from an item's announcement
to the first version that serves it. This prints one JSON line with the medians over the
steady versions (the first, which waits for Ray to start, is left out), next to:
  - the floor this cadence allows, measured in the same run: half the publication interval
    plus the median time a publication takes (an event waits for the next version, then for
    that version to be written);
  - Ekko (OSDI'22): model updates reach serving in 2.4 s.

  python benchmarks/freshness.py [--duration-s 100] [--publish-every-s 5]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.chaos import Manifests  # noqa: E402
from cluster.config import load_config  # noqa: E402
from cluster.train import train  # noqa: E402
from cluster.logs import setup_logging  # noqa: E402

EKKO_S = 2.4


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--duration-s", type=float, default=100.0)
    p.add_argument("--publish-every-s", type=float, default=5.0)
    args = p.parse_args()
    setup_logging()
    items = int(args.duration_s / 0.25)  # new items keep coming for the whole run
    cfg = load_config(None, [f"world.new_items={items}", "world.new_item_interval_s=0.25", "world.events_per_new_item=40",
                             f"train.publish_every_s={args.publish_every_s}", "train.publish_every_steps=100000",
                             "kafka.local_storage=memory"],
                      **{"run_name": "freshness", "train.duration_s": args.duration_s})
    import shutil

    shutil.rmtree(cfg.run_dir, ignore_errors=True)
    watcher = Manifests(cfg.run_dir / "index")
    watcher.start()
    final = train(cfg)
    watcher.stop.set()
    watcher.join()
    manifests = [m for _, m in sorted(watcher.seen.values(), key=lambda x: x[1]["version"])]
    steady = manifests[1:]

    def median(kind: str, q: str) -> float | None:
        values = [m["freshness"][kind][q] for m in steady if m.get("freshness", {}).get(kind, {}).get("n")]
        return round(float(np.median(values)), 3) if values else None

    publish_s = float(np.median([m["publish_s"] for m in steady])) if steady else float("nan")
    interval = float(np.median(np.diff([m["wall_time"] for m in steady]))) if len(steady) > 1 else float("nan")
    print(json.dumps({
        "benchmark": "freshness", "versions": len(manifests), "steady_versions": len(steady),
        "event_to_version_p50_s": median("event_to_version_s", "p50"), "event_to_version_p95_s": median("event_to_version_s", "p95"),
        "announce_to_servable_p50_s": median("announce_to_servable_s", "p50"),
        "announce_to_servable_p95_s": median("announce_to_servable_s", "p95"),
        "publish_interval_s": round(interval, 2), "publish_s": round(publish_s, 3),
        "floor_p50_s": round(interval / 2 + publish_s, 3), "ekko_s": EKKO_S,
        "train_steps": final.get("train_steps"), "events_consumed": final.get("events_consumed"),
    }), flush=True)


if __name__ == "__main__":
    main()
