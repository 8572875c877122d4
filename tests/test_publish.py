"""FAISS publication: written, read back, verified, hot-swapped, pruned; bases and delta segments."""
import numpy as np
import pytest

import faiss

from embeddings.publish import DELTA_FILE, INDEX_FILE, IndexPublisher
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
    for vecs in (_vecs(6), _vecs(6, seed=1)):  # one new item: a delta segment; all changed: a base
        second = pub.publish(np.arange(6), vecs, np.array([0]), _vecs(1), {})
        target = DELTA_FILE if second.manifest.get("base") else INDEX_FILE
        with open(second.path / target, "ab") as f:
            f.write(b"x")
        assert not reader.refresh() and reader.version == 1, target


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


def _exact_top(catalogue: dict[int, np.ndarray], queries: np.ndarray, k: int) -> list[list[int]]:
    ids = np.array(sorted(catalogue))
    scores = queries @ np.stack([catalogue[i] for i in ids]).T
    return [ids[np.argsort(-row, kind="stable")[:k]].tolist() for row in scores]


def test_delta_segments_swap_without_reloading_the_base_and_answer_like_one_index(tmp_path):
    """A version that changes 10 of 200 items is a segment on the base; the reader applies it to
    the base it holds (the same object), a fresh reader rebuilds the chain from disk, and both
    rank exactly like one flat index over the catalogue; a base comes back on the cadence."""
    pub, reader = IndexPublisher(tmp_path, keep=2, rebase_every=3), IndexReader(tmp_path, use_gpu=False)
    users = np.array([1])
    catalogue = dict(zip(range(200), _vecs(200)))
    pub.publish(np.array(list(catalogue)), np.stack(list(catalogue.values())), users, _vecs(1), {"step": 1})
    assert reader.refresh()
    base = reader.current.index.base
    queries = _vecs(8, seed=9)
    for step, seed in ((2, 3), (3, 4)):
        for i in range(step, 200, 40):  # a few change ...
            catalogue[i] = _vecs(1, seed=seed * 1000 + i)[0]
        del catalogue[step * 10]  # ... one goes ...
        catalogue[1000 + step] = queries[step]  # ... one arrives (a query's exact match)
        got = pub.publish(np.array(list(catalogue)), np.stack(list(catalogue.values())), users, _vecs(1), {"step": step})
        assert got.manifest["base"] == "v000001" and not (got.path / INDEX_FILE).exists()
        assert got.manifest["n_upserted"] == 6 and got.manifest["n_removed"] == 1
        assert reader.refresh() and reader.current.index.base is base  # the base was not read again
        fresh = IndexReader(tmp_path, use_gpu=False)
        assert fresh.refresh()
        for r in (reader, fresh):
            _, top = r.search(queries, 10)
            assert top.tolist() == _exact_top(catalogue, queries, 10)
            assert r.current.item_ids.tolist() == sorted(catalogue)
        with pytest.raises(RuntimeError):
            reader.current.index.reconstruct(step * 10)
        np.testing.assert_allclose(reader.current.index.reconstruct(1000 + step), queries[step], rtol=1e-6)
    assert [p.name for p in sorted(tmp_path.glob("v*"))] == ["v000001", "v000002", "v000003"]  # the chain stays
    third = pub.publish(np.array(list(catalogue)), np.stack(list(catalogue.values())), users, _vecs(1), {"step": 4})
    assert "base" not in third.manifest and (third.path / INDEX_FILE).exists()  # every third version is a base
    assert reader.refresh() and reader.current.index.base is not base
    _, top = reader.search(queries, 10, candidates=np.arange(100))
    assert set(top.ravel().tolist()) <= set(range(100))
    pub.publish(np.array(list(catalogue)), np.stack(list(catalogue.values())), users, _vecs(1), {"step": 5})
    assert [p.name for p in sorted(tmp_path.glob("v*"))] == ["v000004", "v000005"]  # the old chain is pruned


def test_publish_delta_takes_the_change_itself(tmp_path):
    pub, reader = IndexPublisher(tmp_path), IndexReader(tmp_path, use_gpu=False)
    with pytest.raises(RuntimeError, match="base"):
        pub.publish_delta(np.array([1]), _vecs(1), np.array([], np.int64), np.array([0]), _vecs(1), {})
    pub.publish(np.arange(50), _vecs(50), np.array([0]), _vecs(1), {"step": 1})
    new = _vecs(2, seed=5)
    pub.publish_delta(np.array([7, 99]), new, np.array([3]), np.array([0]), _vecs(1), {"step": 2})
    assert reader.refresh() and reader.current.index.ntotal == 50
    assert reader.current.index.contains(np.array([7, 99, 3, 4])).tolist() == [True, True, False, True]
    _, top = reader.search(new, 1)
    assert top.ravel().tolist() == [7, 99]
    # the publisher kept the catalogue: when a base is due, it is built from the changes folded in
    pub.rebase_every = 2
    out = pub.publish_delta(np.array([100]), _vecs(1, seed=6), np.array([99]), np.array([0]), _vecs(1), {"step": 3})
    assert (out.path / INDEX_FILE).exists() and not (out.path / DELTA_FILE).exists()
    assert reader.refresh() and reader.current.index.ntotal == 50
    assert reader.current.index.contains(np.array([7, 99, 3, 100])).tolist() == [True, False, False, True]
    np.testing.assert_allclose(reader.current.index.reconstruct(7), new[0], rtol=1e-6)
    np.testing.assert_allclose(reader.current.index.reconstruct(10), _vecs(50)[10], rtol=1e-6)


def test_an_ivf_index_serves_with_its_nprobe_selectors_deltas_and_reconstruct(tmp_path):
    vecs = _vecs(2000, seed=3)
    pub = IndexPublisher(tmp_path, factory="IVF16,Flat", search_params="nprobe=16")  # every list: exact answers
    reader = IndexReader(tmp_path, use_gpu=False)
    pub.publish(np.arange(2000), vecs, np.array([0]), _vecs(1), {"step": 1})
    assert reader.refresh() and faiss.extract_index_ivf(reader.current.index.base).nprobe == 16
    _, top = reader.search(vecs[:5], 1)
    assert top.ravel().tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(reader.current.index.reconstruct(1234), vecs[1234], rtol=1e-6)
    pub.publish_delta(np.array([5000]), vecs[7:8], np.array([7]), np.array([0]), _vecs(1), {"step": 2})
    assert reader.refresh()  # a segment hides id 7 in the IVF base: selectors must reach it
    _, top = reader.search(vecs[7:8], 2)
    assert top.ravel().tolist()[0] == 5000 and 7 not in top.ravel().tolist()
    _, top = reader.search(vecs[:1], 3, candidates=np.array([1, 2, 7]))
    assert set(top.ravel().tolist()) == {1, 2, -1}  # two candidates left: -1 pads, as faiss does


def test_the_gpu_copy_still_answers_once_segments_hide_base_ids():
    """The GPU copy of a base takes no selector: hidden ids are asked for and dropped after. A CPU
    clone stands in for the GPU copy; the answers must match the selector path's exactly."""
    from embeddings.layered import LayeredIndex
    from embeddings.publish import build_index

    vecs = _vecs(500, seed=9)
    base = build_index(vecs, np.arange(500), "Flat")
    plain, with_copy = LayeredIndex(base, np.arange(500)), LayeredIndex(base, np.arange(500), base_gpu=faiss.clone_index(base))
    for index in (plain, with_copy):
        index.apply(np.array([3, 900]), _vecs(2, seed=10), np.array([1, 2, 4]))
    plain, with_copy = plain.derive(), with_copy.derive()  # a later version shares the hidden set and its selector
    queries = vecs[:6]
    (s1, i1), (s2, i2) = plain.search(queries, 10), with_copy.search(queries, 10)
    assert (i1 == i2).all() and np.allclose(s1, s2)
    assert not np.isin(i2, [1, 2, 4]).any() and 0 in i2[:, 0]
