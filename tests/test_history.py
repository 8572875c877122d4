import numpy as np

from trainer.history import PAD, Histories
from trainer.batch import ContentStore, make_batch
from trainer.config import ModelConfig
from trainer.counts import KeyedCounts


def test_histories_keep_the_last_positives_and_evict_the_least_recently_active_user():
    h = Histories(length=3, capacity=2)
    h.add(np.array([1, 1, 1, 1, 2]), np.array([10, 11, 12, 13, 20]), np.array([0, 0, 0, 0, 1]))
    assert h.get(np.array([1, 2, 9])).tolist() == [[11, 12, 13], [PAD, PAD, 20], [PAD] * 3]
    h.add(np.array([1]), np.array([14]), np.array([0]))  # user 1 active again: user 2 is the least recent
    h.add(np.array([3]), np.array([30]), np.array([0]))
    assert h.evicted == 1 and h.get(np.array([2]))[0].tolist() == [PAD] * 3
    assert h.get(np.array([1, 3])).tolist() == [[12, 13, 14], [PAD, PAD, 30]]


def test_a_checkpoint_hands_each_history_to_the_owner_of_its_partition():
    h = Histories(length=4, capacity=10)
    h.add(np.array([1, 2, 3]), np.array([10, 20, 30]), np.array([0, 1, 2]))
    state = h.state()
    a, b = Histories(length=2, capacity=10), Histories(length=2, capacity=10)
    a.load(state, [0, 2])
    b.load(state, [1])
    assert sorted(a.users().tolist()) == [1, 3] and b.users().tolist() == [2]
    assert a.get(np.array([3]))[0].tolist() == [PAD, 30]


def test_batch_reads_histories_through_the_item_lookup_without_the_target():
    cfg = ModelConfig(frames=1, frame_size=8, patch=4, d_model=8, heads=2, text_vocab=16, text_len=2)
    store = ContentStore(cfg)
    for i in (100, 101, 102, 103):
        store.add(i, np.zeros((1, 8, 8, 3), np.uint8), True, "t", 0, 0)
    hist = np.array([[103, 100, 101], [PAD, PAD, 100]])
    b = make_batch(np.array([0, 1]), np.array([101, 100]), store, 1.0, np.random.default_rng(0), KeyedCounts(), KeyedCounts(), history=hist)
    looked_up = b.kjt["item_id"].values().numpy()
    assert len(looked_up) == 3 and len(b.slots) == 2  # 100, 101 (content encoded), then 103 (history only)
    assert b.hist_pad.tolist() == [[False, False, True], [True, True, True]]  # each example's own item is masked
    from trainer.batch import spread
    assert looked_up[b.hist_index[0, 0]] == spread(np.array([103]))[0] and looked_up[b.hist_index[0, 1]] == spread(np.array([100]))[0]
