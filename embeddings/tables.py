"""The ID tables: TorchRec managed collisions over row-wise shards, and how they are sharded.

Users and items carry unbounded ids (streaming.schema: any integer below 2**62 or any
string, as one int64 key). A table holds a fixed number of rows (`model.user_rows`,
`model.item_rows`); an `MCHManagedCollisionModule` per table maps keys to rows and evicts
the least valuable id when a new one needs room (checked every step on shards of up to 100k
rows, amortised beyond: see `eviction_interval`). An
evicted row is reset (weights and optimizer state) before its new id trains it, and is
counted. The policy is TorchRec's distance-weighted LFU (count over steps since last seen):
plain LFU would let yesterday's hits hold their rows for ever against today's new items.
An id without a row shares the table's last row (the "miss" row), and at export
an item without a row falls back to its content vector. The remap state (which key holds
which row, LFU counts) is part of the module's state dict, so checkpoints keep it.

Keys are mixed (`spread`) before the lookup: TorchRec routes an id to the rank that
owns its block of the input range, so dense integer ids would all land on rank 0.

Every table is sharded row-wise with one fused RowWiseAdagrad, applied in backward as in
TorchRec's examples; TorchRec groups the four tables into one fused lookup (splitting the
tiny cluster tables off doubled the sparse step's cost on an H100). The cluster tables go
through the same managed-collision collection, which must cover every table; their ids
are bounded (k-means cluster numbers), so they never evict.
"""
from __future__ import annotations

import functools
import logging

import numpy as np
import torch
import torch.distributed as dist
from torchrec import EmbeddingCollection, EmbeddingConfig
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.mc_embedding import ManagedCollisionEmbeddingCollectionSharder
from torchrec.distributed.mc_embedding_modules import BaseShardedManagedCollisionEmbeddingCollection
from torchrec.distributed.mc_modules import ManagedCollisionCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig
from torchrec.distributed.types import ShardingType
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingCollection
from torchrec.modules.mc_modules import DistanceLFU_EvictionPolicy, ManagedCollisionCollection, MCHManagedCollisionModule
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from trainer.batch import KEY_RANGE
from trainer.config import ID_BUCKETS, ModelConfig
from trainer.model import FRAME_CLUSTER, ITEM, TEXT_CLUSTER, USER, SparseArch

log = logging.getLogger(__name__)

def rounded_rows(n: int) -> int:
    return -(-n // ID_BUCKETS) * ID_BUCKETS


class CountingMCH(MCHManagedCollisionModule):
    """MCH that counts evictions (rows taken from a live id, not empty rows filled) and never drops
    an id it is shown. (TorchRec rebuilds sharded modules with `type(self)`, so shards do both.)

    TorchRec sizes the buffer of ids seen between two eviction rounds from the first training batch
    (x 1.25) and silently truncates later batches to it. Our first batches carry no histories, the
    later ones up to `history_length` items per example, so most new ids were cut: on MovieLens 1,032
    of 1,682 items never got a row and were served by the shared miss row. The buffer grows instead."""

    evictions: int = 0

    def profile(self, features: dict) -> dict:
        if self.training and self._input_history_buffer_size != -1:
            needed = self._current_history_buffer_offset + sum(f.values().numel() for f in features.values())
            if needed > self._input_history_buffer_size:
                self._grow_history(2 * needed)
        return super().profile(features)

    def _grow_history(self, size: int) -> None:
        """Reallocates the history accumulator and its metadata buffers at `size`, keeping what they hold."""
        kept = self._current_history_buffer_offset
        grown = torch.empty(size, dtype=torch.int64, device=self._history_accumulator.device)
        grown[:kept] = self._history_accumulator[:kept]
        self._history_accumulator = grown
        for name, old in list(self._history_metadata.items()):
            new = torch.zeros(size, dtype=old.dtype, device=old.device)
            new[:kept] = old[:kept]
            self.register_buffer("_history_" + name, new, persistent=False)
            self._history_metadata[name] = new
        self._input_history_buffer_size = size

    def _update_and_evict(self, *args) -> None:
        open_before = int(self.open_slots())
        super()._update_and_evict(*args)
        # every round's new ids took `inserted` rows; those that were open were no eviction
        self.evictions += int(self._evicted_emb_indices.numel()) - (open_before - int(self.open_slots()))


def init_bound(dim: int) -> float:
    """Rows start uniform in +-this: unit expected norm, whatever the table's size.

    TorchRec's default is +-sqrt(1 / rows), a norm of 0.06 at 20,000 rows and less the larger the
    table. The model reads rows as directions (its vectors are normalised), so a row's gradient scales
    with 1 / its norm, and RowWiseAdagrad's accumulator keeps that first, huge gradient for ever: every
    later step is too small to turn the row. An ID-only model on these tables and MovieLens's training rows
    (README, "Model") reached warm recall@20 0.04 from the default start and 0.43 from this one."""
    return (3.0 / dim) ** 0.5


def table_configs(cfg: ModelConfig) -> list[EmbeddingConfig]:
    dim, clusters = cfg.embedding_dim, rounded_rows(cfg.n_clusters) + ID_BUCKETS  # + a miss row per shard
    b = init_bound(dim)
    return [EmbeddingConfig(name=name, embedding_dim=dim, num_embeddings=rows, feature_names=[feature], weight_init_min=-b, weight_init_max=b)
            for name, rows, feature in (("user_ids", rounded_rows(cfg.user_rows), USER), ("item_ids", rounded_rows(cfg.item_rows), ITEM),
                                        ("frame_clusters", clusters, FRAME_CLUSTER), ("text_clusters", clusters, TEXT_CLUSTER))]


# An eviction check sorts the shard's rows (TorchRec's MCH re-sorts its id buffers each time), so it
# runs every step while a shard holds up to this many rows, and every rows / SORT_ROWS_PER_STEP steps
# beyond: the sort is amortised, and a new id waits that many steps on the miss row (measured by
# benchmarks/scaling.py: checking every step cut the embedding step from 300k to 10k examples/s at 10M).
SORT_ROWS_PER_STEP = 100_000


def eviction_interval(rows: int, world: int) -> int:
    return max(1, -(-rows // world) // SORT_ROWS_PER_STEP)


def managed_tables(cfg: ModelConfig, world: int = 1) -> tuple[list[EmbeddingConfig], ManagedCollisionEmbeddingCollection]:
    """The four tables on the meta device, each behind a managed-collision module; `world`: the ranks
    the tables will be sharded over (it sets how often each shard checks for evictions)."""
    tables = table_configs(cfg)
    input_range = {USER: KEY_RANGE, ITEM: KEY_RANGE, FRAME_CLUSTER: rounded_rows(cfg.n_clusters), TEXT_CLUSTER: rounded_rows(cfg.n_clusters)}
    meta = torch.device("meta")
    modules = {t.name: CountingMCH(zch_size=t.num_embeddings, device=meta, eviction_policy=DistanceLFU_EvictionPolicy(),
                                   eviction_interval=eviction_interval(t.num_embeddings, world),
                                   input_hash_size=input_range[t.feature_names[0]], buckets=ID_BUCKETS, name=t.name)
               for t in tables}
    mc = ManagedCollisionEmbeddingCollection(EmbeddingCollection(tables=tables, device=meta),
                                             ManagedCollisionCollection(modules, tables),
                                             allow_in_place_embed_weight_update=True)
    return tables, mc


def _reset_host_rows(tbe, pruned_indices: torch.Tensor, pruned_indices_offsets: torch.Tensor,
                     logical_table_ids: torch.Tensor, buffer_ids: torch.Tensor) -> None:
    """CPU stand-in for fbgemm's reset_weight_momentum (CUDA-only in fbgemm-gpu 1.x): zeroes the
    evicted rows and their RowWiseAdagrad state in the host-side fused buffers. TorchRec then
    re-initialises the rows' weights, as on the GPU."""
    for k, t in enumerate(logical_table_ids.tolist()):
        rows = pruned_indices[int(pruned_indices_offsets[k]):int(pruned_indices_offsets[k + 1])].long()
        dim = int(tbe.D_offsets[t + 1] - tbe.D_offsets[t])
        tbe.weights_host[(int(tbe.weights_offsets[t]) + rows[:, None] * dim + torch.arange(dim)).reshape(-1)] = 0
        tbe.momentum1_host[int(tbe.momentum1_offsets[t]) + rows] = 0


def shard_row_wise(module: torch.nn.Module, tables: list[EmbeddingConfig], device: torch.device, sparse_lr: float,
                   managed: bool = True) -> DistributedModelParallel:
    """Shards a meta-device module holding `tables` (behind managed collisions, or a plain
    EmbeddingCollection with `managed=False`): every table row-wise, one fused RowWiseAdagrad in
    backward; DMP materialises only this rank's shards."""
    apply_optimizer_in_backward(RowWiseAdagrad, list(module.parameters()), {"lr": sparse_lr})
    constraints = {t.name: ParameterConstraints(sharding_types=[ShardingType.ROW_WISE.value], compute_kernels=["fused"])
                   for t in tables}
    topology = TopologyFactory.create_topology(TrainerConfig(world_size=dist.get_world_size()),
                                               kernel_config=KernelConfig(compute_device=device.type))
    sharders = ([ManagedCollisionEmbeddingCollectionSharder(EmbeddingCollectionSharder(), ManagedCollisionCollectionSharder())]
                if managed else [EmbeddingCollectionSharder()])
    plan = EmbeddingShardingPlanner(topology=topology, constraints=constraints).collective_plan(module, sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(module, device=device, plan=plan, sharders=sharders)
    if device.type == "cpu":
        for mod in dmp.modules():
            if isinstance(mod, BaseShardedManagedCollisionEmbeddingCollection):
                for tbe, _ in mod._table_to_tbe_and_index.values():
                    tbe.reset_embedding_weight_momentum = functools.partial(_reset_host_rows, tbe)
    return dmp


def shard_sparse_arch(cfg: ModelConfig, device: torch.device, sparse_lr: float) -> DistributedModelParallel:
    """The project's ID tables (users, items, cluster IDs), sharded by `shard_row_wise`."""
    tables, mc = managed_tables(cfg, dist.get_world_size())
    return shard_row_wise(SparseArch(mc), tables, device, sparse_lr)


def _local_modules(sparse: torch.nn.Module) -> dict[str, CountingMCH]:
    return {m._name: m for m in sparse.modules() if isinstance(m, CountingMCH)}


def evictions(sparse: torch.nn.Module) -> dict[str, int]:
    """Evictions so far in this rank's shards, per table (sum over ranks for the whole table)."""
    return {name: m.evictions for name, m in _local_modules(sparse).items()}


@torch.no_grad()
def holds_row(sparse: torch.nn.Module, table: str, spread_keys: np.ndarray, group: dist.ProcessGroup | None = None) -> np.ndarray:
    """Whether each (spread) key holds a row of `table` now; a collective over `group` (gloo: host tensors).
    An id that lost its row, or never got one, is looked up as the shared miss row."""
    m = _local_modules(sparse)[table]
    held = m._mch_sorted_raw_ids[:-1].cpu()  # the last slot is the miss row: never an id's own
    mask = torch.isin(torch.from_numpy(np.asarray(spread_keys, np.int64)), held).to(torch.int32)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(mask, group=group)
    return mask.numpy() > 0
