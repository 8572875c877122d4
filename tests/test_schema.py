import json

import pytest

from streaming.schema import (INT_ID_LIMIT, Interaction, MalformedMessage, decode_announcement, decode_interaction, id_key,
                              parse_id, raw_id)


def test_valid_event_round_trips():
    ev = Interaction(3, 7, "like", 12.5)
    assert decode_interaction(ev.encode()) == ev
    assert ev.positive and not Interaction(3, 7, "skip", 0).positive


def test_ids_are_any_integer_or_string_with_distinct_keys():
    big = Interaction(2**62 - 1, "item-é-42", "play", 1.0)
    assert decode_interaction(big.encode()) == big
    keys = {id_key(x) for x in (0, 1, 2**62 - 1, "0", "1", "item-é-42", "item-é-43")}
    assert len(keys) == 7  # a string that spells an integer is another id
    assert all(0 <= k < 2**63 for k in keys) and id_key("1") >= INT_ID_LIMIT and id_key(5) == 5
    assert id_key("item-é-42") == big.item_key  # stable: the same string, the same key, in any process
    assert raw_id(id_key("abc"), {id_key("abc"): "abc"}) == "abc" and raw_id(12, {}) == 12
    assert parse_id("12") == 12 and parse_id("012") == "012" and parse_id("x1") == "x1" and parse_id(str(2**62)) == str(2**62)


@pytest.mark.parametrize("raw, reason", [
    (b"{not json", "not JSON"),
    (b"[1, 2]", "JSON object"),
    (None, "empty"),
    (b"\xff\xfe", "not JSON"),
    (json.dumps({"user_id": 1, "event": "play", "ts": 0}).encode(), "item_id"),
    (json.dumps({"user_id": -1, "item_id": 1, "event": "play", "ts": 0}).encode(), "outside"),
    (json.dumps({"user_id": 1, "item_id": 2**62, "event": "play", "ts": 0}).encode(), "outside"),
    (json.dumps({"user_id": 1, "item_id": "", "event": "play", "ts": 0}).encode(), "1 to 256 characters"),
    (json.dumps({"user_id": "u" * 257, "item_id": 3, "event": "play", "ts": 0}).encode(), "1 to 256 characters"),
    (json.dumps({"user_id": [1], "item_id": 3, "event": "play", "ts": 0}).encode(), "integer or a string"),
    (json.dumps({"user_id": True, "item_id": 3, "event": "play", "ts": 0}).encode(), "integer or a string"),
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
    (b'{"user_id": 1, "item_id": 3.5, "event": "play", "ts": 0}', "integer or a string"),
])
def test_malformed_events_name_the_problem(raw, reason):
    with pytest.raises(MalformedMessage, match=reason):
        decode_interaction(raw)


def test_announcement_needs_a_shard_url():
    with pytest.raises(MalformedMessage, match="shard_url"):
        decode_announcement(json.dumps({"item_id": 1, "shard_url": "", "ts": 0}).encode())
