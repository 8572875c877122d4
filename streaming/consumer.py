"""The consumer pipeline: each worker reads its own interaction partitions, validates
every message, and forwards what cannot be used to the dead-letter topic.

Partitions are assigned explicitly (not through a consumer group) because the
checkpoint, not Kafka, owns the offsets: a resumed run seeks each partition to the
offset saved next to the model weights, so weights and data position always match.
"""
from __future__ import annotations

import base64
import json
import logging
from dataclasses import dataclass

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from streaming.config import KafkaConfig
from streaming.schema import (
    Interaction,
    ItemAnnouncement,
    MalformedMessage,
    decode_announcement,
    decode_interaction,
)

log = logging.getLogger(__name__)


def owned_partitions(n_partitions: int, rank: int, world_size: int) -> list[int]:
    """Round-robin split: every partition has exactly one owner."""
    return [p for p in range(n_partitions) if p % world_size == rank]


def _reason(exc: Exception) -> str:
    """A validation failure says what is wrong; anything else is named by its type as well."""
    return str(exc) if isinstance(exc, MalformedMessage) else f"undecodable ({type(exc).__name__}): {exc}"[:500]


@dataclass
class ConsumerStats:
    consumed: int = 0
    malformed: int = 0


class DeadLetters:
    """Forwards unusable messages with the reason, so nothing is silently lost."""

    def __init__(self, cfg: KafkaConfig, bootstrap: str):
        self.topic = cfg.dead_letter_topic
        self._producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", client_id="coldstream-dlq")

    def send(self, source_topic: str, partition: int, offset: int, raw: bytes | None, reason: str) -> None:
        record = {
            "topic": source_topic,
            "partition": partition,
            "offset": offset,
            "reason": reason,
            "value_b64": base64.b64encode(raw or b"").decode(),
        }
        self._producer.send(self.topic, value=json.dumps(record).encode())

    def close(self) -> None:
        self._producer.flush()
        self._producer.close()


def _consumer(bootstrap: str, client_id: str, max_poll_records: int) -> KafkaConsumer:
    return KafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        client_id=client_id,
        max_poll_records=max_poll_records,
        fetch_max_wait_ms=100,
    )


class InteractionStream:
    """Validated interactions from a fixed set of partitions of the interactions topic."""

    def __init__(
        self,
        cfg: KafkaConfig,
        bootstrap: str,
        partitions: list[int],
        max_users: int,
        max_items: int,
        start_offsets: dict[int, int] | None = None,
        client_id: str = "coldstream-worker",
    ):
        self.cfg = cfg
        self.max_users, self.max_items = max_users, max_items
        self.stats = ConsumerStats()
        self._tps = [TopicPartition(cfg.interactions_topic, p) for p in partitions]
        self._consumer = _consumer(bootstrap, client_id, cfg.max_poll_records)
        self._consumer.assign(self._tps)
        start_offsets = start_offsets or {}
        for tp in self._tps:
            if tp.partition in start_offsets:
                self._consumer.seek(tp, start_offsets[tp.partition])
            else:
                self._consumer.seek_to_beginning(tp)
        self._dead = DeadLetters(cfg, bootstrap)

    def poll(self, timeout_ms: int | None = None) -> list[Interaction]:
        batches = self._consumer.poll(timeout_ms=self.cfg.poll_timeout_ms if timeout_ms is None else timeout_ms)
        out: list[Interaction] = []
        for tp, records in batches.items():
            for rec in records:
                self.stats.consumed += 1
                try:
                    out.append(decode_interaction(rec.value, self.max_users, self.max_items))
                except Exception as exc:  # noqa: BLE001 - no record may crash the consumer: all go to the DLQ
                    self.stats.malformed += 1
                    self._dead.send(tp.topic, tp.partition, rec.offset, rec.value, _reason(exc))
        return out

    def positions(self) -> dict[int, int]:
        """Next offset to read per owned partition: what a checkpoint must store."""
        return {tp.partition: self._consumer.position(tp) for tp in self._tps}

    def lag(self) -> int:
        """Messages behind the high-water mark (Tansu's end_offsets is unreliable; highwater is not)."""
        total = 0
        for tp in self._tps:
            hw = self._consumer.highwater(tp)
            if hw is not None:
                total += max(0, hw - self._consumer.position(tp))
        return total

    def close(self) -> None:
        self._dead.close()
        self._consumer.close()


class ItemFeed:
    """Every worker reads every announcement: each needs the content of any item its users touch."""

    def __init__(self, cfg: KafkaConfig, bootstrap: str, max_items: int, client_id: str = "coldstream-items"):
        self.cfg = cfg
        self.max_items = max_items
        self.stats = ConsumerStats()
        self._consumer = _consumer(bootstrap, client_id, cfg.max_poll_records)
        parts = self._consumer.partitions_for_topic(cfg.items_topic) or {0}
        self._consumer.assign([TopicPartition(cfg.items_topic, p) for p in sorted(parts)])
        self._consumer.seek_to_beginning()
        self._dead = DeadLetters(cfg, bootstrap)

    def poll(self, timeout_ms: int = 0) -> list[ItemAnnouncement]:
        out: list[ItemAnnouncement] = []
        for tp, records in self._consumer.poll(timeout_ms=timeout_ms).items():
            for rec in records:
                self.stats.consumed += 1
                try:
                    out.append(decode_announcement(rec.value, self.max_items))
                except Exception as exc:  # noqa: BLE001 - as above
                    self.stats.malformed += 1
                    self._dead.send(tp.topic, tp.partition, rec.offset, rec.value, _reason(exc))
        return out

    def close(self) -> None:
        self._dead.close()
        self._consumer.close()
