"""Producing events and announcements; interactions are keyed by user so that one
user's history stays in one partition, in order."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from kafka import KafkaProducer

from streaming.config import KafkaConfig
from streaming.schema import Interaction, ItemAnnouncement


@dataclass
class Sink:
    """Where generated or replayed events go: Kafka through `EventProducer.sink()`, or memory in tests."""

    interaction: Callable[[Interaction], None]
    raw_interaction: Callable[[int, bytes], None]
    announce: Callable[[ItemAnnouncement], None]
    flush: Callable[[], None] = lambda: None


class EventProducer:
    def __init__(self, cfg: KafkaConfig, bootstrap: str):
        self.cfg = cfg
        self._producer = KafkaProducer(
            bootstrap_servers=bootstrap, acks="all", linger_ms=5, batch_size=256 * 1024, client_id="coldstream-producer"
        )
        self.sent = 0

    def interaction(self, event: Interaction) -> None:
        self.raw_interaction(event.user_id, event.encode())

    def raw_interaction(self, key: int | str | bytes, payload: bytes) -> None:
        """Sends bytes as they are: the replay and the generator's malformed events use it."""
        key_bytes = key if isinstance(key, bytes) else str(key).encode()
        self._producer.send(self.cfg.interactions_topic, key=key_bytes, value=payload)
        self.sent += 1

    def announce(self, item: ItemAnnouncement) -> None:
        self._producer.send(self.cfg.items_topic, key=str(item.item_id).encode(), value=item.encode())

    def flush(self) -> None:
        self._producer.flush()

    def sink(self) -> Sink:
        return Sink(self.interaction, self.raw_interaction, self.announce, self.flush)

    def close(self) -> None:
        self._producer.flush()
        self._producer.close()
