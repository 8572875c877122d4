import math

import pytest

from trainer.evaluation import ranking_metrics


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
