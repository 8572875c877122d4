"""Wire format of the two streams: interaction events and item announcements.

Events are JSON on Kafka so that any producer (the generator, a dataset replay, a
production service) can write them. Validation happens once, at the consumer, so a
malformed message is caught before it can poison a training batch: the consumer
forwards it to the dead-letter topic instead of raising.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

# A record's size and nesting are capped before and after parsing: a 100 kB run of "[" once
# escaped as a RecursionError and killed the worker on every retry. Both streams carry flat,
# small objects, so these bounds are far above anything valid.
MAX_MESSAGE_BYTES = 64 * 1024
MAX_DEPTH = 8
EVENT_TYPES: tuple[str, ...] = ("click", "play", "skip", "like")
POSITIVE_EVENTS: frozenset[str] = frozenset({"click", "play", "like"})


class MalformedMessage(ValueError):
    """A message that can never be used; the reason goes into the dead-letter record."""


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs 1.1 us per event against 0.3 (ingest's hot path)
class Interaction:
    user_id: int
    item_id: int
    event: str
    ts: float
    # Where the record came from (set by the consumer, not part of the message): what lets a
    # checkpoint and a manifest say up to which offset every event has been trained.
    partition: int = field(default=-1, compare=False)
    offset: int = field(default=-1, compare=False)
    # When the broker took it (the record's timestamp, seconds): freshness is measured from here.
    kafka_ts: float = field(default=0.0, compare=False)

    @property
    def positive(self) -> bool:
        return self.event in POSITIVE_EVENTS

    def encode(self) -> bytes:
        return json.dumps({"user_id": self.user_id, "item_id": self.item_id, "event": self.event, "ts": self.ts},
                          separators=(",", ":")).encode()


@dataclass(frozen=True)
class ItemAnnouncement:
    """A new item: where its content shard lives, so a worker can fetch frames and text."""

    item_id: int
    shard_url: str
    ts: float
    kafka_ts: float = field(default=0.0, compare=False)  # as for Interaction; not part of the message

    def encode(self) -> bytes:
        return json.dumps({"item_id": self.item_id, "shard_url": self.shard_url, "ts": self.ts}, separators=(",", ":")).encode()


def _int_field(obj: dict, name: str, upper: int) -> int:
    value = obj.get(name)
    # bool is an int subclass in Python; a JSON true is not an id.
    if not isinstance(value, int) or isinstance(value, bool):
        raise MalformedMessage(f"field {name!r} must be an integer, got {value!r}")
    if not 0 <= value < upper:
        raise MalformedMessage(f"field {name!r}={value} outside [0, {upper})")
    return value


def _float_field(obj: dict, name: str) -> float:
    value = obj.get(name)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise MalformedMessage(f"field {name!r} must be a finite number, got {value!r}")
    return float(value)


def _no_constant(name: str):
    raise MalformedMessage(f"not JSON: non-finite constant {name}")


# One decoder for every message: json.loads with any keyword builds a new JSONDecoder per call,
# which cost more than the parse itself (measured: 4.9 against 2.0 us per event).
_DECODER = json.JSONDecoder(parse_constant=_no_constant)


def _depth(value, limit: int) -> int:
    """Nesting depth of a parsed value, stopping once past `limit`."""
    if limit < 0 or not isinstance(value, (dict, list)):
        return 0
    children = value.values() if isinstance(value, dict) else value
    return 1 + max((_depth(v, limit - 1) for v in children), default=0)


def _json_object(raw: bytes | None) -> dict:
    if raw is None:
        raise MalformedMessage("empty message")
    if len(raw) > MAX_MESSAGE_BYTES:
        raise MalformedMessage(f"oversize: {len(raw)} bytes > {MAX_MESSAGE_BYTES}")
    try:
        obj = _DECODER.decode(raw.decode("utf-8"))  # JSON between systems is UTF-8 (RFC 8259)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedMessage(f"not JSON: {exc}") from None
    except RecursionError:
        raise MalformedMessage(f"nested deeper than the parser allows (limit {MAX_DEPTH})") from None
    if not isinstance(obj, dict):
        raise MalformedMessage(f"expected a JSON object, got {type(obj).__name__}")
    nested = raw.count(b"{") + raw.count(b"[") > 1  # a flat event (the common case) skips the walk; a C-speed scan
    if nested and _depth(obj, MAX_DEPTH) > MAX_DEPTH:
        raise MalformedMessage(f"nested deeper than {MAX_DEPTH} levels")
    return obj


def decode_interaction(raw: bytes | None, max_users: int, max_items: int, partition: int = -1, offset: int = -1,
                       kafka_ts: float = 0.0) -> Interaction:
    """Parse and validate one event; ids must fit the embedding tables they index."""
    obj = _json_object(raw)
    event = obj.get("event")
    if event not in EVENT_TYPES:
        raise MalformedMessage(f"field 'event' must be one of {EVENT_TYPES}, got {event!r}")
    return Interaction(
        user_id=_int_field(obj, "user_id", max_users),
        item_id=_int_field(obj, "item_id", max_items),
        event=event,
        ts=_float_field(obj, "ts"),
        partition=partition,
        offset=offset,
        kafka_ts=kafka_ts,
    )


def decode_announcement(raw: bytes | None, max_items: int, kafka_ts: float = 0.0) -> ItemAnnouncement:
    obj = _json_object(raw)
    url = obj.get("shard_url")
    if not isinstance(url, str) or not url:
        raise MalformedMessage(f"field 'shard_url' must be a non-empty string, got {url!r}")
    return ItemAnnouncement(item_id=_int_field(obj, "item_id", max_items), shard_url=url, ts=_float_field(obj, "ts"),
                            kafka_ts=kafka_ts)
