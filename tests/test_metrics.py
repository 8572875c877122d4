import math

import numpy as np
import pytest

from trainer.metrics import exact_scores, ranking_metrics, score_metrics


def test_hand_computed_ranking():
    ranked = {1: [10, 11, 12, 13], 2: [20, 21, 22, 23]}
    positives = {1: [11, 13, 99], 2: [20], 3: [5]}  # user 3 has no ranking: counts as zero
    m = ranking_metrics(ranked, positives, ks=(2, 4))
    # user1 @2: hit at rank 2 -> recall 1/3, precision 1/2, ndcg (1/log2 3)/(1 + 1/log2 3)
    # user2 @2: hit at rank 1 -> recall 1, precision 1/2, ndcg 1
    n1 = (1 / math.log2(3)) / (1 + 1 / math.log2(3))
    assert m["recall@2"] == pytest.approx((1 / 3 + 1 + 0) / 3)
    assert m["precision@2"] == pytest.approx((0.5 + 0.5 + 0) / 3)
    assert m["ndcg@2"] == pytest.approx((n1 + 1 + 0) / 3)
    # user1 @4: hits at ranks 2 and 4 of 3 positives
    ideal = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert m["ndcg@4"] == pytest.approx(((1 / math.log2(3) + 1 / math.log2(5)) / ideal + 1 + 0) / 3)
    assert m["recall@4"] == pytest.approx((2 / 3 + 1 + 0) / 3)


def test_users_without_positives_are_not_averaged():
    assert ranking_metrics({1: [1]}, {1: [1], 2: []}, ks=(1,))["recall@1"] == 1.0


def test_score_metrics_match_hand_computation():
    import numpy as np

    from trainer.metrics import score_metrics

    cands = np.array([10, 11, 12, 13])
    scores = np.array([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    positive = np.array([[False, True, False, True], [True, False, False, False]])
    valid = np.array([[True, True, True, True], [True, True, False, True]])  # user 2 already had item 12
    m = score_metrics(scores, positive, valid, [1, 2], cands, ks=(2,))
    # user1: ranking 10,11 -> 1 hit of 2 positives; user2: ranking 13,11 -> 0 hits
    assert m["recall@2"] == pytest.approx((0.5 + 0.0) / 2)
    # AUC user1: positives {3,1} vs negatives {4,2}: pairs correct (3>2),(1<4),(3<4),(1<2) -> 1/4
    # user2: positive 1 vs negatives {2,4} -> 0
    assert m["auc"] == pytest.approx((0.25 + 0.0) / 2)


def test_scores_equal_in_exact_arithmetic_tie_and_rank_like_random():
    """One shared vector for every candidate (the global-average baseline): every candidate must get
    the same score, bit for bit, so the random tie-break decides, not the candidate's position."""
    rng = np.random.default_rng(0)
    users = rng.normal(size=(943, 64)).astype(np.float32)
    shared = np.tile(rng.normal(size=64).astype(np.float32), (252, 1))
    scores = exact_scores(users, shared)
    assert (scores == scores[:, :1]).all()
    mixed = np.concatenate([shared, rng.normal(size=(5, 64)).astype(np.float32)])
    np.testing.assert_allclose(exact_scores(users, mixed), users @ mixed.T, rtol=1e-5, atol=1e-5)
    positive = rng.random((943, 252)) < 0.05
    valid = np.ones_like(positive)
    cands, ids = np.arange(252), list(range(943))
    tied = score_metrics(scores, positive, valid, ids, cands)
    zero = score_metrics(np.zeros_like(scores), positive, valid, ids, cands)
    assert tied == zero  # exactly the random order's figures
