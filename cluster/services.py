"""The run's services: a broker (local Tansu or an existing cluster) with its topics,
and the synthetic world's producer running beside training."""
from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path
from typing import Iterator

from cluster.broker import LocalBroker
from cluster.config import Config
from streaming.producer import EventProducer
from streaming.synthetic import World, run_world
from streaming.topics import ensure_topics

log = logging.getLogger(__name__)


def local_broker(cfg: Config) -> LocalBroker:
    """The run's own broker: its log under the run directory (unless kafka.local_storage=memory)."""
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    data_dir = cfg.run_dir / "broker" if cfg.kafka.local_storage == "s3" else None
    return LocalBroker(cfg.kafka.local_port, cfg.run_dir / "broker.log", data_dir)


@contextlib.contextmanager
def broker_for(cfg: Config) -> Iterator[str]:
    """Yields bootstrap servers: the configured cluster, or a local Tansu started (and stopped)
    here and restarted on the same address if it dies while the run goes on."""
    if cfg.kafka.bootstrap_servers:
        ensure_topics(cfg.kafka, cfg.kafka.bootstrap_servers)
        yield cfg.kafka.bootstrap_servers
        return
    with local_broker(cfg) as broker:
        ensure_topics(cfg.kafka, broker.bootstrap)
        broker.supervise()
        yield broker.bootstrap


class WorldProducer(threading.Thread):
    """Runs the synthetic world against Kafka in the background (new items keep arriving)."""

    def __init__(self, cfg: Config, bootstrap: str, realtime: bool = True):
        super().__init__(daemon=True, name="world-producer")
        self.world = World.create(cfg.world)
        self.shard_dir = cfg.location("shards")
        self.producer = EventProducer(cfg.kafka, bootstrap)
        self.realtime = realtime
        self.stopping = threading.Event()
        self.initial_done = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        p = self.producer
        try:
            for line in run_world(self.world, self.shard_dir, p.sink(), self.realtime, self.stopping.is_set):
                log.info("producer: %s", line)
                self.initial_done.set()
        except BaseException as exc:  # surfaced by the caller; never silently lost
            self.error = exc
            log.exception("producer failed")
        finally:
            self.initial_done.set()
            p.close()

    def stop(self) -> None:
        self.stopping.set()
        self.join(30)


def write_truth(world: World, path: Path, seed: int) -> dict[int, list[int]]:
    import json

    truth = world.eval_truth(seed)
    path.write_text(json.dumps({"cold_items": sorted(world.cold_items), "positives": truth}))
    return truth
