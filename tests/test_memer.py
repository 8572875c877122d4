"""MEMER's mapping, its losses, the per-signal labels, the maturity threshold from the
stability curve, and the pooled AUC its protocol reports."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from embeddings.maturity import StabilityCurve, count_bin
from streaming.schema import EVENT_TYPES
from trainer.batch import signal_labels
from trainer.metrics import pooled_auc
from trainer.memer import Memer, stage, wasserstein_diag


def test_the_mapping_learns_to_place_items_from_content_where_their_users_are():
    """Users sit near their items' mature vectors; content determines those vectors. Trained on
    MEMER's losses alone, the early-stage embedding of an item must come close to the item's
    mature vector, close enough to pick it out among all the others."""
    torch.manual_seed(0)
    n_items, d, e = 64, 8, 8
    content = torch.randn(n_items, 2 * d + e)
    mature_vecs = F.normalize(content @ torch.randn(2 * d + e, e), dim=-1)
    base = F.normalize(torch.randn(n_items, e), dim=-1)  # a content vector that knows nothing
    memer = Memer(d, e, 32, ["positive"])
    opt = torch.optim.Adam(memer.parameters(), lr=5e-3)

    def batch():
        idx = torch.randint(0, n_items, (48,))
        users = F.normalize(mature_vecs[idx] + 0.3 * torch.randn(48, e), dim=-1)
        uniq, index = idx.unique(return_inverse=True)
        feat = memer.features(content[uniq, :d], content[uniq, d:2 * d], content[uniq, 2 * d:], torch.ones(len(uniq)))
        return feat, base[uniq], mature_vecs[uniq], torch.rand(len(uniq)), torch.ones(len(uniq)), users, index, torch.ones(48, 1)

    first = memer.loss(*batch(), (1.0, 1.0, 1.0)).item()
    for _ in range(600):
        loss = memer.loss(*batch(), (1.0, 1.0, 1.0))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    with torch.no_grad():
        early = memer.early(memer.features(content[:, :d], content[:, d:2 * d], content[:, 2 * d:], torch.ones(n_items)),
                            torch.zeros(n_items), base)["positive"]
    cos = (early * mature_vecs).sum(1)
    assert cos.mean() > 0.5, cos.mean()  # from about 0 untrained
    own = (early @ mature_vecs.T).argmax(1) == torch.arange(n_items)
    assert own.float().mean() > 0.3  # ranks its own mature vector first among 64 (chance: 1 in 64)


def test_no_mature_item_means_no_loss_but_every_parameter_in_the_graph():
    memer = Memer(4, 4, 8, ["positive", "play"])
    feat = memer.features(torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4), torch.ones(3))
    loss = memer.loss(feat, F.normalize(torch.randn(3, 4), dim=-1), F.normalize(torch.randn(3, 4), dim=-1), torch.rand(3), torch.zeros(3),
                      F.normalize(torch.randn(5, 4), dim=-1), torch.tensor([0, 1, 2, 0, 1]), torch.ones(5, 2), (1, 1, 1))
    assert loss.item() == 0.0
    loss.backward()
    assert all(p.grad is not None for p in memer.parameters())  # ZeRO expects a gradient for each


def test_wasserstein_is_zero_for_the_same_distribution_and_grows_with_a_shift():
    a = torch.randn(256, 4)
    w = torch.ones(256)
    assert wasserstein_diag(a, a, w).item() < 1e-6
    assert abs(wasserstein_diag(a, a + 2.0, w).item() - 16.0) < 1e-3  # ||mu shift||^2 = 4 * 2^2


def test_stage_and_signal_labels():
    assert stage(torch.tensor([0, 4, 9, 100]), 9).tolist() == [0.0, stage(torch.tensor([4]), 9).item(), 1.0, 1.0]
    events = np.array([EVENT_TYPES.index(e) for e in ("play", "like", "click")])
    assert signal_labels(events, ["positive", "play"]).tolist() == [[1, 1], [1, 0], [1, 0]]
    assert signal_labels(events, []).shape == (3, 0)


def test_maturity_threshold_is_where_median_drift_per_update_stays_below_epsilon():
    rng = np.random.default_rng(0)
    curve = StabilityCurve(epsilon=0.01)
    counts = rng.integers(1, 200, 2000)
    vecs = rng.normal(size=(2000, 8))
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    curve.update(np.arange(2000), counts, np.zeros(2000), vecs)
    assert curve.threshold() is None  # nothing to compare with yet
    # drift per update falls with the count: items with 32+ interactions barely move
    step = np.where(counts >= 32, 0.001, 0.2)[:, None] * rng.normal(size=(2000, 8))
    moved = vecs + step
    moved /= np.linalg.norm(moved, axis=1, keepdims=True)
    curve.update(np.arange(2000), counts, np.full(2000, 2), moved)
    assert curve.threshold() == 32
    assert [p["from_count"] for p in curve.curve()] == sorted({2 ** (b - 1) for b in count_bin(counts)})
    never = StabilityCurve(epsilon=1e-9)
    never.update(np.arange(2000), counts, np.zeros(2000), vecs)
    never.update(np.arange(2000), counts, np.full(2000, 2), moved)
    assert never.threshold() is None


def test_pooled_auc():
    assert pooled_auc(np.array([3.0, 2.0]), np.array([1.0, 0.0])) == 1.0
    assert pooled_auc(np.array([0.0]), np.array([1.0])) == 0.0
    assert pooled_auc(np.array([1.0, 1.0]), np.array([1.0, 0.0])) == 0.75  # a tie counts half
