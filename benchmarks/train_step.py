"""Goal: a fast training step, and a loop that keeps it fed.

On CUDA when present (one rank per GPU), else on CPU with gloo ranks. Prints one JSON line:
- `sparse_step_ms`: the project's sharded ID tables (`shard_sparse_arch`: four tables, row-wise,
  fused RowWiseAdagrad) stepped on a user + item batch;
- `plain_torchrec_step_ms`, the baseline measured in the same run: a plain TorchRec
  `EmbeddingCollection` with the same two 64-dim user/item tables, row-wise under
  DistributedModelParallel with fused RowWiseAdagrad, on the same ids and device;
- `full_step_examples_per_s`: the whole step (sparse + DeepSpeed dense encoders + loss +
  both optimizers) at `--full-batch`, with every item distinct-ish (drawn from a large
  catalogue), content gathered from a device-resident ContentStore;
- `loop_examples_per_s`: the same steps fed by the project's Prefetcher (batches built on
  its thread from raw pairs, copied on a side stream), wall clock, and its ratio to the step;
- `weak_scaling_efficiency`: the full step on N ranks against the same step on 1 rank, at the
  same batch per rank (examples/s on N over N x examples/s on 1); and
  `weak_scaling_efficiency_sparse_step`, the same for the sharded embedding step alone, whose
  all-to-alls nothing hides.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from cluster.broker import free_port  # noqa: E402
from trainer.config import ModelConfig  # noqa: E402

CFG = ModelConfig(user_rows=100_000, item_rows=100_000)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ms(fn, steps: int, device: torch.device) -> float:
    for _ in range(5):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / steps * 1000


def _two_feature_kjt(users: np.ndarray, items: np.ndarray):
    """The plain baseline's input: ids as table rows (no managed collisions to map them)."""
    from torchrec import KeyedJaggedTensor

    return KeyedJaggedTensor(keys=["user_id", "item_id"], values=torch.from_numpy(np.concatenate([users, items]).astype(np.int64)),
                             lengths=torch.ones(len(users) + len(items), dtype=torch.int32))


def plain_torchrec(device: torch.device, sparse_lr: float):
    """The baseline: the same two tables in a bare EmbeddingCollection, sharded and optimised exactly
    as the project's (row-wise, fused RowWiseAdagrad), without the project's extra tables and wrapper."""
    from torchrec import EmbeddingCollection, EmbeddingConfig

    from embeddings.tables import shard_row_wise

    tables = [EmbeddingConfig(name=f"{f}s", embedding_dim=CFG.embedding_dim, num_embeddings=n, feature_names=[f])
              for f, n in (("user_id", CFG.user_rows), ("item_id", CFG.item_rows))]
    return shard_row_wise(EmbeddingCollection(tables=tables, device=torch.device("meta")), tables, device, sparse_lr, managed=False)


def _rank(rank: int, world: int, port: int, args, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    from cluster.devices import backend, deepspeed_config, precision

    gpu = args.device == "cuda"
    device = torch.device("cuda", rank) if gpu else torch.device("cpu")
    if gpu:
        torch.cuda.set_device(device)
    torch.set_num_threads(1 if not gpu else 4)
    dist.init_process_group(backend(gpu), rank=rank, world_size=world)
    import deepspeed

    from cluster.pipeline import Prefetcher, StepClock
    from embeddings.tables import shard_sparse_arch
    from trainer.batch import ContentStore, _kjt, make_batch
    from trainer.counts import KeyedCounts
    from trainer.model import DenseArch
    from trainer.step import TrainStep

    rng = np.random.default_rng(rank)
    users, items = rng.integers(0, CFG.user_rows, args.batch), rng.integers(0, CFG.item_rows, args.batch)
    empty = np.zeros(0, np.int64)
    kjt = _two_feature_kjt(users, items).to(device)
    mc_kjt = _kjt(len(users), users, items, empty, empty).to(device)  # keys, spread, as the worker sends them

    sparse = shard_sparse_arch(CFG, device, 0.05)
    plain = plain_torchrec(device, 0.05)

    def step_of(model, kjt):
        def step():
            emb = model(kjt)
            emb = {k: v if isinstance(v, torch.Tensor) else v.values() for k, v in emb.items()}  # plain EC: JaggedTensors
            (emb["user_id"] * emb["item_id"]).sum().backward()
        return step

    sparse_ms = _time_ms(step_of(sparse, mc_kjt), args.steps, device)
    plain_ms = _time_ms(step_of(plain, kjt), args.steps, device)
    sparse_ms = _time_ms(step_of(sparse, mc_kjt), args.steps, device)  # again, after the plain one: no warm-up advantage

    # the full step: content for a catalogue on the device, a batch of pairs over it
    prec = precision(args.precision, gpu)
    dense = DenseArch(CFG)
    if args.compile:
        dense.compile(dynamic=True)
    engine, *_ = deepspeed.initialize(model=dense, optimizer=torch.optim.AdamW(dense.parameters(), lr=1e-3), dist_init_required=False,
                                      config=deepspeed_config(args.full_batch, world, args.zero_stage, 1.0, prec == "bf16"))
    store = ContentStore(CFG, device, capacity=args.catalogue)
    words = [f"w{i}" for i in range(500)]
    for i in range(args.catalogue):
        frames = rng.integers(0, 255, (CFG.frames, CFG.frame_size, CFG.frame_size, 3), dtype=np.uint8)
        store.add(i, frames, True, " ".join(rng.choice(words, 6)), int(rng.integers(CFG.n_clusters)), int(rng.integers(CFG.n_clusters)))
    _sync(device)
    counts_i, counts_u = KeyedCounts(), KeyedCounts()

    def build():
        u = rng.integers(0, CFG.user_rows, args.full_batch)
        i = rng.integers(0, args.catalogue, args.full_batch)
        return make_batch(u, i, store, 0.5, rng, counts_i, counts_u)

    full = TrainStep(sparse, engine, CFG.temperature, device)
    fixed = [build() for _ in range(4)]
    distinct = float(np.mean([len(b.slots) for b in fixed]))
    n = [0]

    def full_step():
        full(fixed[n[0] % 4])
        n[0] += 1

    full_ms = _time_ms(full_step, args.full_steps, device)

    # the loop: the same steps, fed by the Prefetcher from raw pairs
    pf = Prefetcher(build, device, depth=4)
    clock = StepClock(device)
    for _ in range(3):
        full(pf.get(60.0))
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(args.full_steps):
        b = pf.get(60.0)
        clock.start()
        full(b)
        clock.stop()
    _sync(device)
    loop_s = time.perf_counter() - t0
    pf.close()
    step_s = clock.seconds(wait=True)
    out[rank] = {"sparse_ms": sparse_ms, "plain_ms": plain_ms, "full_ms": full_ms, "loop_s": loop_s, "step_s": step_s,
                 "distinct": distinct, "precision": prec, "device": torch.cuda.get_device_name(device) if gpu else "cpu"}
    dist.destroy_process_group()


def main() -> None:
    gpu = torch.cuda.is_available()
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if gpu else "cpu")
    ap.add_argument("--world", type=int, help="ranks (default: 1 on CUDA, 2 on CPU)")
    ap.add_argument("--batch", type=int, default=4096, help="pairs per rank for the sparse steps")
    ap.add_argument("--full-batch", type=int, help="pairs per rank for the full step (default: 4096 on CUDA, 256 on CPU)")
    ap.add_argument("--catalogue", type=int, help="items with content on the device (default: 50,000 on CUDA, 2,000 on CPU)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--full-steps", type=int, help="default: 50 on CUDA, 10 on CPU")
    ap.add_argument("--precision", choices=["fp32", "bf16"])
    ap.add_argument("--zero-stage", type=int, default=1)
    ap.add_argument("--compile", action="store_true", help="torch.compile the dense arch's forward (dynamic shapes)")
    args = ap.parse_args()
    on_gpu = args.device == "cuda"
    world = args.world or (1 if on_gpu else 2)
    args.full_batch = args.full_batch or (4096 if on_gpu else 256)
    args.catalogue = args.catalogue or (50_000 if on_gpu else 2_000)
    args.full_steps = args.full_steps or (50 if on_gpu else 10)
    if not on_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    out, slowest = measure(world, args)
    one = measure(1, args)[1] if world > 1 else slowest  # weak scaling: the same per-rank batch on 1 rank
    examples = args.full_batch * world * args.full_steps
    print(json.dumps({
        "goal": "train_step", "device": out[0]["device"], "world_size": world, "precision": out[0]["precision"],
        "compiled": args.compile, "zero_stage": args.zero_stage,
        "tables": "user + item 100k x 64 (+ 2 cluster tables in the project's)", "batch_per_rank": args.batch,
        "sparse_step_ms": round(slowest["sparse_ms"], 2),
        "plain_torchrec_step_ms": round(slowest["plain_ms"], 2),
        "sparse_vs_plain": round(slowest["sparse_ms"] / slowest["plain_ms"], 3),
        "full_batch_per_rank": args.full_batch, "distinct_items_per_batch": round(out[0]["distinct"]),
        "full_step_ms": round(slowest["full_ms"], 2),
        "full_step_examples_per_s": round(args.full_batch * world / slowest["full_ms"] * 1000),
        "loop_examples_per_s": round(examples / slowest["loop_s"]),
        "loop_step_ratio": round(slowest["step_s"] / slowest["loop_s"], 3),
        "sparse_step_ms_1rank": round(one["sparse_ms"], 2), "full_step_ms_1rank": round(one["full_ms"], 2),
        # examples/s on N ranks over N x examples/s on 1 rank, at the same batch per rank: the training
        # step as it runs (sparse + dense + loss), and the embedding step alone (its all-to-alls unhidden)
        "weak_scaling_efficiency": round(one["full_ms"] / slowest["full_ms"], 3),
        "weak_scaling_efficiency_sparse_step": round(one["sparse_ms"] / slowest["sparse_ms"], 3),
    }))


def measure(world: int, args) -> tuple[dict, dict]:
    """Every rank's figures, and the slowest rank's (a synchronous step is as fast as its slowest rank)."""
    out = mp.Manager().dict()
    mp.spawn(_rank, args=(world, free_port(), args, out), nprocs=world, join=True)
    slowest = {k: max(out[r][k] for r in range(world)) for k in ("sparse_ms", "plain_ms", "full_ms", "loop_s", "step_s")}
    return dict(out), slowest


if __name__ == "__main__":
    main()
