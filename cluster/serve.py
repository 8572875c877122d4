"""`launch.py serve`: the published index over HTTP (FastAPI on uvicorn).

Why FastAPI on uvicorn and not Ray Serve: the service needs only a published
directory. It runs where no Ray cluster is, starts in a second, and one process
answers a lookup in about a millisecond; replicas behind any load balancer scale it
out, each following `LATEST` on shared storage. Ray Serve would add a cluster to
operate for no gain at this size.

It follows `LATEST` (polling), and swaps versions whole: a request reads the version
that was current when it started, and a new version is fully loaded (the MEMER
mapping, the seen items, and the items posted here) before it becomes current. Items
posted here are embedded by the published mapping and go into the live index at
once; they are carried into every later version until the trainer's own version
holds them.
"""
from __future__ import annotations

import logging
import threading
from contextlib import asynccontextmanager
import time
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from PIL import UnidentifiedImageError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel

from embeddings.mapping import MAPPING_FILE, EarlyStageMapper
from embeddings.reader import IndexReader, LoadedVersion
from streaming import storage
from streaming.schema import MAX_ID_CHARS, id_key, parse_id

log = logging.getLogger("coldstream.serve")
K_CAP = 1000
MAX_UPLOAD_BYTES = 8 << 20  # a whole POST /items request
Count = Annotated[int, Query(ge=1, le=K_CAP, description=f"how many items, 1..{K_CAP}")]


class Scored(BaseModel):
    item_id: int | str  # as the stream carries it
    score: float


class Ranked(BaseModel):
    version: int
    items: list[Scored]


class Posted(BaseModel):
    item_id: int | str
    version: int
    latency_ms: float


class Metrics:
    """Prometheus series of one service (its own registry, so tests can run several)."""

    def __init__(self, service: "Service"):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("coldstream_requests", "HTTP requests", ["endpoint", "status"], registry=r)
        self.latency = Histogram("coldstream_request_latency_seconds", "request latency", ["endpoint"], registry=r,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
        Gauge("coldstream_index_version", "served version", registry=r).set_function(lambda: service.manifest().get("version", 0))
        Gauge("coldstream_index_version_age_seconds", "seconds since the served version was published",
              registry=r).set_function(lambda: time.time() - service.manifest().get("wall_time", time.time()))
        Gauge("coldstream_index_items", "items in the live index", registry=r).set_function(service.item_count)
        Gauge("coldstream_items_posted", "items embedded by POST /items and not yet in a trained version",
              registry=r).set_function(lambda: len(service.posted))
        fresh = Gauge("coldstream_freshness_seconds", "from broker time to the first version that includes it",
                      ["kind", "quantile"], registry=r)
        for kind in ("event_to_version_s", "announce_to_servable_s"):
            for q in ("p50", "p95"):
                fresh.labels(kind.removesuffix("_s"), q).set_function(
                    lambda kind=kind, q=q: service.manifest().get("freshness", {}).get(kind, {}).get(q, float("nan")))


class Service:
    def __init__(self, index_dir: str | Path, poll_s: float = 0.5):
        self.reader = IndexReader(index_dir, use_gpu=False)  # live inserts go to the CPU index
        self.posted: dict[int, np.ndarray] = {}  # by key
        self.posted_names: dict[int, str] = {}  # the string ids among them
        self.metrics = Metrics(self)
        self.poll_s = poll_s
        self._halt = threading.Event()
        self._posting = threading.Lock()  # a version is prepared and swapped in, or an item posted: not both at once
        self._thread = threading.Thread(target=self._follow, daemon=True, name="index-follower")

    # ---- versions --------------------------------------------------------------------------
    def _prepare(self, path: Path, loaded: LoadedVersion) -> None:
        """Loads what a version serves beside its index, and carries over the posted items it lacks."""
        loaded.extras["lock"] = threading.Lock()  # FAISS: no add while searching
        loaded.extras["mapper"] = EarlyStageMapper.load(path) if (path / MAPPING_FILE).exists() else None
        seen: dict[int, set[int]] = {}
        if (path / "seen.npz").exists():
            for u, i in np.load(path / "seen.npz")["pairs"].tolist():
                seen.setdefault(u, set()).add(i)
        loaded.extras["seen"] = seen
        loaded.string_item_ids  # noqa: B018 - computed here, with the version, not on a request
        loaded.names.update(self.posted_names)
        posted = np.array(list(self.posted), np.int64)
        for item, trained in zip(posted.tolist(), loaded.index.contains(posted)):
            if trained:
                del self.posted[item]  # the trainer serves it now
                self.posted_names.pop(item, None)
            else:
                loaded.index.add_with_ids(self.posted[item][None], np.array([item], np.int64))

    def refresh(self) -> bool:
        with self._posting:
            return self.reader.refresh(self._prepare)

    def _follow(self) -> None:
        while not self._halt.wait(self.poll_s):
            try:
                self.refresh()
            except Exception:  # a bad version must not stop the service: the reader keeps the old one
                log.exception("loading a new version failed")

    def start(self) -> None:
        self.refresh()
        self._thread.start()

    def stop(self) -> None:
        self._halt.set()

    def current(self) -> LoadedVersion:
        cur = self.reader.current
        if cur is None:
            raise HTTPException(503, f"no index version published under {self.reader.root} yet")
        return cur

    def manifest(self) -> dict:
        cur = self.reader.current
        return cur.manifest if cur else {}

    def item_count(self) -> int:
        cur = self.reader.current
        return cur.index.ntotal if cur else 0

    # ---- queries ---------------------------------------------------------------------------
    def _ranked(self, cur: LoadedVersion, query: np.ndarray, k: int, exclude: set[int]) -> Ranked:
        with cur.extras["lock"]:
            scores, ids = cur.index.search(query[None].astype(np.float32), min(k + len(exclude), cur.index.ntotal))
        items = [Scored(item_id=cur.raw_id(int(i)), score=float(s)) for s, i in zip(scores[0], ids[0])
                 if i >= 0 and int(i) not in exclude]
        return Ranked(version=cur.version, items=items[:k])

    def recommend(self, user_id: str, k: int) -> Ranked:
        cur = self.current()
        key = cur.key(user_id, cur.user_rows.__contains__)
        row = cur.user_rows.get(key)
        if row is None:
            raise HTTPException(404, f"unknown user_id {user_id} in version {cur.version}")
        return self._ranked(cur, cur.user_vectors[row], k, cur.extras["seen"].get(key, set()))

    def similar(self, item_id: str, k: int) -> Ranked:
        cur = self.current()
        with cur.extras["lock"]:
            key = cur.key(item_id, lambda k: bool(cur.index.contains(np.array([k], np.int64))[0]))
            try:
                vec = cur.index.reconstruct(key)
            except RuntimeError:
                raise HTTPException(404, f"unknown item_id {item_id} in version {cur.version}") from None
        return self._ranked(cur, vec, k, {key})

    def add_item(self, item_id: str, title: str, tags: list[str], images: list[bytes]) -> Posted:
        started = time.perf_counter()
        cur = self.current()
        mapper = cur.extras["mapper"]
        if mapper is None:
            raise HTTPException(409, f"version {cur.version} has no early-stage mapping (MEMER is off); cannot embed new items")
        vec = mapper.embed(images, title, tags).astype(np.float32)
        # a new id is known nowhere: where the version's items carry string ids, it is a string even
        # when it spells a number (else the trainer's copy, keyed by the string, would never replace it)
        raw = item_id if cur.string_item_ids else parse_id(item_id)
        key = id_key(raw)
        with self._posting:
            cur = self.current()  # a version swapped in while embedding has carried the older posts over
            with cur.extras["lock"]:
                cur.index.remove_ids(np.array([key], np.int64))
                cur.index.add_with_ids(vec[None], np.array([key], np.int64))
            self.posted[key] = vec
            if isinstance(raw, str):
                self.posted_names[key] = cur.names[key] = raw
        return Posted(item_id=raw, version=cur.version, latency_ms=round((time.perf_counter() - started) * 1000, 2))


def create_app(index_dir: str | Path, poll_s: float = 0.5) -> FastAPI:
    service = Service(index_dir, poll_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        yield
        service.stop()

    app = FastAPI(title="coldstream", description="Recommendations from the newest published coldstream index.", lifespan=lifespan)
    app.state.service = service

    @app.middleware("http")
    async def _measure(request: Request, call_next):
        endpoint = request.url.path
        started = time.perf_counter()
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_UPLOAD_BYTES:
            response = JSONResponse({"detail": f"request of {length} bytes exceeds the limit of {MAX_UPLOAD_BYTES} bytes"}, 413)
        else:
            response = await call_next(request)
        if endpoint in ("/recommend", "/similar", "/items", "/healthz"):
            service.metrics.requests.labels(endpoint, str(response.status_code)).inc()
            service.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
        return response

    @app.get("/recommend", response_model=Ranked)
    def recommend(user_id: Annotated[str, Query(min_length=1, max_length=MAX_ID_CHARS)], k: Count = 20) -> Ranked:
        """Top k items for a user, leaving out the items the version knows they interacted with."""
        return service.recommend(user_id, k)

    @app.get("/similar", response_model=Ranked)
    def similar(item_id: Annotated[str, Query(min_length=1, max_length=MAX_ID_CHARS)], k: Count = 20) -> Ranked:
        return service.similar(item_id, k)

    @app.post("/items", response_model=Posted)
    async def post_item(item_id: Annotated[str, Form(min_length=1, max_length=MAX_ID_CHARS)], title: Annotated[str, Form()],
                        image: Annotated[list[UploadFile], File(description="one or more frames")],
                        tags: Annotated[str, Form(description="|-separated")] = "") -> Posted:
        """Embeds a brand-new item with the published MEMER mapping and serves it at once."""
        images = [await f.read() for f in image]
        empty = [f.filename for f, data in zip(image, images) if not data]
        if empty:
            raise HTTPException(422, f"image {empty[0]!r} is empty")
        try:
            return service.add_item(item_id, title, [t for t in tags.split("|") if t], images)
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise HTTPException(422, f"unreadable image: {exc}") from None

    @app.get("/healthz")
    def healthz() -> dict:
        cur = service.current()
        return {"status": "ok", "version": cur.version, "items": cur.index.ntotal}

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def serve(index_dir: str | Path, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    if not storage.is_remote(index_dir) and not Path(index_dir).is_dir():
        raise SystemExit(f"no index directory at {index_dir}: publish one first (launch.py demo or train)")
    print(f"serving {index_dir} on http://{host}:{port} (follows LATEST)", flush=True)
    uvicorn.run(create_app(index_dir), host=host, port=port, log_level="warning")
