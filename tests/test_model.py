import numpy as np
import torch

from trainer.config import ModelConfig
from trainer.losses import bpr_loss, in_batch_softmax_loss
from trainer.model import DenseArch
from trainer.text import tokenize

# the seed model: every cold-start part off (the defaults turn some on)
CFG = ModelConfig(embedding_dim=8, d_model=16, heads=2, frame_layers=1, text_layers=1, frames=2, frame_size=16, patch=8, text_vocab=32, text_len=6,
                  user_tower="id", interest_intensity=False, orthogonality_weight=0, popularity_gate=False)


def test_duplicate_items_are_not_negatives():
    torch.manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    v = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    ids = torch.tensor([1, 2, 3, 4])
    base = in_batch_softmax_loss(u, v, torch.arange(4), ids, 0.1)
    # the same item twice: masking must make column 0 irrelevant to row 1's loss
    dup = v.clone()
    dup[0] = v[1]
    masked = in_batch_softmax_loss(u, dup, torch.arange(4), torch.tensor([2, 2, 3, 4]), 0.1)
    unmasked = in_batch_softmax_loss(u, dup, torch.arange(4), torch.tensor([9, 2, 3, 4]), 0.1)
    assert not torch.isclose(masked, unmasked)
    assert torch.isfinite(base) and torch.isfinite(masked)


def test_skipped_items_are_extra_negatives_but_never_a_rows_own_item():
    torch.manual_seed(3)
    u = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    v = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    ids = torch.tensor([1, 2, 3, 4])
    plain = in_batch_softmax_loss(u, v, torch.arange(4), ids, 0.2)
    skipped = in_batch_softmax_loss(u, v, torch.arange(4), ids, 0.2, negatives=u[:2], negative_ids=torch.tensor([7, 8]))
    assert (skipped > plain).item()  # a skipped item close to the user is a hard negative
    # a skipped copy of row 0's own positive is masked for row 0 only: row 0's term is as without it
    own = in_batch_softmax_loss(u[:1], v[:1], torch.arange(1), ids[:1], 0.2, negatives=v[:1], negative_ids=ids[:1])
    assert torch.isclose(own, torch.zeros(())), own


def test_item_to_user_direction_only_when_symmetric():
    """The default ranks items for a user alone; `symmetric` adds seed 000's item -> user softmax,
    the only place where a user seen twice in the batch is masked."""
    torch.manual_seed(2)
    u = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    v = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    items = torch.arange(4)
    one_way = [in_batch_softmax_loss(u, v, users, items, 0.2) for users in (torch.tensor([0, 0, 1, 2]), torch.arange(4))]
    two_way = [in_batch_softmax_loss(u, v, users, items, 0.2, symmetric=True) for users in (torch.tensor([0, 0, 1, 2]), torch.arange(4))]
    assert torch.isclose(one_way[0], one_way[1]) and not torch.isclose(two_way[0], two_way[1])
    assert (two_way[1] > one_way[1]).item()


def test_cold_item_vector_ignores_its_id_embedding():
    torch.manual_seed(0)
    m = DenseArch(CFG).eval()
    frames = torch.randint(0, 255, (3, 2, 16, 16, 3), dtype=torch.uint8)
    tokens = torch.from_numpy(np.stack([tokenize("red fast car", 32, 6)] * 3))
    fc = tc = torch.randn(3, 8)
    ones = torch.ones(3)

    def vector(id_emb, keep):
        content, id_part, _ = m.item_parts(id_emb, fc, tc, frames, tokens, ones)
        return m.combine(content, id_part, keep)

    a = vector(torch.randn(3, 8), torch.zeros(3))
    b = vector(torch.randn(3, 8), torch.zeros(3))
    c = vector(torch.randn(3, 8), torch.ones(3))
    assert torch.allclose(a, b) and not torch.allclose(a, c)
    assert torch.allclose(a.norm(dim=1), torch.ones(3))


def test_tokenizer_is_stable_and_padded():
    t = tokenize("Hello, hello WORLD", 32, 6)
    assert t[0] == t[1] != 0 and (t[3:] == 0).all()
    assert (tokenize("Hello, hello WORLD", 32, 6) == t).all()


def test_logq_correction_shifts_only_relative_frequencies():
    torch.manual_seed(1)
    u = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
    v = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
    ids = torch.arange(6)
    plain = in_batch_softmax_loss(u, v, ids, ids, 0.1)
    uniform = torch.full((6,), -3.0)
    assert torch.isclose(plain, in_batch_softmax_loss(u, v, ids, ids, 0.1, uniform, uniform))
    skewed = torch.tensor([0.0, -5, -5, -5, -5, -5])  # item 0 is a very common positive
    assert not torch.isclose(plain, in_batch_softmax_loss(u, v, ids, ids, 0.1, skewed))


ALL_ON = CFG.model_copy(update=dict(user_tower="attention", interest_intensity=True, orthogonality_weight=1.0, popularity_gate=True,
                                    clcrec_weight=0.5, alignment_weight=0.5, infer_missing=True, history_length=3))


def _inputs(n: int = 4):
    frames = torch.randint(0, 255, (n, 2, 16, 16, 3), dtype=torch.uint8)
    tokens = torch.from_numpy(np.stack([tokenize(f"item {k} words", 32, 6) for k in range(n)]))
    return frames, tokens


def test_every_part_on_trains_end_to_end_and_a_user_without_history_is_served():
    """All switches on: one loss, finite, whose gradient reaches the history's ID embeddings (the user
    tower attends over them) and the cluster embeddings; a user with an empty history still gets a vector."""
    torch.manual_seed(0)
    m = DenseArch(ALL_ON)
    frames, tokens = _inputs()
    hist = tuple(torch.randn(4, 3, 8, requires_grad=True) for _ in range(3))
    pad = torch.tensor([[False, False, False], [True, False, False], [True, True, True], [True, True, False]])
    users, items, aux = m(torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8), frames, tokens,
                          torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.ones(4), torch.tensor([0.0, 3.0, 100.0, 1.0]), hist, pad)
    assert torch.isfinite(users).all() and torch.isfinite(items).all() and torch.isfinite(aux) and aux > 0
    (users.sum() + items.sum() + aux).backward()
    assert hist[0].grad[0].abs().sum() > 0 and hist[1].grad[0].abs().sum() > 0
    assert hist[0].grad[2].abs().sum() == 0  # all padding: nothing read from it
    assert torch.allclose(users.norm(dim=1), torch.ones(4))


def test_popularity_gate_sets_the_mix_by_count_and_a_dropped_id_leaves_content_alone():
    torch.manual_seed(0)
    m = DenseArch(ALL_ON).eval()
    with torch.no_grad():  # a gate that trusts ID embeddings more as positives grow
        m.popularity[0].weight.copy_(torch.arange(32.0)[:, None].expand(32, 8) * -0.5 + 4)
        m.popularity[1].weight.fill_(1.0 / 8)
        m.popularity[1].bias.zero_()
    content, id_part = torch.randn(2, 8), torch.randn(2, 8)
    few = m.combine(content, id_part, torch.ones(2), torch.tensor([0.0, 0.0]))
    many = m.combine(content, id_part, torch.ones(2), torch.tensor([1e6, 1e6]))
    unit = torch.nn.functional.normalize
    assert (few * unit(content)).sum(1).gt((many * unit(content)).sum(1)).all()
    assert (many * unit(id_part)).sum(1).gt((few * unit(id_part)).sum(1)).all()
    assert torch.allclose(m.combine(content, id_part, torch.zeros(2), torch.tensor([1e6, 1e6])), unit(content))
    # an item seen as new: the shared new-item vector for its ID part, and no positives for the gate
    with torch.no_grad():
        m.new_item.copy_(torch.randn(8))
    as_new = m.combine(content, id_part, torch.zeros(2), torch.tensor([1e6, 1e6]))
    assert torch.allclose(as_new, m.as_new(content)) and not torch.allclose(as_new, unit(content))


def test_missing_image_is_inferred_from_text_not_zeros():
    """CIERec: without the switch a missing image is a zero feature; with it, the frame feature
    comes from the text, so two items with different texts and no image differ in that feature."""
    torch.manual_seed(0)
    frames, tokens = _inputs(2)
    none = torch.zeros(2)
    off = DenseArch(CFG).eval()
    z_off, _, _ = off.content_features(frames, tokens, none)
    assert (z_off == 0).all()
    on = DenseArch(ALL_ON).eval()
    z_on, _, loss = on.content_features(frames, tokens, none)
    assert z_on.abs().sum() > 0 and not torch.allclose(z_on[0], z_on[1])
    assert loss == 0  # nothing to learn the inference from: no item has both
    _, _, loss = on.content_features(frames, tokens, torch.ones(2))
    assert loss > 0


def test_bpr_ignores_the_users_other_positives_in_the_batch():
    torch.manual_seed(2)
    u = torch.nn.functional.normalize(torch.randn(3, 8), dim=1)
    v = torch.nn.functional.normalize(torch.randn(3, 8), dim=1)
    distinct = bpr_loss(u, v, torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]), 0.1)
    u_same = u.clone()
    u_same[1] = u[0]  # row 1 is user 0 again: item 1 is a positive of user 0, not a negative
    shared = bpr_loss(u_same, v, torch.tensor([0, 0, 2]), torch.tensor([0, 1, 2]), 0.1)
    unmasked = bpr_loss(u_same, v, torch.tensor([0, 5, 2]), torch.tensor([0, 1, 2]), 0.1)
    assert torch.isfinite(distinct) and not torch.isclose(shared, unmasked)


def test_clips_train_on_one_random_clip_and_export_the_max_over_all():
    """Seed 000: with 2 clips of 2 frames, training encodes one of them (either, at random), and
    eval mode (export, the published mapping) the element-wise max over both."""
    torch.manual_seed(0)
    m = DenseArch(CFG.model_copy(update={"clips": 2}))
    frames = torch.randint(0, 255, (3, 4, 16, 16, 3), dtype=torch.uint8)
    m.eval()
    with torch.no_grad():
        first, second = m.frames(frames[:, :2]), m.frames(frames[:, 2:])
        assert torch.allclose(m.clip_features(frames), torch.maximum(first, second), atol=1e-5)
    m.train()
    with torch.no_grad():
        seen = [m.clip_features(frames) for _ in range(12)]
    assert all(torch.allclose(s[0], first[0], atol=1e-5) or torch.allclose(s[0], second[0], atol=1e-5) for s in seen)
    assert any(torch.allclose(s[0], first[0], atol=1e-5) for s in seen) and any(torch.allclose(s[0], second[0], atol=1e-5) for s in seen)
