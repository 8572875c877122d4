"""Object storage: shards, the index (bases and delta segments) and Ray checkpoints at s3://
URIs, against moto's S3 server started here (real HTTP, the same client code as on AWS)."""
from __future__ import annotations

import json
import subprocess
import sys

import boto3
import numpy as np
import pytest
from moto.server import ThreadedMotoServer

from cluster.broker import free_port
from embeddings.publish import IndexPublisher
from embeddings.reader import IndexReader
from streaming import storage
from streaming.shards import ShardCache, read_shard, write_shard
from tests.conftest import ROOT

pytestmark = pytest.mark.integration
BUCKET = "coldstream-test"


@pytest.fixture
def s3(monkeypatch):
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=BUCKET)
    yield f"s3://{BUCKET}", env
    server.stop()


def _vecs(n, d=8, seed=0):
    v = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_shards_are_written_to_and_read_from_the_store(s3):
    root, _ = s3
    url = write_shard(f"{root}/shards/a.tar", [{"item_id": 4, "text": "a title", "frames": []},
                                               {"item_id": 5, "text": "another", "frames": []}])
    assert url == f"{root}/shards/a.tar" and storage.exists(url)
    items = read_shard(url, 2, 8)
    assert sorted(items) == [4, 5] and items[4].text == "a title" and not items[4].has_frames
    storage.write_bytes(f"{root}/shards/bad.tar", b"not a tar at all" * 100)
    cache = ShardCache(2, 8)
    assert cache.fetch(9, f"{root}/shards/bad.tar") is None and 9 in cache.skipped  # skipped with a reason, no crash
    assert cache.fetch(7, f"{root}/shards/missing.tar") is None and "does not exist" in cache.skipped[7]


def test_the_index_is_published_to_and_followed_from_the_store(s3, tmp_path):
    root, _ = s3
    index = f"{root}/index"
    pub = IndexPublisher(index, keep=2, cache=tmp_path / "pub")
    reader = IndexReader(index, use_gpu=False, cache=tmp_path / "read")
    assert not reader.refresh()  # nothing published yet: no error
    ids, vecs = np.arange(100), _vecs(100)
    pub.publish(ids, vecs, np.array([1]), _vecs(1), {"step": 1})
    assert reader.refresh() and reader.version == 1
    base = reader.current.index.base
    vecs[7] = _vecs(1, seed=3)[0]
    second = pub.publish(ids, vecs, np.array([1]), _vecs(1), {"step": 2})
    assert second.manifest["base"] == "v000001"  # a delta segment, uploaded as one small file
    assert reader.refresh() and reader.version == 2 and reader.current.index.base is base
    _, top = reader.search(vecs[7:8], 1)
    assert top[0, 0] == 7
    assert storage.read_bytes(f"{index}/LATEST").decode() == "v000002"
    # a publisher on another machine continues the numbering and keeps its floor
    other = IndexPublisher(index, keep=2, cache=tmp_path / "pub2")
    assert other.publish(ids, vecs, np.array([1]), _vecs(1), {"step": 1}) is None  # older weights: refused
    assert other.publish(ids, vecs, np.array([1]), _vecs(1), {"step": 3}).version == 3
    assert reader.refresh() and reader.version == 3
    assert storage.list_names(index) == ["LATEST", "v000001", "v000002", "v000003"]  # v2 still needs its base v1
    assert IndexPublisher(index, keep=1, cache=tmp_path / "pub3").publish(ids, vecs, np.array([1]), _vecs(1), {"step": 4})
    assert storage.list_names(index) == ["LATEST", "v000004"]  # pruned in the store too
    # without a cache given, each makes a temporary one, and it goes with them
    import gc

    temp = IndexReader(index, use_gpu=False)
    assert temp.refresh() and temp.version == 4
    where = temp.root
    del temp
    gc.collect()
    assert not where.exists()


def test_a_demo_run_keeps_shards_checkpoints_and_index_in_the_store(s3, tmp_path):
    """The whole job with `storage` set: two Ray workers read shards from S3, checkpoint to S3
    through Ray Train, and publish the index there; a reader that has only the URI follows it."""
    root, env = s3
    out = subprocess.run(
        [sys.executable, "launch.py", "demo", "--runs-dir", str(tmp_path), "--run-name", "s3run", "--duration-s", "45",
         "--set", f"storage={root}/runs", "--set", "train.checkpoint_every_s=15", "--set", "train.publish_every_s=10",
         "--set", "world.initial_items=150", "--set", "world.new_items=30", "--set", "world.n_users=200"],
        cwd=ROOT, capture_output=True, text=True, timeout=400, env={**__import__("os").environ, **env})
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "s3run" / "summary.json").read_text())
    assert summary["index_dir"] == f"{root}/runs/s3run/index" and summary["index_versions"] >= 1
    assert any(n.endswith(".tar") for n in storage.list_names(f"{root}/runs/s3run/shards"))
    assert not (tmp_path / "s3run" / "shards").exists()
    checkpoints = storage.list_names(f"{root}/runs/s3run/ray/s3run")
    assert any(n.startswith("checkpoint_") for n in checkpoints), checkpoints
    reader = IndexReader(f"{root}/runs/s3run/index", use_gpu=False, cache=tmp_path / "cache")
    assert reader.refresh() and reader.current.index.ntotal > 0
