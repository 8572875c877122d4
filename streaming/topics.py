"""Topic creation through the Kafka admin API (works against Tansu and real Kafka)."""
from __future__ import annotations

import logging
import time

from kafka import KafkaAdminClient, KafkaConsumer
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from streaming.config import KafkaConfig

log = logging.getLogger(__name__)


def ensure_topics(cfg: KafkaConfig, bootstrap: str, timeout_s: float = 30.0) -> None:
    """Create the project's topics if missing; existing ones are left as they are."""
    wanted = {
        cfg.interactions_topic: cfg.interaction_partitions,
        cfg.items_topic: 1,  # one partition keeps announcements in arrival order
        cfg.dead_letter_topic: 1,
    }
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="coldstream-admin")
            break
        except KafkaError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    try:
        existing = set(admin.list_topics())
        missing = [NewTopic(t, n, 1) for t, n in wanted.items() if t not in existing]
        if missing:
            try:
                admin.create_topics(missing)
            except TopicAlreadyExistsError:
                pass
            log.info("created topics %s", [t.name for t in missing])
    finally:
        admin.close()


def partition_count(bootstrap: str, topic: str, timeout_s: float = 30.0) -> int | None:
    """The topic's real number of partitions, from the broker's metadata; None if it does not exist."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, client_id="coldstream-metadata", request_timeout_ms=int(timeout_s * 1000))
    try:
        parts = consumer.partitions_for_topic(topic)
        return len(parts) if parts else None
    finally:
        consumer.close()
