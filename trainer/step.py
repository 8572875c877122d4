"""One training step across the two engines, and vector export for publication.

The sparse tables (DMP, fused optimizer in backward) and the dense engine
(DeepSpeed) share one autograd graph: `engine.backward(loss)` reaches the embedding
lookups, whose fused optimizers update the touched rows during that same backward;
`engine.step()` then updates the dense weights.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from trainer.batch import Batch, ContentStore, cluster_kjt, gather_content, item_kjt, user_kjt
from trainer.history import Histories
from trainer.losses import bpr_loss, in_batch_softmax_loss
from trainer.model import FRAME_CLUSTER, ITEM, TEXT_CLUSTER, USER


def history_embeddings(emb: dict[str, torch.Tensor], index: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    """(item ID, frame cluster, text cluster) embeddings [B, L, D] of each example's history, or None
    without one. When no history item was looked up at all (every position empty), zeros: the
    positions are all masked, and the tower attends to the user alone."""
    if index.shape[1] == 0:
        return None
    if len(emb[ITEM]) == 0:
        return tuple(emb[USER].new_zeros((*index.shape, emb[USER].shape[1])) for _ in range(3))
    return tuple(emb[k][index] for k in (ITEM, FRAME_CLUSTER, TEXT_CLUSTER))


class TrainStep:
    def __init__(self, sparse: torch.nn.Module, engine, temperature: float, device: torch.device, loss: str = "softmax"):
        self.sparse, self.engine, self.temperature, self.device, self.loss = sparse, engine, temperature, device, loss

    def __call__(self, batch: Batch) -> torch.Tensor:
        """Returns the loss as a device tensor: reading it would make the host wait for the GPU."""
        b = batch.to(self.device)
        frames, tokens, has_frames = gather_content(b.content, b.slots)
        emb = self.sparse(b.kjt)
        n = len(b.slots)  # the batch's distinct items; history-only items follow them in the item lookups
        memer = (b.item_index, b.freq, b.mature, b.labels) if b.labels.shape[1] else None
        users, items, aux_loss = self.engine(emb[USER], emb[ITEM][:n], emb[FRAME_CLUSTER][:n], emb[TEXT_CLUSTER][:n], frames, tokens,
                                             has_frames, b.id_keep, b.item_counts, history_embeddings(emb, b.hist_index), b.hist_pad, memer)
        if self.loss == "bpr":
            loss = bpr_loss(users, items[b.item_index], b.user_ids, b.item_ids, self.temperature)
        else:
            loss = in_batch_softmax_loss(users, items[b.item_index], b.user_ids, b.item_ids, self.temperature, b.item_log_q, b.user_log_q,
                                         symmetric=self.loss == "symmetric", negatives=items[b.negative_index], negative_ids=b.negative_ids)
        loss = loss + aux_loss
        self.engine.backward(loss)
        self.engine.step()
        return loss.detach()


def _chunks(ids: np.ndarray, rank: int, world: int, size: int) -> list[np.ndarray]:
    """This rank's share of ids, in chunks; every rank gets the same number of chunks
    because each sharded lookup is a collective."""
    per_rank = -(-len(ids) // world)
    return _padded(ids[rank::world], ids, max(1, -(-per_rank // size)), size)


def _padded(mine: np.ndarray, ids: np.ndarray, n_chunks: int, size: int) -> list[np.ndarray]:
    """`mine` in `n_chunks` chunks of up to `size`; chunks past its end (or all, when it is empty)
    repeat one id, so that the rank still takes part in each lookup."""
    if len(mine) == 0:
        mine = ids[:1]
    return [mine[c * size:(c + 1) * size] if c * size < len(mine) else mine[:1] for c in range(n_chunks)]


def _user_shares(user_ids: np.ndarray, histories: Histories | None, rank: int, world: int, size: int,
                 group: dist.ProcessGroup | None) -> list[np.ndarray]:
    """This rank's users, in chunks (the same number on every rank: each lookup is a collective).
    With histories, a rank takes the users whose history it holds (it alone has it), and shares
    out the users nobody holds one for; without, every rank takes a round-robin share."""
    if histories is None or world == 1:
        return _chunks(user_ids, rank, world, size)
    held = histories.users()
    held = held[np.isin(held, user_ids)]
    everyone, _ = gather_rows(torch.from_numpy(held), torch.from_numpy(held)[:, None], group)
    mine = np.concatenate([held, np.setdiff1d(user_ids, everyone)[rank::world]])
    n = torch.tensor([-(-len(mine) // size)])
    dist.all_reduce(n, op=dist.ReduceOp.MAX, group=group)
    return _padded(mine, user_ids, max(1, int(n[0])), size)


def _use_frozen_clusters(emb: dict[str, torch.Tensor], store: ContentStore, items: np.ndarray,
                         clusters: tuple[np.ndarray, np.ndarray] | None, device: torch.device) -> None:
    """Replaces the looked-up cluster embeddings of `items` (in lookup order) by the frozen rows, if any."""
    if clusters is None or len(items) == 0:
        return
    slots = store.slots(items)
    emb[FRAME_CLUSTER] = torch.from_numpy(clusters[0][store.frame_cluster[slots]]).to(device)
    emb[TEXT_CLUSTER] = torch.from_numpy(clusters[1][store.text_cluster[slots]]).to(device)


@torch.no_grad()
def export_vectors(sparse, dense, store: ContentStore, item_ids: np.ndarray, user_ids: np.ndarray, stages: np.ndarray,
                   device: torch.device, chunk: int = 256, group: dist.ProcessGroup | None = None,
                   clusters: tuple[np.ndarray, np.ndarray] | None = None, positives: np.ndarray | None = None,
                   histories: Histories | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Unit vectors for the given items and users, computed by all ranks together.

    Per item, every variant the publisher may serve: "full" (content + ID embedding: a mature
    item), "content" (content alone), and per MEMER signal s "early_s" (the mapping at the
    item's stage, `stages[k]` in [0, 1]). Every rank returns the full result (gathered), in the
    order of the ids given. All ranks must pass the same ids. `group` carries the gathers (a gloo
    group: the vectors travel as host tensors, padded to the longest rank's share). `clusters`:
    cluster embeddings (frames [k, D], text [k, D]) to use instead of the live cluster tables (the
    ones frozen with an encoder version, see cluster.worker).
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    dense_was, sparse_was = dense.training, sparse.training
    dense.eval()
    sparse.eval()  # a lookup in training mode would claim rows for the ids it reads (managed collisions)
    stage_of = dict(zip(item_ids.tolist(), stages.tolist()))
    positives_of = dict(zip(item_ids.tolist(), (np.zeros(len(item_ids)) if positives is None else positives).tolist()))
    names: list[str] = []
    item_keys, item_rows = [], []  # this rank's share: keys and [n, variants, D]
    for part in _chunks(item_ids, rank, world, chunk):
        emb = sparse(item_kjt(store, part).to(device))
        _use_frozen_clusters(emb, store, part, clusters, device)
        frames, tokens, has_frames = (t.to(device) for t in gather_content(store.content(), torch.from_numpy(store.slots(part))))
        content, id_part, feat = dense.item_parts(emb[ITEM], emb[FRAME_CLUSTER], emb[TEXT_CLUSTER], frames, tokens, has_frames)
        counts = torch.tensor([positives_of[int(i)] for i in part], device=device)
        variants = {"full": dense.combine(content, id_part, torch.ones(len(part), device=device), counts),
                    "content": dense.as_new(content)}
        if dense.memer is not None:
            freq = torch.tensor([stage_of[int(i)] for i in part], device=device)
            variants |= {f"early_{s}": v for s, v in dense.memer.early(feat, freq, variants["content"]).items()}
        names = list(variants)
        item_keys.append(torch.from_numpy(part))
        item_rows.append(torch.stack(list(variants.values()), 1).float().cpu())
    user_keys, user_rows = [], []
    read_history = dense.user_tower is not None and histories is not None
    for part in _user_shares(user_ids, histories if read_history else None, rank, world, 4 * chunk, group):
        kjt, looked_up, index, pad = user_kjt(store, part, histories.get(part) if read_history else None)
        emb = sparse(kjt.to(device))
        _use_frozen_clusters(emb, store, looked_up, clusters, device)  # the history's cluster embeddings: the frozen ones too
        hist = history_embeddings(emb, torch.from_numpy(index).to(device))
        user_keys.append(torch.from_numpy(part))
        user_rows.append(dense.user_vector(emb[USER][: len(part)], hist, torch.from_numpy(pad).to(device))[0].float().cpu())
    dense.train(dense_was)
    sparse.train(sparse_was)  # not dense's: the encoder copy is always in eval mode, and the tables must go on training
    items = _in_order(item_ids, *gather_rows(torch.cat(item_keys), torch.cat(item_rows), group))
    users = _in_order(user_ids, *gather_rows(torch.cat(user_keys), torch.cat(user_rows), group))
    return {n: np.ascontiguousarray(items[:, k]) for k, n in enumerate(names)}, users


def gather_rows(keys: torch.Tensor, rows: torch.Tensor, group: dist.ProcessGroup | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Every rank's (keys [n], rows [n, ...]) on every rank, as tensors: shares are padded to the
    longest, gathered, and cut back (a collective; host tensors on a gloo group)."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return keys.numpy(), rows.numpy()
    world = dist.get_world_size(group)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([len(keys)]), group=group)
    longest = int(max(sizes)[0])
    pad_keys = torch.zeros(longest, dtype=torch.int64)
    pad_keys[: len(keys)] = keys
    pad_rows = rows.new_zeros((longest, *rows.shape[1:]))
    pad_rows[: len(rows)] = rows
    all_keys, all_rows = [torch.empty_like(pad_keys) for _ in range(world)], [torch.empty_like(pad_rows) for _ in range(world)]
    dist.all_gather(all_keys, pad_keys, group=group)
    dist.all_gather(all_rows, pad_rows, group=group)
    n = [int(s[0]) for s in sizes]
    return (torch.cat([k[:m] for k, m in zip(all_keys, n)]).numpy(), torch.cat([r[:m] for r, m in zip(all_rows, n)]).numpy())


def _in_order(wanted: np.ndarray, keys: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """rows for `wanted` keys, in that order (shares may repeat a padding key; any copy will do)."""
    order = np.argsort(keys, kind="stable")
    return rows[order[np.searchsorted(keys, wanted, sorter=order)]].astype(np.float32)


@torch.no_grad()
def cluster_rows(sparse, n_frame: int, n_text: int, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """The trained cluster embeddings (frames [n_frame, D], text [n_text, D]); a collective lookup."""
    was_training = sparse.training
    sparse.eval()
    emb = sparse(cluster_kjt(n_frame, n_text).to(device))
    sparse.train(was_training)
    return emb[FRAME_CLUSTER].float().cpu().numpy(), emb[TEXT_CLUSTER].float().cpu().numpy()


def run_progress(step: int, max_steps: int | None, elapsed_s: float, duration_s: float | None, examples_per_step: int,
                 held: float, passes: float | None) -> float:
    """How far the learning-rate schedule is, in [0, 1+]: the share of max_steps, of the time budget, or
    of `passes` passes over the `held` positives (the replay windows), whichever is furthest.

    The passes follow the data: a replayed dataset anneals after so many passes over it however long
    the budget (a 10-minute MovieLens run kept the peak rate for 12 passes and overfitted), while on a
    live stream new positives lower the count, so the rate rises again with fresh data."""
    progress = step / max_steps if max_steps else 0.0
    progress = max(progress, elapsed_s / duration_s) if duration_s else progress
    if passes and held:
        progress = max(progress, step * examples_per_step / (passes * held))
    return progress


def lr_factor(progress: float, warmup: float, floor: float) -> float:
    """The cosine schedule's multiplier at `progress` in [0, 1] of the run (`run_progress`): linear
    warm-up to 1 over `warmup`, then cosine down to `floor`, where it stays past the end."""
    if progress < warmup:
        return max(progress / warmup, 0.01)
    t = min((progress - warmup) / max(1.0 - warmup, 1e-9), 1.0)
    return floor + (1.0 - floor) * 0.5 * (1.0 + np.cos(np.pi * t))


def set_learning_rates(engine, sparse, dense_lr: float, sparse_lr: float) -> None:
    """Both optimizers' rates: the dense one's param groups, and the fused table optimizers' (TorchRec
    hands a group's lr to the fbgemm kernels on its `step`, which applies no update in backward mode)."""
    for group in engine.optimizer.param_groups:
        group["lr"] = dense_lr
    for group in sparse.fused_optimizer.param_groups:
        group["lr"] = sparse_lr
    sparse.fused_optimizer.step()
