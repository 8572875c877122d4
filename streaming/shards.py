"""Item content as WebDataset tar shards: frames as images, a caption, and metadata.

A shard is written to a temporary name and renamed when complete, and items are
announced only after that, so a reader never sees a half-written tar. Reading is
per shard (announcements arrive in shard order), and a shard that cannot be read
costs only its own items, each skipped with a logged reason.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from streaming import storage
from streaming.schema import RawId, id_key

log = logging.getLogger(__name__)

IMAGE_EXTS = (".png", ".jpg", ".jpeg")


@dataclass
class ItemContent:
    item_id: RawId  # as announced; the caches below are keyed by its key (streaming.schema.id_key)
    frames: np.ndarray  # uint8 [F, S, S, 3]; zeros where the item has no image
    has_frames: bool
    text: str
    meta: dict


def write_shard(path: str | Path, items: list[dict]) -> str:
    """items: dicts with item_id, frames (list of encoded image bytes, with their extension), text, meta.
    `path` is local, or an object-store URI (s3://...): the shard is built locally and uploaded whole.
    Returns the URL an announcement carries."""
    if storage.is_remote(path):
        with tempfile.TemporaryDirectory(prefix="coldstream-shard-") as d:
            storage.put_file(Path(write_shard(Path(d) / "shard.tar", items)[len("file://"):]), str(path))
        return str(path)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with wds.TarWriter(str(tmp)) as sink:
        for it in items:
            sample = {"__key__": f"{id_key(it['item_id']):019d}", "json": json.dumps({"item_id": it["item_id"], **it.get("meta", {})}).encode()}
            if it.get("text"):
                sample["txt"] = it["text"].encode()
            for n, (data, ext) in enumerate(it.get("frames", [])):
                sample[f"frame{n:03d}.{ext}"] = data
            sink.write(sample)
    os.replace(tmp, path)
    return path.resolve().as_uri()


def encode_png(pixels: np.ndarray) -> tuple[bytes, str]:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue(), "png"


def item_text(title: str, tags: list[str]) -> str:
    """The text an item's encoder reads: its title, then its tags."""
    return f"{title} {' '.join(tags)}".strip()


def decode_frames(images: list[bytes], n_frames: int, size: int) -> np.ndarray:
    """Decodes, resizes to size x size, and repeats/truncates to n_frames (a clip of fixed length)."""
    decoded = []
    for data in images:
        img = Image.open(io.BytesIO(data)).convert("RGB").resize((size, size), Image.BILINEAR)
        decoded.append(np.asarray(img, dtype=np.uint8))
    if not decoded:
        return np.zeros((n_frames, size, size, 3), np.uint8)
    idx = np.linspace(0, len(decoded) - 1, n_frames).round().astype(int) if len(decoded) > 1 else np.zeros(n_frames, int)
    return np.stack([decoded[i] for i in idx])


def read_shard(url: str, n_frames: int, size: int) -> dict[int, ItemContent]:
    """All items of one shard, by id key; raises OSError/ValueError (with the cause) when the shard is unusable."""
    out: dict[int, ItemContent] = {}
    # Every worker needs every item, so no node/worker splitting; and no handler: a
    # truncated or garbled tar raises, and the caller skips the shard's items.
    with contextlib.ExitStack() as stack:
        if storage.is_remote(url):
            fs, key = storage.filesystem(url)
            stream = stack.enter_context(fs.open_input_stream(key))  # FileNotFoundError names a missing shard
            samples = wds.tariterators.group_by_keys(wds.tariterators.tar_file_expander([{"url": url, "stream": stream}]))
        else:
            path = url[len("file://"):] if url.startswith("file://") else url
            if not os.path.exists(path):
                raise FileNotFoundError(f"shard {url} does not exist")
            samples = wds.DataPipeline(wds.SimpleShardList([path]), wds.tarfile_to_samples())
        for sample in samples:
            meta = json.loads(sample["json"]) if "json" in sample else {}
            item_id = meta["item_id"] if isinstance(meta.get("item_id"), (int, str)) else int(sample["__key__"])
            frame_keys = sorted(k for k in sample if k.startswith("frame") and k.endswith(IMAGE_EXTS))
            frames = decode_frames([sample[k] for k in frame_keys], n_frames, size)
            text = sample["txt"].decode("utf-8", "replace") if "txt" in sample else ""
            out[id_key(item_id)] = ItemContent(item_id, frames, bool(frame_keys), text, meta)
    return out


class ShardCache:
    """Item content looked up by announcement (by id key); each shard is read once."""

    def __init__(self, n_frames: int, size: int):
        self.n_frames, self.size = n_frames, size
        self.items: dict[int, ItemContent] = {}
        self.skipped: dict[int, str] = {}
        self._read: set[str] = set()
        self._failed: dict[str, str] = {}

    def fetch(self, item_id: RawId, url: str) -> ItemContent | None:
        key = id_key(item_id)
        if key in self.items:
            return self.items[key]
        if url not in self._read and url not in self._failed:
            try:
                self.items.update(read_shard(url, self.n_frames, self.size))
                self._read.add(url)
            except Exception as exc:  # any decode/tar/IO failure: skip, never crash the job
                self._failed[url] = f"{type(exc).__name__}: {exc}"
                log.warning("skipping shard %s: %s", url, self._failed[url])
        if key in self.items:
            return self.items[key]
        reason = self._failed.get(url, f"item {item_id!r} not found in shard {url}")
        if url not in self._failed:  # a failed shard was logged once above; a missing item is news
            log.warning("skipping item %r: %s", item_id, reason)
        self.skipped[key] = reason
        return None
