"""`launch.py serve` over real HTTP against a real published index (FAISS on disk, the MEMER
mapping as published): queries, a brand-new item posted with a real poster, version swaps
under load, and bad requests."""
from __future__ import annotations

import io
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from tests.conftest import ROOT

pytestmark = pytest.mark.integration
POSTER = ROOT.parent / "shared" / "datasets" / "movielens-100k" / "posters" / "1.jpg"


def small_model():
    from trainer.config import ModelConfig

    return ModelConfig(embedding_dim=16, d_model=16, heads=2, frames=2, frame_size=16, patch=8, frame_layers=1,
                       temporal_layers=1, text_layers=1, memer_hidden=16)


def publish_version(root: Path, step: int, n_items: int = 60, n_users: int = 8, seed: int = 0, pub=None):
    """A version as the trainer writes it: index, users, seen pairs and the mapping artefact. With the
    same `pub` twice and the same seed, the second is a delta segment (nothing changed)."""
    import torch

    from embeddings.clusters import FRAME_DIM, TEXT_DIM
    from embeddings.mapping import MAPPING_FILE, save_mapping
    from embeddings.publish import IndexPublisher
    from trainer.model import DenseArch

    cfg = small_model()
    torch.manual_seed(seed)
    dense = DenseArch(cfg)
    rng = np.random.default_rng(seed)
    unit = lambda n: (lambda x: x / np.linalg.norm(x, axis=1, keepdims=True))(rng.normal(size=(n, 16)).astype(np.float32))
    items = np.arange(100, 100 + n_items)
    pub = pub or IndexPublisher(root)
    mapping = {}
    clusters = (rng.normal(size=(4, FRAME_DIM)), rng.normal(size=(4, TEXT_DIM)))
    rows = (rng.normal(size=(4, 16)), rng.normal(size=(4, 16)))
    return pub.publish(items, unit(n_items), np.arange(n_users), unit(n_users), {"step": step, "mapping": mapping},
                       {MAPPING_FILE: lambda p: mapping.update(save_mapping(dense, cfg, 5, clusters, rows, p)),
                        "seen.npz": lambda p: np.savez(p, pairs=np.array([[0, 100], [0, 101], [0, 102]]))})


def png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def service(tmp_path):
    from cluster.broker import free_port

    root = tmp_path / "index"
    publish_version(root, step=1)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "launch.py", "serve", "--index", str(root), "--port", str(port)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if requests.get(f"{url}/healthz", timeout=1).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "service did not come up"
        time.sleep(0.2)
    yield url, root
    proc.terminate()
    proc.wait(10)


def test_recommend_similar_and_a_new_item_served_at_once(service):
    url, _ = service
    r = requests.get(f"{url}/recommend", params={"user_id": 0, "k": 10}).json()
    assert r["version"] == 1 and len(r["items"]) == 10
    assert not {100, 101, 102} & {x["item_id"] for x in r["items"]}  # seen items are left out
    scores = [x["score"] for x in r["items"]]
    assert scores == sorted(scores, reverse=True)

    image = POSTER.read_bytes() if POSTER.exists() else png((200, 30, 30))
    files = [("image", ("poster.jpg", image, "image/jpeg")), ("image", ("frame2.png", png((0, 0, 255)), "image/png"))]
    posted = requests.post(f"{url}/items", data={"item_id": 7777, "title": "Toy Story (1995)", "tags": "Animation|Comedy"},
                           files=files)
    assert posted.status_code == 200, posted.text
    body = posted.json()
    assert body["item_id"] == 7777 and body["version"] == 1 and body["latency_ms"] < 1000
    similar = requests.get(f"{url}/similar", params={"item_id": 7777, "k": 5}).json()
    assert len(similar["items"]) == 5 and 7777 not in {x["item_id"] for x in similar["items"]}
    neighbour = similar["items"][0]["item_id"]
    back = requests.get(f"{url}/similar", params={"item_id": neighbour, "k": 61}).json()
    assert 7777 in {x["item_id"] for x in back["items"]}  # the new item is in the live index
    everything = requests.get(f"{url}/recommend", params={"user_id": 1, "k": 61}).json()
    assert 7777 in {x["item_id"] for x in everything["items"]}

    metrics = requests.get(f"{url}/metrics").text
    assert "coldstream_index_version 1.0" in metrics
    assert 'coldstream_requests_total{endpoint="/items",status="200"} 1.0' in metrics
    assert "coldstream_request_latency_seconds_bucket" in metrics and "coldstream_index_version_age_seconds" in metrics
    assert "coldstream_index_items 61.0" in metrics


def test_versions_swap_under_load_without_errors(service):
    url, root = service
    requests.post(f"{url}/items", data={"item_id": 5000, "title": "posted before the swap"},
                  files=[("image", ("a.png", png((10, 200, 10)), "image/png"))]).raise_for_status()
    failures, versions, stop = [], set(), threading.Event()

    def hammer(path, params):
        while not stop.is_set():
            r = requests.get(f"{url}{path}", params=params, timeout=10)
            if r.status_code != 200:
                failures.append((path, r.status_code, r.text))
            else:
                versions.add(r.json()["version"])

    threads = [threading.Thread(target=hammer, args=a) for a in
               (("/recommend", {"user_id": 1, "k": 20}), ("/similar", {"item_id": 110, "k": 20}), ("/similar", {"item_id": 5000, "k": 5}))]
    for t in threads:
        t.start()
    for step in (2, 3):
        time.sleep(1.0)
        publish_version(root, step=step, seed=step)
    deadline = time.monotonic() + 20
    while 3 not in versions and time.monotonic() < deadline:
        time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join()
    assert not failures, failures[:3]
    assert {1, 3} <= versions
    assert requests.get(f"{url}/healthz").json()["version"] == 3
    # the posted item was carried into the new versions
    assert requests.get(f"{url}/similar", params={"item_id": 5000, "k": 3}).status_code == 200


def test_a_posted_item_is_carried_across_delta_segments_and_bases(service):
    """A delta derives from the version as published, not from the live index with the posted
    item in it: the item stays posted (not mistaken for a trained one) and survives the next base."""
    from embeddings.publish import IndexPublisher

    url, root = service
    requests.post(f"{url}/items", data={"item_id": 5001, "title": "posted"},
                  files=[("image", ("a.png", png((10, 200, 10)), "image/png"))]).raise_for_status()
    pub = IndexPublisher(root)
    for step, kind in ((2, "base"), (3, "delta"), (4, "base")):
        got = publish_version(root, step=step, pub=pub if kind == "delta" else IndexPublisher(root) if step == 4 else pub)
        assert bool(got.manifest.get("base")) == (kind == "delta")
        deadline = time.monotonic() + 20
        while requests.get(f"{url}/healthz").json()["version"] != step:
            assert time.monotonic() < deadline, f"version {step} was not picked up"
            time.sleep(0.2)
        assert requests.get(f"{url}/similar", params={"item_id": 5001, "k": 3}).status_code == 200, kind
        assert "coldstream_items_posted 1.0" in requests.get(f"{url}/metrics").text, kind


def test_bad_requests_get_4xx_and_the_service_keeps_running(service):
    url, _ = service
    cases = [
        (requests.get, "/recommend", {"params": {"user_id": 999}}, 404, "unknown user_id 999"),
        (requests.get, "/similar", {"params": {"item_id": 5}}, 404, "unknown item_id 5"),
        (requests.get, "/recommend", {"params": {"user_id": 1, "k": 0}}, 422, "k"),
        (requests.get, "/recommend", {"params": {"user_id": 1, "k": 100000}}, 422, "k"),
        (requests.get, "/recommend", {"params": {"user_id": "abc"}}, 404, "unknown user_id abc"),  # ids may be strings
        (requests.get, "/recommend", {"params": {"user_id": ""}}, 422, "user_id"),
        (requests.get, "/similar", {"params": {"item_id": "x" * 257}}, 422, "item_id"),
        (requests.post, "/items", {"data": {"title": "no id"}, "files": [("image", ("a.png", png((1, 2, 3)), "image/png"))]}, 422, "item_id"),
        (requests.post, "/items", {"data": {"item_id": 1, "title": "no image"}}, 422, "image"),
        (requests.post, "/items", {"data": {"item_id": 1, "title": "junk"}, "files": [("image", ("a.png", b"not an image", "image/png"))]},
         422, "unreadable image"),
        (requests.post, "/items", {"data": {"item_id": 1, "title": "huge"},
                                   "files": [("image", ("a.png", b"\0" * (9 << 20), "image/png"))]}, 413, "exceeds the limit"),
    ]
    for call, path, kwargs, status, says in cases:
        r = call(f"{url}{path}", **kwargs)
        assert r.status_code == status, (path, kwargs.get("params") or kwargs.get("data"), r.status_code, r.text)
        assert says in r.text
        assert requests.get(f"{url}/healthz").status_code == 200


def test_the_published_mapping_embeds_without_ray_kafka_or_trainer_state(tmp_path):
    publish_version(tmp_path, step=1)
    version = (tmp_path / "LATEST").read_text().strip()
    code = (
        "import sys; from embeddings.mapping import EarlyStageMapper\n"
        f"m = EarlyStageMapper.load({str(tmp_path / version)!r})\n"
        f"v = m.embed([open({str(POSTER)!r}, 'rb').read()] if {POSTER.exists()} else [], 'Toy Story', ['Animation'])\n"
        "assert v.shape == (16,) and abs(float((v * v).sum()) - 1) < 1e-4\n"
        "assert not {'ray', 'kafka', 'deepspeed'} & set(sys.modules), sorted({'ray', 'kafka', 'deepspeed'} & set(sys.modules))\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]
