"""The training losses: the in-batch contrastive rating loss (user -> item as CLCRec's L_UI, or
symmetric as seed 000's eq. 1) with false-negative filtering, BPR over in-batch negatives (M3CSR
eq. 12), and the InfoNCE that CLCRec's R-E contrast and seed 000's modality alignment both use."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def in_batch_softmax_loss(users: torch.Tensor, items: torch.Tensor, user_ids: torch.Tensor, item_ids: torch.Tensor, temperature: float,
                          item_log_q: torch.Tensor | None = None, user_log_q: torch.Tensor | None = None,
                          symmetric: bool = False, negatives: torch.Tensor | None = None,
                          negative_ids: torch.Tensor | None = None) -> torch.Tensor:
    """users, items: [B, D] unit vectors of positive pairs; row b's positive is column b.
    negatives [K, D] (ids [K]): skipped items, extra columns of every user's softmax (no logQ: they are
    sampled by skips, and being passed over is what they should learn); a row's own item is masked.

    The retrieval task ranks items for a user, so the loss is the user -> item softmax; `symmetric`
    adds seed 000's item -> user direction (eq. 1). In an ID-only probe it cost ranking quality (an
    item's softmax over users pulls users toward every item they touched); in the full model the
    two were within one seed's noise (README, "Tuning" and the ablation after it).

    Other columns holding the same item (or rows holding the same user) are the same
    entity, not a negative, so they are masked out of the denominators.

    In-batch negatives are drawn in proportion to how often an item is a positive, so a
    plain softmax learns to push popular items down. `item_log_q` / `user_log_q` [B]
    (log sampling frequency) apply the logQ correction (Yi et al., RecSys 2019): each
    logit is lowered by the log-frequency of the entity it scores.
    """
    raw = users @ items.T / temperature
    user_to_item_logits = raw if item_log_q is None else raw - item_log_q[None, :]
    diag = torch.eye(len(users), dtype=torch.bool, device=users.device)
    same_item = (item_ids[None, :] == item_ids[:, None]) & ~diag
    target = torch.arange(len(users), device=users.device)
    user_to_item_logits = user_to_item_logits.masked_fill(same_item, float("-inf"))
    if negatives is not None and len(negatives):
        skipped = (users @ negatives.T / temperature).masked_fill(item_ids[:, None] == negative_ids[None, :], float("-inf"))
        user_to_item_logits = torch.cat([user_to_item_logits, skipped], 1)
    user_to_item = F.cross_entropy(user_to_item_logits, target)
    if not symmetric:
        return user_to_item
    item_to_user_logits = (raw if user_log_q is None else raw - user_log_q[:, None]).T
    same_user = (user_ids[:, None] == user_ids[None, :]) & ~diag
    return user_to_item + F.cross_entropy(item_to_user_logits.masked_fill(same_user, float("-inf")), target)


def _same_entity(user_ids: torch.Tensor, item_ids: torch.Tensor) -> torch.Tensor:
    """[B, B]: column j is no negative for row b (the same item, or the same user, off the diagonal)."""
    diag = torch.eye(len(user_ids), dtype=torch.bool, device=user_ids.device)
    return ((item_ids[None, :] == item_ids[:, None]) | (user_ids[:, None] == user_ids[None, :])) & ~diag


def bpr_loss(users: torch.Tensor, items: torch.Tensor, user_ids: torch.Tensor, item_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """-log sigmoid(s(u, i+) - s(u, i-)), averaged over each positive pair and every other item of
    the batch as its negative (an item the user also has in the batch is not one)."""
    scores = users @ items.T / temperature
    margin = scores.diagonal()[:, None] - scores
    negative = ~_same_entity(user_ids, item_ids) & ~torch.eye(len(users), dtype=torch.bool, device=users.device)
    return (F.softplus(-margin) * negative).sum() / negative.sum().clamp_min(1)


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE between rows of a and b [N, D] (row n of each is the positive pair), on unit vectors."""
    if len(a) < 2:
        return a.float().sum() * 0
    logits = F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T / temperature
    target = torch.arange(len(a), device=a.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
