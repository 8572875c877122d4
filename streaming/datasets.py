"""The generic input format for real interaction data, read with line-level error reports.

  interactions CSV: user_id,item_id,timestamp[,rating | ,event]
  items CSV:        item_id,title[,tags]          (tags separated by '|')
  images folder:    <item_id>.jpg|.png, or <item_id>/<n>.jpg|.png for several frames

Ids may be any strings; they are mapped to dense integers (the embedding-table rows)
in order of first appearance in time. Rows that do not parse are reported with their
line number and skipped; an item without images or text is kept (a missing modality
is the model's problem to handle, not a reason to drop the item).
"""
from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path

from streaming.schema import EVENT_TYPES
from streaming.shards import item_text

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class Row:
    user: str
    item: str
    ts: float
    rating: float | None
    event: str | None


@dataclass
class ItemMeta:
    title: str
    tags: list[str]


@dataclass
class Dataset:
    rows: list[Row]  # sorted by time
    items: dict[str, ItemMeta]
    images_dir: Path | None
    problems: list[str] = field(default_factory=list)
    user_ids: dict[str, int] = field(default_factory=dict)
    item_ids: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for r in self.rows:
            self.user_ids.setdefault(r.user, len(self.user_ids))
            self.item_ids.setdefault(r.item, len(self.item_ids))
        for key in self.items:  # catalogue items nobody touched still get a row, after the others
            self.item_ids.setdefault(key, len(self.item_ids))

    def text(self, item: str) -> str:
        meta = self.items.get(item)
        return item_text(meta.title, meta.tags) if meta else ""

    def images(self, item: str) -> list[Path]:
        if self.images_dir is None:
            return []
        folder = self.images_dir / item
        if folder.is_dir():
            return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        return [p for s in IMAGE_SUFFIXES if (p := self.images_dir / f"{item}{s}").exists()][:1]


def _open_csv(path: Path, required: tuple[str, ...]):
    f = open(path, newline="", encoding="utf-8", errors="replace")
    reader = csv.DictReader(f)
    missing = [c for c in required if c not in (reader.fieldnames or [])]
    if missing:
        f.close()
        raise ValueError(f"{path}: header lacks column(s) {missing}; found {reader.fieldnames}")
    return f, reader


def read_interactions(path: Path) -> tuple[list[Row], list[str]]:
    rows, problems = [], []
    f, reader = _open_csv(path, ("user_id", "item_id", "timestamp"))
    with f:
        for row in reader:
            line = reader.line_num
            try:
                user, item = (row["user_id"] or "").strip(), (row["item_id"] or "").strip()
                if not user or not item:
                    raise ValueError("empty user_id or item_id")
                ts = float(row["timestamp"])
                rating = float(row["rating"]) if row.get("rating") not in (None, "") else None
                event = (row.get("event") or "").strip() or None
                if event is not None and event not in EVENT_TYPES:
                    raise ValueError(f"event {event!r} is not one of {EVENT_TYPES}")
                rows.append(Row(user, item, ts, rating, event))
            except (TypeError, ValueError) as exc:
                problems.append(f"{path.name} line {line}: {exc}")
    rows.sort(key=lambda r: r.ts)
    return rows, problems


def read_items(path: Path) -> tuple[dict[str, ItemMeta], list[str]]:
    items, problems = {}, []
    f, reader = _open_csv(path, ("item_id", "title"))
    with f:
        for row in reader:
            key = (row.get("item_id") or "").strip()
            if not key or None in row.values():
                problems.append(f"{path.name} line {reader.line_num}: missing item_id or too few columns")
                continue
            tags = [t.strip() for t in (row.get("tags") or "").split("|") if t.strip()]
            items[key] = ItemMeta((row.get("title") or "").strip(), tags)
    return items, problems


def load_dataset(interactions: Path, items: Path | None = None, images: Path | None = None) -> Dataset:
    rows, problems = read_interactions(Path(interactions))
    meta, item_problems = read_items(Path(items)) if items else ({}, [])
    for p in problems + item_problems:
        log.warning("skipped %s", p)
    if not rows:
        raise ValueError(f"{interactions}: no usable interaction rows")
    return Dataset(rows, meta, Path(images) if images else None, problems + item_problems)
