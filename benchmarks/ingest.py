"""Goal: the consumer pipeline (validation + dead letters + offset tracking) keeps up with
a bare kafka-python loop over the same topic. Prints one JSON line with both rates."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kafka import KafkaConsumer, TopicPartition  # noqa: E402

from cluster.broker import LocalBroker  # noqa: E402
from streaming.config import KafkaConfig  # noqa: E402
from streaming.consumer import InteractionStream  # noqa: E402
from streaming.producer import EventProducer  # noqa: E402
from streaming.schema import Interaction  # noqa: E402
from streaming.topics import ensure_topics  # noqa: E402


def bare_loop(bootstrap: str, cfg: KafkaConfig, n: int) -> float:
    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False, max_poll_records=cfg.max_poll_records, fetch_max_wait_ms=100)
    c.assign([TopicPartition(cfg.interactions_topic, p) for p in range(cfg.interaction_partitions)])
    c.seek_to_beginning()
    got, t0 = 0, time.perf_counter()
    while got < n:
        for records in c.poll(timeout_ms=200).values():
            for r in records:
                json.loads(r.value)
                got += 1
    dt = time.perf_counter() - t0
    c.close()
    return got / dt


def pipeline(bootstrap: str, cfg: KafkaConfig, n: int) -> float:
    s = InteractionStream(cfg, bootstrap, list(range(cfg.interaction_partitions)))
    got, t0 = 0, time.perf_counter()
    while s.stats.consumed < n:
        got += len(s.poll())
    dt = time.perf_counter() - t0
    s.close()
    return s.stats.consumed / dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=200_000)
    args = ap.parse_args()
    cfg = KafkaConfig()
    with LocalBroker() as broker:
        ensure_topics(cfg, broker.bootstrap)
        prod = EventProducer(cfg, broker.bootstrap)
        for i in range(args.events):
            prod.interaction(Interaction(i % 5000, i % 20000, "play", float(i)))
        prod.close()
        bare = bare_loop(broker.bootstrap, cfg, args.events)
        ours = pipeline(broker.bootstrap, cfg, args.events)
    print(json.dumps({"goal": "ingest", "events": args.events, "pipeline_events_per_s": round(ours),
                      "baseline": "bare kafka-python poll + json.loads", "baseline_events_per_s": round(bare),
                      "ratio": round(ours / bare, 3)}))


if __name__ == "__main__":
    main()
