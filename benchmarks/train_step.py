"""Goal: the sharded embedding step (DMP, row-wise, fused optimizer in backward, 2 gloo
processes) against a bare single-process TorchRec EmbeddingCollection step with dense
gradients and a torch optimizer, on the same tables and batch; plus the full step
(sparse + DeepSpeed dense) for context. Prints one JSON line."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from cluster.broker import free_port  # noqa: E402
from trainer.config import ModelConfig  # noqa: E402

CFG = ModelConfig(max_users=100_000, max_items=100_000)


def _ids(batch: int, rank: int):
    rng = np.random.default_rng(rank)
    return rng.integers(0, CFG.max_users, batch), rng.integers(0, CFG.max_items, batch)


def _time(fn, steps: int) -> float:
    for _ in range(3):
        fn()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps * 1000


def bare_step_ms(batch: int, steps: int) -> float:
    from embeddings.tables import table_configs
    from trainer.batch import user_kjt
    from trainer.model import SparseArch

    torch.set_num_threads(1)
    sparse = SparseArch(table_configs(CFG), device="cpu")
    opt = torch.optim.Adagrad(sparse.parameters(), lr=0.05)
    users, items = _ids(batch, 0)
    kjt = _two_feature_kjt(users, items)

    def step():
        emb = sparse(kjt)
        loss = (emb["user_id"] * emb["item_id"]).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()

    return _time(step, steps)


def _two_feature_kjt(users, items):
    from trainer.batch import _kjt

    empty = np.zeros(0, np.int64)
    return _kjt(len(users), users, items, empty, empty)


def _sharded(rank: int, port: int, batch: int, steps: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    import deepspeed

    from cluster.devices import deepspeed_config
    from embeddings.tables import shard_sparse_arch
    from trainer.batch import ContentStore, make_batch
    from trainer.model import DenseArch
    from trainer.step import TrainStep

    sparse = shard_sparse_arch(CFG, torch.device("cpu"), 0.05)
    users, items = _ids(batch, rank)
    kjt = _two_feature_kjt(users, items)

    def sparse_step():
        emb = sparse(kjt)
        (emb["user_id"] * emb["item_id"]).sum().backward()

    sparse_ms = _time(sparse_step, steps)
    dense = DenseArch(CFG)
    engine, *_ = deepspeed.initialize(model=dense, optimizer=torch.optim.AdamW(dense.parameters()), dist_init_required=False,
                                      config=deepspeed_config(256, 2, 1, 1.0, False))
    rng = np.random.default_rng(rank)
    store = ContentStore(CFG)
    for i in range(500):
        store.add(i, rng.integers(0, 255, (CFG.frames, CFG.frame_size, CFG.frame_size, 3), dtype=np.uint8), True, f"w{i} x y", i % 16, i % 16)
    full = TrainStep(sparse, engine, CFG.temperature, torch.device("cpu"))
    b = make_batch(rng.integers(0, 600, 256), rng.integers(0, 500, 256), store, 0.5, rng, np.ones(500, np.int64), np.ones(600, np.int64))
    full_ms = _time(lambda: full(b), max(3, steps // 10))
    out[rank] = (sparse_ms, full_ms)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()
    out = mp.Manager().dict()
    mp.spawn(_sharded, args=(free_port(), args.batch, args.steps, out), nprocs=2, join=True)
    sharded_ms = max(out[0][0], out[1][0])
    full_ms = max(out[0][1], out[1][1])
    bare_ms = bare_step_ms(args.batch, args.steps)
    print(json.dumps({"goal": "train_step", "batch_per_rank": args.batch, "tables": "2 x 100k x 64 (+2 x 16 x 64)",
                      "sharded_step_ms": round(sharded_ms, 2), "baseline": "bare EmbeddingCollection, 1 process, dense grads + Adagrad",
                      "baseline_step_ms": round(bare_ms, 2), "ratio": round(sharded_ms / bare_ms, 3),
                      "full_step_ms_batch256": round(full_ms, 1), "world_size": 2}))


if __name__ == "__main__":
    main()
