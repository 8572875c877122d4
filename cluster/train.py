"""`launch.py train`: the production entry. Trains from the configured Kafka cluster; with none
configured, from a local broker fed by the synthetic world (so it runs anywhere)."""
from __future__ import annotations

from cluster.config import Config
from cluster.ray_job import run_training
from cluster.services import WorldProducer, broker_for


def train(cfg: Config) -> dict:
    """Trains from the configured broker; with none configured, a local broker fed by the synthetic world."""
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    with broker_for(cfg) as bootstrap:
        producer = None
        if not cfg.kafka.bootstrap_servers:
            producer = WorldProducer(cfg, bootstrap)
            producer.start()
            producer.initial_done.wait()
        try:
            return run_training(cfg, bootstrap)
        finally:
            if producer:
                producer.stop()
