"""The consumer pipeline: each worker reads its own interaction partitions, validates
every message, and forwards what cannot be used to the dead-letter topic.

Partitions are assigned explicitly (not through a consumer group) because the
checkpoint, not Kafka, owns the offsets: a resumed run seeks each partition to the
offset saved next to the model weights, so weights and data position always match.
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import time
from dataclasses import dataclass

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from streaming.config import KafkaConfig
from streaming.schema import (
    MAX_MESSAGE_BYTES,
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
    data_loss_incidents: int = 0
    outages: int = 0


class BrokerDataLoss(RuntimeError):
    """The broker no longer has records this consumer had read past: it lost its log."""


class BrokerUnavailable(RuntimeError):
    """No metadata from the broker for longer than kafka.broker_outage_fail_s."""


class BrokerWatch:
    """The three signs of a broker in trouble, checked after every poll of one consumer.

    - A position beyond the high-water mark: impossible while the broker keeps its log (a
      consumer never reads past it). Fetches then return nothing and lag reads 0, so without
      this check a broker restarted without its log stops consumption silently.
    - A changed cluster id: the broker was re-created (its id lives with its data).
    - No metadata for `broker_timeout_s`: the broker is down or unreachable. The consumer keeps
      its positions and carries on when the broker is back; past `broker_outage_fail_s` the
      job stops.
    Each incident is logged once, counted in `stats`, and shown by `down_s` in the status line.
    """

    def __init__(self, consumer: KafkaConsumer, tps: list[TopicPartition], cfg: KafkaConfig, stats: ConsumerStats,
                 cluster_id: str | None = None):
        self._consumer, self._tps, self._cfg, self._stats = consumer, tps, cfg, stats
        self.cluster_id = cluster_id
        self._since = time.monotonic()
        self._down_since: float | None = None

    def _metadata(self):
        return self._consumer._client.cluster  # kafka-python keeps the cluster metadata here; no public accessor

    @property
    def down_s(self) -> float:
        return time.monotonic() - self._down_since if self._down_since is not None else 0.0

    def check(self) -> None:
        self._check_reachable()
        self._check_cluster()
        self._check_positions()

    def _check_reachable(self) -> None:
        last = max(self._metadata()._last_successful_refresh_ms / 1000, self._since)  # kafka-python: monotonic ms
        silent_s = time.monotonic() - last
        if silent_s > self._cfg.broker_timeout_s and self._down_since is None:
            self._down_since = last
            self._stats.outages += 1
            log.error("BROKER DOWN: no metadata from the broker for %.0f s; keeping positions %s and waiting for it "
                      "(the job stops after kafka.broker_outage_fail_s=%.0f s)", silent_s, self._where(),
                      self._cfg.broker_outage_fail_s)
        elif silent_s <= self._cfg.broker_timeout_s and self._down_since is not None:
            log.warning("broker back after %.0f s; consuming again from %s", time.monotonic() - self._down_since, self._where())
            self._down_since = None
        if self._down_since is not None and self.down_s > self._cfg.broker_outage_fail_s:
            raise BrokerUnavailable(f"no metadata from the broker for {self.down_s:.0f} s "
                                    f"(kafka.broker_outage_fail_s={self._cfg.broker_outage_fail_s:.0f}); stopping")

    def _where(self) -> str:
        return ", ".join(f"{tp.topic}[{tp.partition}]@{self._consumer.position(tp, timeout_ms=0)}" for tp in self._tps)

    def _check_cluster(self) -> None:
        seen = self._metadata().cluster_id
        if seen is None or seen == self.cluster_id:
            return
        if self.cluster_id is None:
            self.cluster_id = seen
            return
        before, self.cluster_id = self.cluster_id, seen
        self._lost(f"the cluster id changed from {before} to {seen}: a different or re-created broker", list(self._tps))

    def _check_positions(self) -> None:
        lost = []
        for tp in self._tps:
            hw = self._consumer.highwater(tp)
            pos = self._consumer.position(tp, timeout_ms=1000) if hw is not None else None  # None: not resolved yet
            if pos is not None and pos > hw:
                lost.append((tp, pos, hw))
        if lost:
            self._lost("; ".join(f"{tp.topic}[{tp.partition}] position {pos} > high-water mark {hw}" for tp, pos, hw in lost),
                       [tp for tp, _, _ in lost])

    def _lost(self, what: str, tps: list[TopicPartition]) -> None:
        self._stats.data_loss_incidents += 1
        if self._cfg.on_data_loss == "fail":
            raise BrokerDataLoss(f"the broker lost records ({what}); it restarted without its log? "
                                 f"Stopping (kafka.on_data_loss=rewind would re-read what it has instead)")
        log.error("BROKER LOST DATA: %s; rewinding %s to their beginning (kafka.on_data_loss=rewind)",
                  what, ", ".join(f"{tp.topic}[{tp.partition}]" for tp in tps))
        self._consumer.seek_to_beginning(*tps)


class DeadLetters:
    """Forwards unusable messages with the reason, so nothing is silently lost."""

    def __init__(self, cfg: KafkaConfig, bootstrap: str):
        self.topic = cfg.dead_letter_topic
        self._producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", client_id="coldstream-dlq")
        self.send_failures = 0

    def send(self, source_topic: str, partition: int, offset: int, raw: bytes | None, reason: str) -> None:
        """The original bytes go along, cut to MAX_MESSAGE_BYTES (with the full length and sha256):
        a near-1 MB poison value, base64-encoded, would exceed the producer's request size and
        raise here, inside the consumer's error path."""
        raw = raw or b""
        record = {
            "topic": source_topic,
            "partition": partition,
            "offset": offset,
            "reason": reason,
            "value_b64": base64.b64encode(raw[:MAX_MESSAGE_BYTES]).decode(),
            "value_bytes": len(raw),
            "value_sha256": hashlib.sha256(raw).hexdigest(),
        }
        try:
            self._producer.send(self.topic, value=json.dumps(record).encode())
        except Exception:  # noqa: BLE001 - the record is still counted; say loudly that its copy is missing
            self.send_failures += 1
            log.exception("dead letter for %s[%d]@%d could not be sent", source_topic, partition, offset)

    def flush(self) -> None:
        self._producer.flush()

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
        metadata_max_age_ms=2000,  # fresh metadata doubles as the broker's heartbeat (BrokerWatch)
        reconnect_backoff_max_ms=1000,  # notice a restarted broker within a second, not after 30
    )


def _assign(consumer: KafkaConsumer, tps: list[TopicPartition], start_offsets: dict[int, int] | None) -> None:
    """Explicit assignment at the checkpointed offsets; partitions without one start at the beginning."""
    consumer.assign(tps)
    start_offsets = start_offsets or {}
    for tp in tps:
        if tp.partition in start_offsets:
            consumer.seek(tp, start_offsets[tp.partition])
        else:
            consumer.seek_to_beginning(tp)


def _positions(consumer: KafkaConsumer, tps: list[TopicPartition]) -> dict[int, int]:
    return {tp.partition: consumer.position(tp) for tp in tps}


class InteractionStream:
    """Validated interactions from a fixed set of partitions of the interactions topic."""

    def __init__(
        self,
        cfg: KafkaConfig,
        bootstrap: str,
        partitions: list[int],
        start_offsets: dict[int, int] | None = None,
        client_id: str = "coldstream-worker",
        cluster_id: str | None = None,
    ):
        self.cfg = cfg
        self.stats = ConsumerStats()
        self._tps = [TopicPartition(cfg.interactions_topic, p) for p in partitions]
        self._consumer = _consumer(bootstrap, client_id, cfg.max_poll_records)
        _assign(self._consumer, self._tps, start_offsets)
        self.watch = BrokerWatch(self._consumer, self._tps, cfg, self.stats, cluster_id)
        self._dead = DeadLetters(cfg, bootstrap)

    def poll(self, timeout_ms: int | None = None) -> list[Interaction]:
        batches = self._consumer.poll(timeout_ms=self.cfg.poll_timeout_ms if timeout_ms is None else timeout_ms)
        out: list[Interaction] = []
        for tp, records in batches.items():
            self.stats.consumed += len(records)
            for rec in records:
                try:
                    out.append(decode_interaction(rec.value, tp.partition, rec.offset, rec.timestamp / 1000.0))
                except Exception as exc:  # noqa: BLE001 - no record may crash the consumer: all go to the DLQ
                    self.stats.malformed += 1
                    self._dead.send(tp.topic, tp.partition, rec.offset, rec.value, _reason(exc))
        self.watch.check()
        return out

    def positions(self) -> dict[int, int]:
        """Next offset to read per owned partition: what a checkpoint must store."""
        return _positions(self._consumer, self._tps)

    def flush(self) -> None:
        """Blocks until every dead letter sent so far is acknowledged by the broker."""
        self._dead.flush()

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

    def __init__(self, cfg: KafkaConfig, bootstrap: str, client_id: str = "coldstream-items",
                 start_offsets: dict[int, int] | None = None, cluster_id: str | None = None):
        self.cfg = cfg
        self.stats = ConsumerStats()
        self._consumer = _consumer(bootstrap, client_id, cfg.max_poll_records)
        parts = self._consumer.partitions_for_topic(cfg.items_topic) or {0}
        self._tps = [TopicPartition(cfg.items_topic, p) for p in sorted(parts)]
        _assign(self._consumer, self._tps, start_offsets)
        self.watch = BrokerWatch(self._consumer, self._tps, cfg, self.stats, cluster_id)
        self._dead = DeadLetters(cfg, bootstrap)

    def poll(self, timeout_ms: int = 0) -> list[ItemAnnouncement]:
        out: list[ItemAnnouncement] = []
        for tp, records in self._consumer.poll(timeout_ms=timeout_ms).items():
            for rec in records:
                self.stats.consumed += 1
                try:
                    out.append(decode_announcement(rec.value, rec.timestamp / 1000.0))
                except Exception as exc:  # noqa: BLE001 - as above
                    self.stats.malformed += 1
                    self._dead.send(tp.topic, tp.partition, rec.offset, rec.value, _reason(exc))
        self.watch.check()
        return out

    def positions(self) -> dict[int, int]:
        """Next announcement to read: checkpointed with the content store, so a restore needs
        neither the topic's whole history nor infinite retention."""
        return _positions(self._consumer, self._tps)

    def flush(self) -> None:
        self._dead.flush()

    def close(self) -> None:
        self._dead.close()
        self._consumer.close()
