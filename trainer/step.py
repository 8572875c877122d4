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
import torch.nn.functional as F

from trainer.batch import Batch, ContentStore, cluster_kjt, gather_content, item_kjt, user_kjt
from trainer.losses import in_batch_softmax_loss
from trainer.model import FRAME_CLUSTER, ITEM, TEXT_CLUSTER, USER


class TrainStep:
    def __init__(self, sparse: torch.nn.Module, engine, temperature: float, device: torch.device):
        self.sparse, self.engine, self.temperature, self.device = sparse, engine, temperature, device

    def __call__(self, batch: Batch) -> torch.Tensor:
        """Returns the loss as a device tensor: reading it would make the host wait for the GPU."""
        b = batch.to(self.device)
        frames, tokens, has_frames = gather_content(b.content, b.slots)
        emb = self.sparse(b.kjt)
        memer = (b.item_index, b.freq, b.mature, b.labels) if b.labels.shape[1] else None
        users, items, memer_loss = self.engine(emb[USER], emb[ITEM], emb[FRAME_CLUSTER], emb[TEXT_CLUSTER], frames, tokens,
                                               has_frames, b.id_keep, memer)
        loss = in_batch_softmax_loss(users, items[b.item_index], b.user_ids, b.item_ids, self.temperature, b.item_log_q, b.user_log_q)
        loss = loss + memer_loss
        self.engine.backward(loss)
        self.engine.step()
        return loss.detach()


def _chunks(ids: np.ndarray, rank: int, world: int, size: int) -> list[np.ndarray]:
    """This rank's share of ids, in chunks; every rank gets the same number of chunks
    (padded by repeating its first id) because each sharded lookup is a collective."""
    mine = ids[rank::world]
    per_rank = -(-len(ids) // world)
    n_chunks = max(1, -(-per_rank // size))
    if len(mine) == 0:
        mine = ids[:1]
    return [mine[c * size:(c + 1) * size] if c * size < len(mine) else mine[:1] for c in range(n_chunks)]


@torch.no_grad()
def export_vectors(sparse, dense, store: ContentStore, item_ids: np.ndarray, user_ids: np.ndarray, stages: np.ndarray,
                   device: torch.device, chunk: int = 256, group: dist.ProcessGroup | None = None,
                   clusters: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
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
    names: list[str] = []
    item_keys, item_rows = [], []  # this rank's share: keys and [n, variants, D]
    for part in _chunks(item_ids, rank, world, chunk):
        emb = sparse(item_kjt(store, part).to(device))
        if clusters is not None:
            slots = store.slots(part)
            emb[FRAME_CLUSTER] = torch.from_numpy(clusters[0][store.frame_cluster[slots]]).to(device)
            emb[TEXT_CLUSTER] = torch.from_numpy(clusters[1][store.text_cluster[slots]]).to(device)
        frames, tokens, has_frames = (t.to(device) for t in gather_content(store.content(), torch.from_numpy(store.slots(part))))
        content, id_part, feat = dense.item_parts(emb[ITEM], emb[FRAME_CLUSTER], emb[TEXT_CLUSTER], frames, tokens, has_frames)
        variants = {"full": F.normalize((content + id_part).float(), dim=-1), "content": F.normalize(content.float(), dim=-1)}
        if dense.memer is not None:
            freq = torch.tensor([stage_of[int(i)] for i in part], device=device)
            variants |= {f"early_{s}": v for s, v in dense.memer.early(feat, freq, variants["content"]).items()}
        names = list(variants)
        item_keys.append(torch.from_numpy(part))
        item_rows.append(torch.stack(list(variants.values()), 1).float().cpu())
    user_keys, user_rows = [], []
    for part in _chunks(user_ids, rank, world, 4 * chunk):
        user_keys.append(torch.from_numpy(part))
        user_rows.append(dense.user_vector(sparse(user_kjt(part).to(device))[USER]).float().cpu())
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
