"""2-process gloo: the ID tables sharded by DistributedModelParallel and the dense
part as a DeepSpeed engine, updated together by one backward pass."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cluster.broker import free_port
from cluster.devices import deepspeed_config
from trainer.config import ModelConfig

pytestmark = pytest.mark.integration

CFG = ModelConfig(user_rows=96, item_rows=48, n_clusters=4, embedding_dim=16, d_model=16, heads=2, frame_layers=1,
                  text_layers=1, frames=2, frame_size=16, patch=8, text_vocab=64, text_len=4, id_dropout=0.0)


def _store(rng: np.random.Generator):
    from trainer.batch import ContentStore

    store = ContentStore(CFG)
    for i in range(8):
        store.add(i, rng.integers(0, 255, (2, 16, 16, 3), dtype=np.uint8), True, f"word{i} other", i % 4, (i + 1) % 4)
    return store


def _batch(rank: int, users: np.ndarray | None = None):
    from trainer.batch import make_batch
    from trainer.counts import KeyedCounts

    rng = np.random.default_rng(rank)
    store = _store(rng)
    # users 0..7 on rank 0, 40..47 on rank 1: with row-wise sharding each rank's users live on different shards
    users = np.arange(8) + 40 * rank if users is None else users
    return make_batch(users, np.arange(8), store, 1.0, rng, KeyedCounts(), KeyedCounts())


def _worker(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    import deepspeed

    from embeddings.tables import evictions, holds_row, shard_sparse_arch
    from trainer.batch import spread
    from trainer.model import DenseArch
    from trainer.step import TrainStep

    sparse = shard_sparse_arch(CFG, torch.device("cpu"), sparse_lr=0.1)
    dense = DenseArch(CFG)
    engine, *_ = deepspeed.initialize(model=dense, optimizer=torch.optim.AdamW(dense.parameters(), lr=1e-2),
                                      config=deepspeed_config(8, 2, 1, 0.0, False), dist_init_required=False)
    plan = sparse.plan.plan["mc_ec"]
    local_rows = {name: sum(s.tensor.shape[0] for s in t.local_shards()) for name, t in sparse.state_dict().items() if "weight" in name}

    def user_rows() -> torch.Tensor:
        return torch.cat([s.tensor for s in sparse.state_dict()["mc_ec._embedding_module.embeddings.user_ids.weight"].local_shards()]).clone()

    before_users = user_rows()
    before_dense = [p.detach().clone() for p in engine.module.parameters()]
    step = TrainStep(sparse, engine, CFG.temperature, torch.device("cpu"))
    batch = _batch(rank)
    losses = [step(batch) for _ in range(15)]
    after_users = user_rows()
    users_held = holds_row(sparse, "user_ids", spread(np.r_[np.arange(8), np.arange(8) + 40]))  # a collective: the same keys on every rank
    # 7x more users than rows: new ids take rows from old ones (evicted: reset and counted)
    for n in range(40):
        new_users = np.arange(8) + 1000 + 16 * n + 8 * rank
        step(_batch(rank, new_users))
    last_held = holds_row(sparse, "user_ids", spread(np.arange(16) + 1000 + 16 * 39))
    first_held = holds_row(sparse, "user_ids", spread(np.r_[np.arange(8), np.arange(8) + 40]))
    # export with a frozen (eval-mode) encoder copy, as publication does: the tables must go on training
    import copy

    from trainer.step import cluster_rows, export_vectors

    frozen, store = copy.deepcopy(engine.module).eval(), _store(np.random.default_rng(0))
    live, _ = export_vectors(sparse, frozen, store, np.arange(8), np.arange(16), np.zeros(8), torch.device("cpu"))
    tables_still_training = sparse.training and all(m.training for m in sparse.modules())
    # the cluster rows frozen with an encoder version replace the live ones: equal rows, equal vectors
    rows = cluster_rows(sparse, 4, 4, torch.device("cpu"))
    same, _ = export_vectors(sparse, frozen, store, np.arange(8), np.arange(16), np.zeros(8), torch.device("cpu"), clusters=rows)
    other, _ = export_vectors(sparse, frozen, store, np.arange(8), np.arange(16), np.zeros(8), torch.device("cpu"),
                              clusters=(rows[0] + 1, rows[1]))
    frozen_clusters_used = bool(np.allclose(live["content"], same["content"], atol=1e-5)
                                and not np.allclose(live["content"], other["content"], atol=1e-3))
    changed_rows = (before_users != after_users).any(dim=1).nonzero().flatten().tolist()
    dense_changed = any(not torch.equal(a, b) for a, b in zip(before_dense, engine.module.parameters()))
    flat = torch.cat([p.detach().flatten() for p in engine.module.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(2)]
    dist.all_gather(gathered, flat)
    out[rank] = {
        "sharding": {k: v.sharding_type for k, v in plan.items()},
        "local_rows": local_rows,
        "changed_rows": changed_rows,
        "start_norm": float(before_users.norm(dim=1).mean()),
        "dense_changed": dense_changed,
        "dense_equal_across_ranks": torch.equal(gathered[0], gathered[1]),
        "losses": losses,
        "users_held": users_held.tolist(), "last_held": last_held.tolist(), "first_held": first_held.tolist(),
        "evictions": evictions(sparse), "tables_still_training": tables_still_training,
        "frozen_clusters_used": frozen_clusters_used,
        "remap_state": sorted(k for k in sparse.state_dict() if "_mch_sorted_raw_ids" in k),
    }
    dist.destroy_process_group()


def test_dmp_and_deepspeed_share_one_backward():
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(free_port(), out), nprocs=2, join=True)
    r0, r1 = out[0], out[1]
    assert r0["sharding"]["user_ids"] == "row_wise" and r0["sharding"]["frame_clusters"] == "row_wise"
    # row-wise: each rank materialises half of the 96 user rows
    weight = "mc_ec._embedding_module.embeddings.user_ids.weight"
    assert r0["local_rows"][weight] == 48 and r1["local_rows"][weight] == 48
    # the 16 users took 16 rows (managed collisions: one row each, on the rank their key maps to)
    assert len(r0["changed_rows"]) + len(r1["changed_rows"]) == 16 and r0["changed_rows"] and r1["changed_rows"]
    # rows start at unit norm (TorchRec's default, +-sqrt(1 / rows), would give 0.06 at 20,000 rows: embeddings.tables.init_bound)
    assert 0.8 < r0["start_norm"] < 1.2 and 0.8 < r1["start_norm"] < 1.2
    assert all(r0["users_held"]) and all(r1["users_held"])
    # 640 new users, seen once each, through 94 usable rows: the newest hold rows and the churn evicts
    # itself, while the 16 users trained 15 times keep theirs (distance-weighted LFU); evictions counted
    assert all(r0["last_held"]) and all(r1["last_held"])
    assert all(r0["first_held"]) and all(r1["first_held"])
    assert r0["evictions"]["user_ids"] + r1["evictions"]["user_ids"] > 300
    assert r0["evictions"]["item_ids"] == r1["evictions"]["item_ids"] == 0
    assert r0["tables_still_training"] and r1["tables_still_training"]
    assert r0["frozen_clusters_used"] and r1["frozen_clusters_used"]
    assert any("user_ids" in k for k in r0["remap_state"])  # the remap is in the state dict: checkpoints keep it
    assert r0["dense_changed"] and r1["dense_changed"]
    assert r0["dense_equal_across_ranks"]
    for r in (r0, r1):
        assert r["losses"][-1] < r["losses"][0] * 0.7, r["losses"]


def _cuda_only_default_group(rank: int, port: int, out: dict) -> None:
    """The default group is NCCL-like (a backend registered for CUDA only), as on a GPU host."""
    import datetime

    from cluster.devices import control_group
    from cluster.worker import all_sum

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.Backend.register_backend("cudaonly", lambda store, r, size, timeout: dist.ProcessGroupGloo(store, r, size, timeout),
                                  devices=["cuda"])
    dist.init_process_group("cudaonly", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    try:
        dist.all_reduce(torch.ones(1))
        out[f"default-{rank}"] = "ok"
    except RuntimeError as exc:
        out[f"default-{rank}"] = str(exc)
    out[rank] = all_sum([1.0, float(rank)], control_group())
    dist.destroy_process_group()


def test_control_collectives_never_touch_a_cuda_only_default_group():
    """What killed the first GPU run: the loop's CPU all-reduce on a NCCL-only group."""
    out = mp.Manager().dict()
    mp.spawn(_cuda_only_default_group, args=(free_port(), out), nprocs=2, join=True)
    assert "No backend type associated with device type cpu" in out["default-0"]  # the failure is reproduced
    assert out[0] == out[1] == [2.0, 1.0]


def test_bf16_dense_engine_takes_fp32_sparse_rows():
    """The sparse lookups hand fp32 rows to a bf16 dense arch: one cast at the boundary, fp32 out."""
    from trainer.model import DenseArch

    m = DenseArch(CFG)
    for p in m.parameters():  # as DeepSpeed's bf16 mode does: parameters only, buffers stay fp32
        p.data = p.data.to(torch.bfloat16)
    e = CFG.embedding_dim
    frames = torch.randint(0, 255, (3, CFG.frames, CFG.frame_size, CFG.frame_size, 3), dtype=torch.uint8)
    tokens = torch.randint(1, CFG.text_vocab, (3, CFG.text_len))
    rows = [torch.randn(3, e, requires_grad=True) for _ in range(4)]
    memer = (torch.arange(3), torch.rand(3), torch.ones(3), torch.ones(3, len(CFG.memer_signals)))
    users, items, memer_loss = m(*rows, frames, tokens, torch.ones(3), torch.ones(3), item_counts=torch.tensor([0.0, 3.0, 9.0]),
                                 memer_inputs=memer)  # the default parts on: the gate reads counts, the attention tower no history
    assert users.dtype == items.dtype == memer_loss.dtype == torch.float32 and memer_loss > 0
    ((users * items).sum() + memer_loss).backward()
    assert all(r.grad is not None and r.grad.dtype == torch.float32 for r in rows)  # fused optimizers get fp32 grads
