"""MEMER's early-stage mapping (paper 004, section 2.1): content -> an item embedding in the
space of mature ones, for items too new to have a trained ID embedding of their own.

Per signal (positives, plays, ...) one mapping:
- the semantic module (eq. 5) fuses the content encoders' outputs (frames, text, and the
  item tower's content vector, which adds the M3CSR cluster embeddings) with an auxiliary
  feature (has an image): feat = GELU(W(frames ++ text ++ content ++ aux) + b);
- enc1 encodes a mature item's embedding (eq. 1), enc2 the fused content (eq. 2);
- one decoder, shared by both encoders, also takes the item's frequency (eqs. 3-4),
  so the mapping knows how early the item is. It predicts the embedding as a correction
  to the item tower's content vector c: p = normalize(c + dec(e, freq)), and starts at zero,
  so the mapping begins where content alone stands and learns what interactions add to it
  (without this, measured on MovieLens, it stayed below content alone).

The losses (eq. 11), over the mature items of a batch:
- Wasserstein between the distributions of enc1 and enc2 outputs (eq. 6). We use the
  closed form of the 2-Wasserstein distance between two Gaussians with diagonal
  covariance fitted to the batch: ||mu1 - mu2||^2 + ||sigma1 - sigma2||^2;
- MSE between dec(enc1(v), freq) and v (eq. 7), and (our addition) the same for the
  prediction path, dec(enc2(feat), freq) against v. The Wasserstein term aligns only the two
  encoders' distributions, so nothing tied an item's prediction to its own mature
  embedding, and the BCE alone taught the mapping scores on another scale than the mature
  items it shares the index with: on MovieLens (one frozen version, 20% of the items
  served by the mapping) mapped items took 51% of the top-20 slots against 21% for their
  mature vectors, and recall@20 fell from 0.369 to 0.298. With both paths reconstructed it
  is 0.374 at 24% of the slots, and the early-stage AUC rises too (0.897 against 0.887 for
  content alone);
- BCE on the plain dot product of the user's vector and dec(enc2(feat), freq) (eqs. 8-10,
  no temperature): the positive pair of the signal (label 1, or 0 when the pair's event is
  not that signal's) against the batch's other mature items as the user's sampled negatives
  (label 0, leaving out the items that user has in the batch), averaged so they weigh as
  much as the positive. Items as negatives, not users: the mapping must rank a user's items,
  and with users as negatives it learned to tell users apart per item instead, which cost
  early-stage AUC on MovieLens (0.79 against 0.89 with items, on the same frozen version).

It trains beside the main model, inside the same DeepSpeed engine, on detached inputs:
the mature embeddings, the user vectors and the content encoders' outputs are its targets
and features, not things it may move. What the decoder is told about frequency in
training is a random stage in [0, 1], because the items it learns from are all mature and
it must answer for items at any stage; at export an item's real stage goes in.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))


def stage(counts: torch.Tensor, maturity: float) -> torch.Tensor:
    """An item's normalised frequency: log1p(count) / log1p(M), capped at 1 (mature)."""
    return (torch.log1p(counts.float()) / torch.log1p(torch.tensor(float(max(maturity, 1))))).clamp(0, 1)


def wasserstein_diag(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Squared 2-Wasserstein distance between diagonal Gaussians fitted to the weighted rows of a and b."""
    w = weight / weight.sum().clamp_min(1e-6)
    mu_a, mu_b = (w[:, None] * a).sum(0), (w[:, None] * b).sum(0)
    sd_a = ((w[:, None] * (a - mu_a) ** 2).sum(0) + 1e-6).sqrt()
    sd_b = ((w[:, None] * (b - mu_b) ** 2).sum(0) + 1e-6).sqrt()
    return ((mu_a - mu_b) ** 2).sum() + ((sd_a - sd_b) ** 2).sum()


class SignalMapping(nn.Module):
    """enc1, enc2 and the shared decoder of one signal."""

    def __init__(self, semantic_dim: int, embedding_dim: int, hidden: int):
        super().__init__()
        self.enc1 = _mlp(embedding_dim, hidden, hidden)
        self.enc2 = _mlp(semantic_dim, hidden, hidden)
        self.dec = _mlp(hidden + 1, hidden, embedding_dim)

        # BCE needs a calibrated score: without an offset it can only lower p.u for every negative
        # user by moving p away from them all (on MovieLens the offset took AUC from 0.80 to 0.81)
        self.bias = nn.Parameter(torch.zeros(1))  # 1-d: DeepSpeed broadcasts parameters as bytes, not 0-d tensors
        nn.init.zeros_(self.dec[-1].weight)
        nn.init.zeros_(self.dec[-1].bias)

    def decode(self, e: torch.Tensor, freq: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        return F.normalize(base.float() + self.dec(torch.cat([e, freq.to(e.dtype)[:, None]], 1)).float(), dim=-1)

    def early(self, feat: torch.Tensor, freq: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """Eq. 12: the embedding of an item at stage `freq`, from its content alone (base: its unit content vector)."""
        return self.decode(self.enc2(feat), freq, base)


class Memer(nn.Module):
    """The semantic module plus one `SignalMapping` per signal."""

    def __init__(self, content_dim: int, embedding_dim: int, hidden: int, signals: list[str]):
        super().__init__()
        self.signals = list(signals)
        self.semantic = nn.Sequential(nn.Linear(2 * content_dim + embedding_dim + 1, hidden), nn.GELU())
        self.maps = nn.ModuleDict({s: SignalMapping(hidden, embedding_dim, hidden) for s in self.signals})

    def features(self, z_frames: torch.Tensor, z_text: torch.Tensor, content: torch.Tensor, has_frames: torch.Tensor) -> torch.Tensor:
        """Eq. 5, with the has-image flag as the auxiliary feature."""
        return self.semantic(torch.cat([z_frames, z_text, content, has_frames[:, None].to(z_frames.dtype)], 1))

    def early(self, feat: torch.Tensor, freq: torch.Tensor, base: torch.Tensor) -> dict[str, torch.Tensor]:
        return {s: m.early(feat, freq, base) for s, m in self.maps.items()}

    def loss(self, feat: torch.Tensor, base: torch.Tensor, mature_vecs: torch.Tensor, freq: torch.Tensor, mature: torch.Tensor,
             users: torch.Tensor, item_index: torch.Tensor, labels: torch.Tensor,
             weights: tuple[float, float, float]) -> torch.Tensor:
        """feat [U, h] fused content, base [U, D] unit content vectors and mature_vecs [U, D] (both
        detached) per distinct item, freq [U], mature [U] in {0,1}; users [B, D] (detached) and
        labels [B, S] per example, whose item is row item_index[b]. Items that are not mature
        weigh 0, so every parameter is always in the graph (ZeRO expects a gradient for each)
        even when no item of the batch is mature yet."""
        alpha, beta, gamma = weights
        mature = mature.float()
        pair_w = mature[item_index]
        own = F.one_hot(item_index, len(feat)).float()  # [B, U]
        eye = torch.eye(len(users), dtype=torch.bool, device=users.device)
        same_user = ((users @ users.T > 1 - 1e-6) | eye).float()  # eye: the example's own item, even for a zero user vector
        negative = ((same_user @ own) == 0).float() * mature[None, :]  # [B, U]: mature items no example of this user has
        total = feat.new_zeros((), dtype=torch.float32)
        for s, m in enumerate(self.maps.values()):
            e1, e2 = m.enc1(mature_vecs.to(feat.dtype)), m.enc2(feat)
            pred = m.decode(e2, freq, base)
            recon = ((m.decode(e1, freq, base) - mature_vecs.float()) ** 2).sum(1) + ((pred - mature_vecs.float()) ** 2).sum(1)
            logits = users @ pred.T + m.bias  # [B users, U items]
            pos = F.binary_cross_entropy_with_logits(logits.gather(1, item_index[:, None])[:, 0], labels[:, s].float(), reduction="none")
            neg = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
            neg = (neg * negative).sum(1) / negative.sum(1).clamp_min(1)
            bce = ((pos + neg) * pair_w).sum() / pair_w.sum().clamp_min(1)
            total = total + alpha * wasserstein_diag(e1.float(), e2.float(), mature) \
                + beta * (recon * mature).sum() / mature.sum().clamp_min(1) + gamma * bce
        return total * (mature.sum() > 0)
