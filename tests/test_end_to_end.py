"""The whole path through launch.py: 2 Ray workers, the real broker, DeepSpeed,
sharded TorchRec, published FAISS versions, and resuming from a checkpoint."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from embeddings.reader import IndexReader
from streaming.config import KafkaConfig, WorldConfig
from streaming.movielens import DEFAULT_DIR as MOVIELENS
from streaming.producer import EventProducer
from streaming.schema import Interaction
from streaming.synthetic import World, run_world
from streaming.topics import ensure_topics
from tests.conftest import ROOT

pytestmark = pytest.mark.integration
# Two workers on gloo: on a one-GPU host two NCCL ranks cannot share the device, so these pin the CPU
# path; the CUDA path has its own one-worker test below.
SMALL = ["--no-gpu", "--set", "model.user_rows=2000", "--set", "model.item_rows=2000", "--set", "optim.batch_size=128",
         "--set", "train.min_items_before_training=32"]


def launch(*args: str, timeout: int = 420, output: list[str] | None = None) -> dict:
    """Runs launch.py; its JSON line. `output` collects every line it printed."""
    proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    if output is not None:
        output += (proc.stdout + proc.stderr).splitlines()
    return json.loads(proc.stdout.strip().splitlines()[-1])


OURS = ("[coldstream]", "coldstream.", " cluster.", " streaming.", " trainer.", " embeddings.")


def foreign(lines: list[str]) -> list[str]:
    """Lines that are not coldstream's own (its loggers, status lines, the JSON summary)."""
    return [ln for ln in lines if ln.strip() and not any(tag in ln for tag in OURS) and not ln.startswith("{")]


DEMO_WORLD = ["--set", "world.n_users=300", "--set", "world.initial_items=150", "--set", "world.new_items=80",
              "--set", "world.new_item_interval_s=0.1", "--set", "train.publish_every_s=12"]


def small_world(tmp_path, bootstrap: str) -> EventProducer:
    """200 users and 80 items, produced at once; the producer stays open for more events."""
    ensure_topics(KafkaConfig(), bootstrap)
    world = World.create(WorldConfig(n_users=200, initial_items=80, new_items=0, events_per_user=20))
    prod = EventProducer(KafkaConfig(), bootstrap)
    for _ in run_world(world, tmp_path / "shards", prod.sink(), realtime=False):
        pass
    return prod


def test_demo_small(tmp_path):
    """bf16 on the CPU: the dense engine in bf16, the sparse rows in fp32, the real worker loop;
    and quiet: at most 5 lines that are not coldstream's own."""
    printed: list[str] = []
    s = launch("demo", "--runs-dir", str(tmp_path), "--run-name", "e2e", "--duration-s", "50", *SMALL, "--set", "train.precision=bf16",
               "--set", "world.n_users=300", "--set", "world.initial_items=150", "--set", "world.new_items=80",
               *DEMO_WORLD, "--set", "world.malformed_fraction=0.01", output=printed)
    assert len(foreign(printed)) <= 5, "\n".join(foreign(printed))
    assert s["precision"] == "bf16" and s["device"] == "cpu"
    assert s["train_steps"] > 20 and s["examples_per_s"] > 0
    assert s["events_consumed"] >= 300 * 60 and s["dead_lettered"] > 0
    assert s["index_versions"] >= 2
    assert s["cold_recall_at_20"] > s["random_recall_at_20"]
    assert (tmp_path / "e2e" / "curves.png").stat().st_size > 10_000
    reader = IndexReader(s["index_dir"])
    assert reader.refresh() and reader.version == s["index_versions"]
    assert len(reader.current.item_ids) == 230


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_demo_on_one_gpu(tmp_path):
    """The CUDA path end to end: NCCL + gloo groups, fbgemm-gpu tables, bf16 engine, input prefetched to the GPU."""
    s = launch("demo", "--gpu", "--workers", "1", "--runs-dir", str(tmp_path), "--run-name", "gpu", "--duration-s", "40",
               *SMALL[1:], *DEMO_WORLD)
    assert s["device"].startswith("cuda") and s["precision"] == "bf16"
    assert s["train_steps"] > 20 and s["index_versions"] >= 2
    assert s["cold_recall_at_20"] > s["random_recall_at_20"]


def test_train_resumes_from_checkpoint_and_offsets_on_any_worker_count(tmp_path, broker):
    """Three runs on one broker: 2 workers, then 1 (tables resharded, partitions reassigned from
    the saved per-partition offsets), then 2 again. Every event is read exactly once in total,
    the step carries on, and the manifests' trained offsets never go backwards."""
    prod = small_world(tmp_path, broker.bootstrap)
    common = ["train", "--bootstrap-servers", broker.bootstrap, "--runs-dir", str(tmp_path), "--run-name", "r", *SMALL,
              "--set", "train.min_items_before_training=16", "--set", "train.publish_every_steps=10",
              "--set", "model.user_tower=attention"]  # user histories are resharded with their partitions too
    index = IndexReader(tmp_path / "r" / "index")
    offsets = []
    for run, (workers, steps) in enumerate([(2, 12), (1, 24), (2, 36)]):
        if run:
            for u, i in zip(np.arange(100), np.arange(100) % 80):
                prod.interaction(Interaction(int(u), int(i), "like", float(run)))
            prod.flush()
        out = launch(*common, "--workers", str(workers), "--set", f"train.max_steps={steps}")
        assert out["train_steps"] == steps and out["steps_this_run"] == 12  # weights and step restored
        assert index.refresh() and index.current.manifest["step"] == steps
        offsets.append(index.current.manifest["kafka_offsets"]["interactions"])
        if run:  # offsets restored: every event read exactly once across the runs; the counters carry over
            assert out["events_consumed"] == prod.sent
        assert out["positives_trained"] > 0 and out["trained_twice_beyond_rollback"] == 0
    prod.close()
    assert sorted(offsets[0]) == sorted(offsets[1]) == ["0", "1", "2", "3"]
    assert all(offsets[k][p] <= offsets[k + 1][p] for k in range(2) for p in offsets[0])


def test_a_worker_that_dies_mid_publish_is_restored_from_its_checkpoint(tmp_path, broker):
    """A Ray worker exits just before renaming version 2 into place (COLDSTREAM_CRASH_PUBLISH): Ray
    restarts the group from the last checkpoint, the leftover is cleaned, versions stay monotone,
    every event is counted once and no positive is trained twice beyond the rollback window."""
    import os

    prod = small_world(tmp_path, broker.bootstrap)
    prod.close()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), "train", "--bootstrap-servers", broker.bootstrap, "--runs-dir", str(tmp_path),
         "--run-name", "c", *SMALL, "--set", "train.min_items_before_training=16", "--set", "train.publish_every_steps=5",
         "--set", "train.checkpoint_every_s=1", "--set", "train.max_steps=30"],
        capture_output=True, text=True, timeout=420, cwd=ROOT, env=dict(os.environ, COLDSTREAM_CRASH_PUBLISH="2"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "COLDSTREAM_CRASH_PUBLISH=2: exiting before the rename" in proc.stdout + proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["train_steps"] == 30 and out["events_consumed"] == prod.sent
    assert out["positives_trained"] > 0 and out["trained_twice_beyond_rollback"] == 0
    index = tmp_path / "c" / "index"
    assert not list(index.glob(".tmp-v*"))
    manifests = [json.loads((d / "manifest.json").read_text()) for d in sorted(index.glob("v0*"))]
    assert [m["step"] for m in manifests] == sorted(m["step"] for m in manifests) and manifests[-1]["step"] == 30


def test_items_people_only_skipped_train_a_row_as_negatives(tmp_path, broker):
    """Four items announced and only ever skipped: as extra negatives of the softmax they are looked
    up in training and hold an ID row at export; with `model.skip_negatives=0` they never do."""
    from streaming.schema import ItemAnnouncement
    from streaming.shards import encode_png, write_shard

    ensure_topics(KafkaConfig(), broker.bootstrap)
    world = World.create(WorldConfig(n_users=200, initial_items=80, new_items=0, events_per_user=20))
    skipped = range(1000, 1004)
    url = write_shard(tmp_path / "skipped.tar", [{"item_id": i, "frames": [encode_png(f) for f in world.frames(i - 1000)],
                                                  "text": world.caption(i - 1000)} for i in skipped])
    first = EventProducer(KafkaConfig(), broker.bootstrap)  # first in the stream: read whatever the run's length
    for i in skipped:
        first.announce(ItemAnnouncement(i, url, 0.0))
        for u in range(50):
            first.interaction(Interaction(u, i, "skip", 0.0))
    first.close()
    small_world(tmp_path, broker.bootstrap).close()
    rowless = {}
    for share in ("0", "0.25"):
        launch("train", "--bootstrap-servers", broker.bootstrap, "--runs-dir", str(tmp_path), "--run-name", f"skips{share}", *SMALL,
               "--workers", "1", "--set", "train.max_steps=20", "--set", "train.publish_every_steps=20", "--set", f"model.skip_negatives={share}")
        index = IndexReader(tmp_path / f"skips{share}" / "index")
        assert index.refresh() and set(skipped) <= set(index.current.item_ids)
        rowless[share] = index.current.manifest["items_without_row"]
    assert rowless["0.25"] + len(skipped) <= rowless["0"], rowless


def test_unbounded_ids_train_evict_publish_and_rank_by_raw_id(tmp_path, broker):
    """String and 64-bit integer ids, 10x more distinct users and items than table rows: the run
    trains, evicts (counted), publishes every item (those without a row by content), and the
    service ranks by the raw ids the stream carried."""
    from cluster.serve import Service
    from streaming.schema import ItemAnnouncement
    from streaming.shards import encode_png, write_shard

    ensure_topics(KafkaConfig(), broker.bootstrap)
    world = World.create(WorldConfig(n_users=480, initial_items=480, new_items=0, events_per_user=12))
    user_name = {u: f"user-{u:04d}" for u in range(480)}  # strings ...
    item_name = {i: f"item-é{i}" if i % 2 else 2**61 + i for i in range(480)}  # ... and integers far above the rows
    prod = EventProducer(KafkaConfig(), broker.bootstrap)
    for start in range(0, 480, 120):
        items = range(start, start + 120)
        url = write_shard(tmp_path / f"shard-{start}.tar", [{"item_id": item_name[i], "frames": [encode_png(f) for f in world.frames(i)],
                                                              "text": world.caption(i)} for i in items])
        for i in items:
            prod.announce(ItemAnnouncement(item_name[i], url, 0.0))
    rng = np.random.default_rng(0)
    for ev in world.sample_events(rng, np.arange(480), np.arange(480), 480 * 12, 0.0):
        prod.interaction(Interaction(user_name[ev.user_id], item_name[ev.item_id], ev.event, ev.ts))
    prod.close()
    out = launch("train", "--bootstrap-servers", broker.bootstrap, "--runs-dir", str(tmp_path), "--run-name", "ids", "--no-gpu",
                 "--set", "model.user_rows=48", "--set", "model.item_rows=48", "--set", "optim.batch_size=64",
                 "--set", "train.min_items_before_training=64", "--set", "train.max_steps=60", "--set", "train.publish_every_steps=30")
    assert out["train_steps"] == 60 and out["dead_lettered"] == 0 and out["id_evictions"] > 100
    service = Service(tmp_path / "ids" / "index")
    assert service.refresh()
    cur = service.current()
    assert cur.index.ntotal == 480 and cur.manifest["evictions"] > 100 and cur.manifest["items_without_row"] > 300
    ranked = service.recommend("user-0007", 10)
    assert len(ranked.items) == 10 and {r.item_id for r in ranked.items} <= set(item_name.values())
    assert any(isinstance(r.item_id, str) for r in ranked.items) and any(isinstance(r.item_id, int) for r in ranked.items)
    similar = service.similar("item-é3", 5)
    assert similar.items[0].item_id != "item-é3" and {r.item_id for r in similar.items} <= set(item_name.values())
    assert service.similar(str(2**61 + 4), 3).items  # an integer id, written as text


EVERY_PART = [a for s in ("model.user_tower=attention", "model.interest_intensity=true", "model.orthogonality_weight=1",
                          "model.popularity_gate=true", "model.clcrec_weight=0.2", "model.alignment_weight=0.2",
                          "model.infer_missing=true", "model.clips=2", "optim.lr_schedule=cosine") for a in ("--set", s)]


@pytest.mark.skipif(not MOVIELENS.exists(), reason=f"needs the MovieLens 100K folder at {MOVIELENS}")
def test_eval_protocol_on_a_movielens_slice(tmp_path):
    """A slice of the real MovieLens 100K through the real path, with every cold-start part on; the
    metric fields all there, and the version scored is the best by validation."""
    import csv

    from streaming.movielens import DEFAULT_DIR, to_generic

    inter, items, posters = to_generic(DEFAULT_DIR, tmp_path / "ml")
    rows = list(csv.reader(open(inter)))
    sliced = tmp_path / "slice.csv"
    with open(sliced, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(rows[0])
        w.writerows(r for r in rows[1:] if int(r[0]) <= 120)
        f.write("999,1,notatime,5\n")  # a broken row, reported and skipped
    out = launch("eval", "--interactions", str(sliced), "--items", str(items), "--images", str(posters),
                 "--runs-dir", str(tmp_path), "--run-name", "ev", "--minutes", "2", "--cold-fraction", "0.15", "--seed", "3",
                 *SMALL, *EVERY_PART, "--set", "train.publish_every_s=10", timeout=400)
    for s in ("cold", "warm", "all"):
        assert set(out[s]) >= {"recall@10", "recall@20", "ndcg@10", "ndcg@20", "precision@10", "precision@20", "auc"}
    assert set(out["baselines"]) == {"random", "popularity", "content_knn", "global_avg", "tag_avg", "als", "content_to_als"}
    assert out["run"]["rows_skipped"] == 1 and out["run"]["train_steps"] > 0
    assert out["warm"]["auc"] > 0.6  # trained on warm items: far above chance
    assert (tmp_path / "ev" / "eval.md").exists() and (tmp_path / "ev" / "eval.png").exists()
    early = out["early_stage"]  # MEMER's protocol: mature training items embedded again as if new
    assert set(early["auc"]) == {"mature", "random", "global_avg", "tag_avg", "content_only", "memer"}
    assert early["auc"]["mature"] > 0.6 and early["pairs"] > 0 and abs(early["auc"]["global_avg"] - 0.5) < 1e-9
    assert set(early["relaimpr"]) == set(early["auc"]) - {"mature"}
    assert out["transition"]["bins"][0]["bin"] == "0" and (tmp_path / "ev" / "transition.png").exists()
    val = out["validation"]
    assert len(val["history"]) >= 2 and val["pseudo_cold_items"] > 0 and val["held_rows"] > 0
    best = max(val["history"], key=lambda q: q["score"])
    assert (val["chosen_version"], out["index_version"]) == (best["version"], best["version"])
    assert (tmp_path / "ev" / "validation.png").exists()
    assert set(out["cold_images_withheld"]) == {"with_images", "images_withheld"}
    # items nobody interacted with (the cold and pseudo-cold ones) are served by the version's content
    # regression, and the published mapping alone (what the service embeds a posted item with) gives the same vectors
    import faiss

    from cluster.early_stage import MappedVersion

    version = tmp_path / "ev" / "index" / f"v{out['index_version']:06d}"  # a base: evaluation rebases every version
    assert (version / "regression.npz").exists() and version.joinpath("manifest.json").read_text().count('"fitted_on"') == 1
    pub = MappedVersion.load(version, tmp_path / "ev" / "shards")
    new = pub.early["ids"][pub.early["counts"] == 0]
    index = faiss.read_index(str(version / "items.faiss"))
    served = np.stack([index.reconstruct(int(i)) for i in new])
    assert len(new) > 10 and np.allclose(served, pub.early["regressed"][pub.early["counts"] == 0], atol=1e-5)
    assert np.allclose(served, pub.remap(new), atol=1e-3)  # the trainer keeps descriptors in float16
    assert not np.allclose(served, pub.remap(new, regression=False), atol=1e-2)


def test_impossible_partition_setups_stop_at_start(tmp_path, broker):
    """A config that disagrees with the topic, or a worker that would own no partition: exit 2, named."""
    ensure_topics(KafkaConfig(), broker.bootstrap)  # interactions has 4 partitions
    for extra, message in ((["--set", "kafka.interaction_partitions=1"], "has 4 partitions"),
                           (["--workers", "6"], "train.workers=6 exceeds the 4 partitions")):
        proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), "train", "--bootstrap-servers", broker.bootstrap,
                               "--runs-dir", str(tmp_path), "--no-gpu", *extra], capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert message in proc.stderr


def test_train_joins_an_existing_ray_cluster(tmp_path, broker):
    """`--address` joins a Ray cluster started apart (`ray start --head`), ships the code to it
    and trains there; the driver says which cluster it joined."""
    import os

    from cluster.broker import free_port

    prod = small_world(tmp_path, broker.bootstrap)
    prod.close()
    port, ray_bin = free_port(), str(ROOT / ".venv" / "bin" / "ray")
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    subprocess.run([ray_bin, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                    "--temp-dir=/tmp/ray-cs-head"], check=True, capture_output=True, env=env, timeout=120)
    try:
        printed: list[str] = []
        out = launch("train", "--address", f"127.0.0.1:{port}", "--bootstrap-servers", broker.bootstrap, "--runs-dir", str(tmp_path),
                     "--run-name", "a", *SMALL, "--set", "train.min_items_before_training=16", "--set", "train.max_steps=8",
                     output=printed)
        assert out["train_steps"] == 8
        assert any(f"joining the Ray cluster at 127.0.0.1:{port}" in ln for ln in printed)
    finally:
        subprocess.run([ray_bin, "stop", "--force"], capture_output=True, env=env, timeout=120)
