"""Embedding table specs and how they are sharded across the Ray workers.

Every table is sharded row-wise (each worker holds a slice of rows) with one fused
RowWiseAdagrad optimizer, applied in backward as in TorchRec's examples. Tables that
share a sharding type, kernel and optimizer are grouped by TorchRec into one fused
lookup: one forward and one backward kernel for all four tables. Splitting the tiny
cluster tables off (table-wise, another optimizer) doubled the sparse step's cost on
an H100. The fused CPU kernels offer SGD, Adagrad and RowWiseAdagrad; Adam is GPU-only.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torchrec import EmbeddingConfig
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig
from torchrec.distributed.types import ShardingType
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from trainer.config import ModelConfig
from trainer.model import FRAME_CLUSTER, ITEM, TEXT_CLUSTER, USER, SparseArch


def table_configs(cfg: ModelConfig) -> list[EmbeddingConfig]:
    dim = cfg.embedding_dim
    return [
        EmbeddingConfig(name="user_ids", embedding_dim=dim, num_embeddings=cfg.max_users, feature_names=[USER]),
        EmbeddingConfig(name="item_ids", embedding_dim=dim, num_embeddings=cfg.max_items, feature_names=[ITEM]),
        EmbeddingConfig(name="frame_clusters", embedding_dim=dim, num_embeddings=cfg.n_clusters, feature_names=[FRAME_CLUSTER]),
        EmbeddingConfig(name="text_clusters", embedding_dim=dim, num_embeddings=cfg.n_clusters, feature_names=[TEXT_CLUSTER]),
    ]


def shard_row_wise(module: torch.nn.Module, tables: list[EmbeddingConfig], device: torch.device,
                   sparse_lr: float) -> DistributedModelParallel:
    """Shards a meta-device module holding an EmbeddingCollection of `tables`: every table row-wise,
    one fused RowWiseAdagrad in backward; DMP materialises only this rank's shards."""
    apply_optimizer_in_backward(RowWiseAdagrad, list(module.parameters()), {"lr": sparse_lr})
    constraints = {t.name: ParameterConstraints(sharding_types=[ShardingType.ROW_WISE.value]) for t in tables}
    topology = TopologyFactory.create_topology(TrainerConfig(world_size=dist.get_world_size()),
                                               kernel_config=KernelConfig(compute_device=device.type))
    sharders = [EmbeddingCollectionSharder()]
    plan = EmbeddingShardingPlanner(topology=topology, constraints=constraints).collective_plan(module, sharders, dist.GroupMember.WORLD)
    return DistributedModelParallel(module, device=device, plan=plan, sharders=sharders)


def shard_sparse_arch(cfg: ModelConfig, device: torch.device, sparse_lr: float) -> DistributedModelParallel:
    """The project's ID tables (users, items, cluster IDs), sharded by `shard_row_wise`."""
    tables = table_configs(cfg)
    return shard_row_wise(SparseArch(tables, device="meta"), tables, device, sparse_lr)
