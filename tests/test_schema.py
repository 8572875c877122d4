import json

import pytest

from streaming.schema import Interaction, MalformedMessage, decode_announcement, decode_interaction


def test_valid_event_round_trips():
    ev = Interaction(3, 7, "like", 12.5)
    assert decode_interaction(ev.encode(), 10, 10) == ev
    assert ev.positive and not Interaction(3, 7, "skip", 0).positive


@pytest.mark.parametrize("raw, reason", [
    (b"{not json", "not JSON"),
    (b"[1, 2]", "JSON object"),
    (None, "empty"),
    (b"\xff\xfe", "not JSON"),
    (json.dumps({"user_id": 1, "event": "play", "ts": 0}).encode(), "item_id"),
    (json.dumps({"user_id": -1, "item_id": 1, "event": "play", "ts": 0}).encode(), "outside"),
    (json.dumps({"user_id": 1, "item_id": 10, "event": "play", "ts": 0}).encode(), "outside"),
    (json.dumps({"user_id": 1, "item_id": "3", "event": "play", "ts": 0}).encode(), "integer"),
    (json.dumps({"user_id": True, "item_id": 3, "event": "play", "ts": 0}).encode(), "integer"),
    (json.dumps({"user_id": 1, "item_id": 3, "event": "buy", "ts": 0}).encode(), "event"),
    (json.dumps({"user_id": 1, "item_id": 3, "event": "play", "ts": "noon"}).encode(), "ts"),
    # poison: none of these may escape as anything but MalformedMessage
    (b"[" * 100_000, "oversize"),
    (b"[" * 5_000, "nested"),
    (b'{"user_id": 1, "item_id": 3, "event": "play", "ts": 0, "x": ' + b"[" * 20 + b"]" * 20 + b"}", "nested deeper than 8"),
    (b'{"user_id": 1, "item_id": 3, "event": "play", "ts": Infinity}', "non-finite"),
    (b'{"user_id": 1, "item_id": 3, "event": "play", "ts": NaN}', "non-finite"),
    (b'{"user_id": 1, "item_id": 3, "event": "play", "ts": 1e999}', "finite"),
    (b'{"user_id": 1, "item_id": 3, "event": "pl\xff", "ts": 0}', "not JSON"),
    (b'{"user_id": 1, "item_id": 3.5, "event": "play", "ts": 0}', "integer"),
])
def test_malformed_events_name_the_problem(raw, reason):
    with pytest.raises(MalformedMessage, match=reason):
        decode_interaction(raw, 10, 10)


def test_announcement_needs_a_shard_url():
    with pytest.raises(MalformedMessage, match="shard_url"):
        decode_announcement(json.dumps({"item_id": 1, "shard_url": "", "ts": 0}).encode(), 10)
