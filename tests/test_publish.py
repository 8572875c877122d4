"""FAISS publication: written, read back, verified, hot-swapped, pruned."""
import numpy as np
import pytest

from embeddings.publish import INDEX_FILE, IndexPublisher
from embeddings.reader import IndexReader

pytestmark = pytest.mark.integration


def _vecs(n, d=8, seed=0):
    v = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_publish_read_back_and_hot_swap(tmp_path):
    pub, reader = IndexPublisher(tmp_path, keep=2), IndexReader(tmp_path)
    assert not reader.refresh()
    ids, v = np.arange(50) * 10, _vecs(50)
    pub.publish(ids, v, np.array([7]), v[:1], {"step": 1, "kafka_offsets": {"interactions": {"0": 5}}})
    assert reader.refresh() and reader.version == 1
    _, top = reader.search(v[3:4], 1)
    assert top[0, 0] == 30  # an item's own vector finds the item
    _, top = reader.search(v[3:4], 5, candidates=ids[25:])
    assert set(top[0]) <= set(ids[25:].tolist())
    assert reader.current.manifest["kafka_offsets"]["interactions"]["0"] == 5
    # a newer version is picked up by the same reader, no restart
    pub.publish(ids[:10], _vecs(10, seed=1), np.array([7]), v[:1], {"step": 2})
    assert reader.refresh() and reader.version == 2 and len(reader.current.item_ids) == 10
    assert not reader.refresh()
    pub.publish(ids[:5], _vecs(5, seed=2), np.array([7]), v[:1], {"step": 3})
    assert [p.name for p in sorted(tmp_path.glob("v*"))] == ["v000002", "v000003"]
    assert not list(tmp_path.glob(".tmp*"))


def test_corrupted_version_is_refused(tmp_path):
    pub, reader = IndexPublisher(tmp_path), IndexReader(tmp_path)
    pub.publish(np.arange(5), _vecs(5), np.array([0]), _vecs(1), {})
    assert reader.refresh()
    second = pub.publish(np.arange(6), _vecs(6), np.array([0]), _vecs(1), {})
    with open(second.path / INDEX_FILE, "ab") as f:
        f.write(b"x")
    assert not reader.refresh() and reader.version == 1


def test_crash_leftovers_are_cleaned_and_versions_never_go_backwards(tmp_path):
    pub, reader = IndexPublisher(tmp_path), IndexReader(tmp_path)
    (tmp_path / ".tmp-v000001-999").mkdir()  # a publish that crashed before its rename
    (tmp_path / ".tmp-v000001-999" / INDEX_FILE).write_bytes(b"half")
    pub.publish(np.arange(5), _vecs(5), np.array([0]), _vecs(1), {"step": 86})
    assert not list(tmp_path.glob(".tmp*")) and reader.refresh()
    # a restart restored older weights: the publisher refuses them ...
    assert pub.publish(np.arange(5), _vecs(5, seed=1), np.array([0]), _vecs(1), {"step": 85}) is None
    assert [p.name for p in sorted(tmp_path.glob("v*"))] == ["v000001"]
    # ... and a reader refuses a newer version number that holds an older step
    other = IndexPublisher(tmp_path / "elsewhere")
    older = other.publish(np.arange(5), _vecs(5, seed=2), np.array([0]), _vecs(1), {"step": 80})
    older.path.rename(tmp_path / "v000002")
    (tmp_path / "LATEST").write_text("v000002")
    assert not reader.refresh() and reader.version == 1
    assert pub.publish(np.arange(5), _vecs(5, seed=3), np.array([0]), _vecs(1), {"step": 90}).version == 3
    assert reader.refresh() and reader.version == 3
