"""The generic input format: broken rows reported with line numbers and skipped,
missing modalities kept, replay order and the evaluation split."""
import json

import numpy as np
import pytest

from streaming.datasets import load_dataset
from streaming.replay import event_of, pack_items, replay, split_dataset
from streaming.shards import read_shard
from streaming.producer import Sink


@pytest.fixture
def small(tmp_path):
    (tmp_path / "inter.csv").write_text(
        "user_id,item_id,timestamp,rating\n"
        "u1,a,10,5\n"
        "u1,b,11,2\n"
        "u2,a,9,4\n"
        "u2,,12,5\n"          # line 5: empty item id
        "u3,c,noon,4\n"       # line 6: bad timestamp
        "u3,c,13,five\n"      # line 7: bad rating
        "u3,c,14,3\n"
        "u4,d,15\n"           # short row: rating missing -> implicit positive
    )
    (tmp_path / "items.csv").write_text("item_id,title,tags\na,Alpha,x|y\nb,Beta,\nc\nd,Delta,y\ne,Extra,z\n")
    img = tmp_path / "img"
    (img / "d").mkdir(parents=True)
    from PIL import Image
    Image.new("RGB", (10, 12), (255, 0, 0)).save(img / "a.jpg")
    for n in range(3):
        Image.new("RGB", (8, 8), (0, 0, 40 * n)).save(img / "d" / f"{n}.png")
    return load_dataset(tmp_path / "inter.csv", tmp_path / "items.csv", img)


def test_broken_rows_are_reported_with_line_numbers_and_skipped(small):
    assert len(small.rows) == 5
    assert any("inter.csv line 5" in p for p in small.problems)
    assert any("inter.csv line 6" in p for p in small.problems)
    assert any("inter.csv line 7" in p for p in small.problems)
    assert any("items.csv line 4" in p for p in small.problems)  # "c" with no title column
    assert [r.ts for r in small.rows] == sorted(r.ts for r in small.rows)
    # dense ids follow first appearance in time; catalogue-only items come last
    assert small.item_ids == {"a": 0, "b": 1, "c": 2, "d": 3, "e": 4}
    assert small.user_ids["u2"] == 0


def test_missing_modalities_are_kept(small, tmp_path):
    urls = pack_items(small, tmp_path / "shards", items_per_shard=2)
    content = {}
    for url in set(urls.values()):
        content.update(read_shard(url, 4, 16))
    assert set(content) == {0, 1, 2, 3, 4}
    assert content[0].has_frames and content[0].text == "Alpha x y"
    assert not content[1].has_frames and content[1].text == "Beta"
    assert content[2].text == "" and not content[2].has_frames  # no item row, no image: still an item
    assert content[3].frames.shape == (4, 16, 16, 3) and len({f.mean() for f in content[3].frames}) > 1


def test_ratings_become_events():
    from streaming.datasets import Row
    assert event_of(Row("u", "i", 0, 4.0, None), 4.0) == "like"
    assert event_of(Row("u", "i", 0, 3.5, None), 4.0) == "skip"
    assert event_of(Row("u", "i", 0, None, None), 4.0) == "play"
    assert event_of(Row("u", "i", 0, 1.0, "click"), 4.0) == "click"


def test_replay_announces_first_and_holds_out_what_the_split_says(small, tmp_path):
    split = split_dataset(small, cold_fraction=0.2, seed=1)
    assert len(split.cold_items) == 1
    urls = pack_items(small, tmp_path / "shards")
    log = []
    for _ in replay(small, urls, Sink(lambda e: log.append(("event", e.item_id)), lambda k, v: None,
                                      lambda a: log.append(("announce", a.item_id))), split.train, threshold=4.0):
        pass
    announced = [i for kind, i in log if kind == "announce"]
    assert sorted(announced) == [0, 1, 2, 3, 4]  # cold and catalogue-only items are announced too
    for n, (kind, item) in enumerate(log):
        if kind == "event":
            assert ("announce", item) in log[:n]
    cold_ids = {small.item_ids[k] for k in split.cold_items}
    assert not {i for kind, i in log if kind == "event"} & cold_ids
    assert len([1 for kind, _ in log if kind == "event"]) == len(split.train)
    assert set(split.train) | set(split.test) == {i for i, r in enumerate(small.rows) if r.item not in split.cold_items}


def test_export_split_writes_the_rows_candidates_and_masks_eval_scores_on(tmp_path):
    """`launch.py eval --export-split`: an outside model gets exactly the protocol's split."""
    from cluster.offline import export_split, protocol

    rng = np.random.default_rng(0)
    lines = ["user_id,item_id,timestamp,rating"] + [f"u{u},i{i},{k},{rng.integers(1, 6)}"
                                                    for k, (u, i) in enumerate(rng.integers(0, [20, 15], (200, 2)))]
    (tmp_path / "inter.csv").write_text("\n".join(lines) + "\n")
    ds = load_dataset(tmp_path / "inter.csv")
    split = split_dataset(ds, 0.2, 1)
    d = np.load(export_split(ds, split, 4.0, tmp_path / "out"))
    proto = protocol(ds, split, 4.0)
    assert len(d["train_user"]) == len(split.train) and (tmp_path / "out" / "README.md").exists()
    first = ds.rows[split.train[0]]
    assert (d["user_raw"][d["train_user"][0]], d["item_raw"][d["train_item"][0]]) == (first.user, first.item)
    assert d["eval_users"].tolist() == sorted(proto.test_pos)
    for name in ("cold", "warm", "all"):
        cands = d[f"{name}_items"]
        assert cands.tolist() == proto.candidates[name].tolist()
        valid = np.unpackbits(d[f"{name}_valid"], axis=1, count=len(cands)).astype(bool)
        positive = np.unpackbits(d[f"{name}_positive"], axis=1, count=len(cands)).astype(bool)
        for r, u in enumerate(d["eval_users"]):
            assert set(cands[~valid[r]].tolist()) == proto.train_seen.get(int(u), set()) & set(cands.tolist())
            assert set(cands[positive[r]].tolist()) == proto.test_pos[int(u)] & set(cands.tolist())


def test_score_ranks_an_outside_models_matrices_on_the_exported_split(tmp_path, capsys):
    """`launch.py score`: the truth as scores gives perfect recall, its negation less, and a
    matrix of the wrong shape stops with a message naming the set (exit 2)."""
    from cluster.offline import export_split
    from launch import main

    rng = np.random.default_rng(0)
    lines = ["user_id,item_id,timestamp,rating"] + [f"u{u},i{i},{k},{rng.integers(1, 6)}"
                                                    for k, (u, i) in enumerate(rng.integers(0, [30, 60], (600, 2)))]
    (tmp_path / "inter.csv").write_text("\n".join(lines) + "\n")
    ds = load_dataset(tmp_path / "inter.csv")
    d = np.load(export_split(ds, split_dataset(ds, 0.2, 1), 4.0, tmp_path / "split"))
    truth = {s: np.unpackbits(d[f"{s}_positive"], axis=1, count=len(d[f"{s}_items"])).astype(np.float32) for s in ("cold", "warm", "all")}
    np.savez(tmp_path / "oracle.npz", **truth)
    np.savez(tmp_path / "inverse.npz", **{s: -m for s, m in truth.items()})
    assert main(["score", "--split", str(tmp_path / "split"), "--scores", str(tmp_path / "oracle.npz")]) == 0
    oracle = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["score", "--split", str(tmp_path / "split"), "--scores", str(tmp_path / "inverse.npz")]) == 0
    inverse = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for s in ("cold", "warm", "all"):
        assert oracle[s]["recall@20"] == oracle[s]["auc"] == 1.0
        assert inverse[s]["ndcg@20"] < 1.0 and inverse[s]["auc"] == 0.0
    np.savez(tmp_path / "bad.npz", cold=truth["cold"][:, 1:])
    assert main(["score", "--split", str(tmp_path / "split"), "--scores", str(tmp_path / "bad.npz")]) == 2
    assert "'cold' has shape" in capsys.readouterr().err
