import logging

import numpy as np

from streaming.shards import ShardCache, encode_png, read_shard, write_shard


def _items(n, start=0):
    rng = np.random.default_rng(0)
    return [{"item_id": i, "frames": [encode_png(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)) for _ in range(2)], "text": f"item {i}", "meta": {"k": i}}
            for i in range(start, start + n)]


def test_round_trip_resizes_and_fills_clip(tmp_path):
    url = write_shard(tmp_path / "a.tar", _items(3) + [{"item_id": 9, "text": "no pictures"}])
    items = read_shard(url, n_frames=4, size=16)
    assert sorted(items) == [0, 1, 2, 9]
    assert items[0].frames.shape == (4, 16, 16, 3) and items[0].has_frames and items[0].text == "item 0"
    assert not items[9].has_frames and items[9].frames.sum() == 0
    assert not list(tmp_path.glob("*.tmp"))


def test_corrupt_and_missing_shards_skip_items_with_a_reason(tmp_path, caplog):
    good = write_shard(tmp_path / "good.tar", _items(2))
    bad = tmp_path / "bad.tar"
    data = (tmp_path / "good.tar").read_bytes()
    bad.write_bytes(data[:700] + b"garbage" * 50)
    cache = ShardCache(2, 16)
    with caplog.at_level(logging.WARNING):
        assert cache.fetch(0, good) is not None
        assert cache.fetch(5, bad.as_uri()) is None
        assert cache.fetch(6, (tmp_path / "nowhere.tar").as_uri()) is None
        assert cache.fetch(7, good) is None  # announced in a shard that does not hold it
    assert set(cache.skipped) == {5, 6, 7}
    assert "does not exist" in cache.skipped[6] and "not found in shard" in cache.skipped[7]
    assert "bad.tar" in caplog.text and "nowhere.tar" in caplog.text
