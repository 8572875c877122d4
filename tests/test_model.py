import numpy as np
import torch

from trainer.config import ModelConfig
from trainer.losses import in_batch_softmax_loss
from trainer.model import DenseArch
from trainer.text import tokenize

CFG = ModelConfig(embedding_dim=8, d_model=16, heads=2, frame_layers=1, text_layers=1, frames=2, frame_size=16, patch=8, text_vocab=32, text_len=6)


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


def test_cold_item_vector_ignores_its_id_embedding():
    torch.manual_seed(0)
    m = DenseArch(CFG).eval()
    frames = torch.randint(0, 255, (3, 2, 16, 16, 3), dtype=torch.uint8)
    tokens = torch.from_numpy(np.stack([tokenize("red fast car", 32, 6)] * 3))
    fc = tc = torch.randn(3, 8)
    ones = torch.ones(3)
    a = m.item_vector(torch.randn(3, 8), fc, tc, frames, tokens, ones, torch.zeros(3))
    b = m.item_vector(torch.randn(3, 8), fc, tc, frames, tokens, ones, torch.zeros(3))
    c = m.item_vector(torch.randn(3, 8), fc, tc, frames, tokens, ones, torch.ones(3))
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
