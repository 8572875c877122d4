"""MovieLens 100K into the generic format: a small adapter, not a second pipeline.

u.data (tab-separated user, item, rating, timestamp) becomes the interactions CSV,
u.item (pipe-separated, latin-1, genre flags) the items CSV with genres as tags, and
posters/<movie id>.jpg already is an images folder.
"""
from __future__ import annotations

import csv
from pathlib import Path

DEFAULT_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets" / "movielens-100k"


def to_generic(src: Path, out: Path) -> tuple[Path, Path, Path]:
    """Writes interactions.csv and items.csv under `out`; returns them and the posters folder."""
    src, out = Path(src), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    genres = [line.split("|")[0] for line in (src / "u.genre").read_text(encoding="latin-1").splitlines() if line.strip()]
    inter, items = out / "interactions.csv", out / "items.csv"
    with open(inter, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "item_id", "timestamp", "rating"])
        for line in (src / "u.data").read_text().splitlines():
            user, item, rating, ts = line.split("\t")
            w.writerow([user, item, ts, rating])
    with open(items, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["item_id", "title", "tags"])
        for line in (src / "u.item").read_text(encoding="latin-1").splitlines():
            parts = line.split("|")
            flags = parts[5:5 + len(genres)]
            w.writerow([parts[0], parts[1], "|".join(g for g, on in zip(genres, flags) if on == "1")])
    return inter, items, src / "posters"
