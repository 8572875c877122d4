"""Symmetric in-batch contrastive rating loss (seed 000, eq. 1), with false-negative filtering."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def in_batch_softmax_loss(users: torch.Tensor, items: torch.Tensor, user_ids: torch.Tensor, item_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """users, items: [B, D] unit vectors of positive pairs; row b's positive is column b.

    Other columns holding the same item (or rows holding the same user) are the same
    entity, not a negative, so they are masked out of the denominators.
    """
    logits = users @ items.T / temperature
    diag = torch.eye(len(users), dtype=torch.bool, device=users.device)
    same_item = (item_ids[None, :] == item_ids[:, None]) & ~diag
    same_user = (user_ids[:, None] == user_ids[None, :]) & ~diag
    target = torch.arange(len(users), device=users.device)
    user_to_item = F.cross_entropy(logits.masked_fill(same_item, float("-inf")), target)
    item_to_user = F.cross_entropy(logits.T.masked_fill(same_user, float("-inf")), target)
    return user_to_item + item_to_user
