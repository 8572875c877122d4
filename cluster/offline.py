"""`launch.py eval`: the cold-start evaluation protocol on a real dataset, through the
real path. Split (seeded cold items + per-user warm test) -> replay the training
part through Kafka -> train on Ray for the budget -> publish -> rank every test user
over the cold, warm and all candidates through the published index, next to the
baselines on the same split and candidates."""
from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cluster.config import Config, ConfigError
from cluster import plots
from cluster.early_stage import MappedVersion, early_stage, transition
from cluster.monitor import VersionWatcher
from cluster.ray_job import run_training
from cluster.services import broker_for
from embeddings.clusters import FRAME_DIM, TEXT_DIM, frame_descriptor, text_descriptor
from embeddings.reader import IndexReader, LoadedVersion
from streaming.datasets import Dataset, load_dataset
from streaming.producer import EventProducer
from streaming.replay import Split, Validation, event_of, pack_items, replay, split_dataset, validation_split
from streaming.schema import POSITIVE_EVENTS
from streaming.shards import read_shard
from trainer import baselines
from trainer.metrics import exact_scores, score_metrics
from trainer.regression import ContentRegression

log = logging.getLogger(__name__)
STARTUP_RESERVE_S = 75.0  # Ray start, replay, final publication and scoring, inside the budget


def size_for(cfg: Config, ds: Dataset, minutes: float) -> Config:
    """Clip length sized to the dataset's images, training time to the budget. (The ID tables are
    not sized to it: they hold `model.user_rows` / `item_rows` and evict beyond that.)"""
    cfg = cfg.model_copy(deep=True)
    most_frames = max((len(ds.images(k)) for k in ds.item_ids), default=0)
    cfg.model.frames = max(1, min(cfg.model.frames, most_frames))
    cfg.train.duration_s = max(20.0, minutes * 60 - STARTUP_RESERVE_S)
    # every version whole and kept: the one validation picks is scored, with its early-stage variants
    cfg.publish.rebase_every = 1
    cfg.publish.keep_versions = 10_000
    return cfg


def _items_by_user(ds: Dataset, rows: np.ndarray, threshold: float | None = None) -> dict[int, set[int]]:
    """Dense user id -> dense item ids over the given rows; with a threshold, positives only."""
    out: dict[int, set[int]] = {}
    for idx in rows:
        r = ds.rows[idx]
        if threshold is None or event_of(r, threshold) in POSITIVE_EVENTS:
            out.setdefault(ds.user_ids[r.user], set()).add(ds.item_ids[r.item])
    return out


def evaluate_dataset(cfg: Config, interactions: Path, items: Path | None, images: Path | None, cold_fraction: float,
                     seed: int, minutes: float, threshold: float = 4.0) -> dict:
    started = time.time()
    ds = load_dataset(interactions, items, images)
    split = split_dataset(ds, cold_fraction, seed)
    cfg = size_for(cfg, ds, minutes)
    if cfg.storage:
        raise ConfigError(f"config error: storage={cfg.storage}: evaluation keeps its run on this machine (it reads the "
                          "shards and index it scores from the run directory); unset storage")
    run_dir = cfg.run_dir
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    log.info("dataset: %d rows (%d skipped), %d users, %d items; %d cold items, %d train rows, %d warm test rows",
             len(ds.rows), len(ds.problems), len(ds.user_ids), len(ds.item_ids), len(split.cold_items), len(split.train), len(split.test))
    val = validation_split(ds, split.train, seed)
    val_proto = validation_protocol(ds, val, threshold)
    urls = pack_items(ds, run_dir / "shards")
    reader = IndexReader(run_dir / "index")
    versions: dict[int, LoadedVersion] = {}

    def validate() -> dict | None:
        """Scores a new version on the validation slice; keeps it while it is the best so far."""
        m = {name: score_metrics(*_matrices(reader, val_proto, name)) for name in ("cold", "warm")}
        score = (m["cold"]["recall@20"] + m["warm"]["recall@20"]) / 2
        cur = reader.current
        if not versions or score > max(q["score"] for q in watcher.history):
            versions.clear()
            versions[cur.version] = cur
        return {"version": cur.version, "step": cur.manifest.get("step"), "score": score, "cold": m["cold"]["recall@20"],
                "warm": m["warm"]["recall@20"], "summary": f"validation recall@20 cold {m['cold']['recall@20']:.4f} "
                f"warm {m['warm']['recall@20']:.4f} (step {cur.manifest.get('step')})"}

    watcher = VersionWatcher(reader, validate)
    with broker_for(cfg) as bootstrap:
        producer = EventProducer(cfg.kafka, bootstrap)

        def produce() -> None:
            for line in replay(ds, urls, producer.sink(), val.train, threshold=threshold):
                log.info("replay: %s", line)
            producer.close()

        thread = threading.Thread(target=produce, daemon=True, name="replay")
        thread.start()
        watcher.start()
        try:
            final = run_training(cfg, bootstrap)
        finally:
            watcher.stop(timeout_s=None)  # a validation pass in flight finishes before the last poll
        thread.join()
    watcher.poll()  # the last version, if the watcher had not seen it
    if not versions:
        raise RuntimeError(f"no index was published under {run_dir / 'index'}")
    best = max(watcher.history, key=lambda q: q["score"])
    reader.pin(versions[best["version"]])
    log.info("evaluating index v%d (step %s), the best of %d by validation recall@20 (cold %.4f, warm %.4f)",
             best["version"], best["step"], len(watcher.history), best["cold"], best["warm"])
    result = score_split(reader, ds, split, threshold, run_dir / "shards", seed)
    result["validation"] = {"chosen_version": best["version"], "chosen_step": best["step"], "pseudo_cold_items": len(val.cold_items),
                            "held_rows": int(len(val.warm_rows) + len(val.cold_rows)),
                            "history": [{k: q[k] for k in ("version", "step", "cold", "warm", "score")} for q in watcher.history]}
    plots.validation_curve(result["validation"], run_dir / "validation.png")
    result["run"] = {"train_steps": final.get("train_steps"), "events_consumed": final.get("events_consumed"),
                     "rows_skipped": len(ds.problems), "cold_items": len(split.cold_items), "train_rows": int(len(split.train)),
                     "warm_test_rows": int(len(split.test)), "minutes": minutes, "seed": seed, "wall_s": round(time.time() - started, 1)}
    write_report(result, run_dir)
    return result


@dataclass
class Protocol:
    """The candidates and truth every method is scored on (dense ids)."""

    candidates: dict[str, np.ndarray]  # "cold", "warm", "all"
    train_seen: dict[int, set[int]]  # every training item of a user: not a candidate for them
    test_pos: dict[int, set[int]]  # warm test positives and every positive on a cold item
    train_pos: dict[int, set[int]]


def protocol(ds: Dataset, split: Split, threshold: float) -> Protocol:
    cold_ids = np.array(sorted(ds.item_ids[k] for k in split.cold_items), np.int64)
    warm_ids = np.array(sorted(set(ds.item_ids.values()) - set(cold_ids.tolist())), np.int64)
    cold_rows = np.array([i for i, r in enumerate(ds.rows) if r.item in split.cold_items], np.int64)
    return Protocol({"cold": cold_ids, "warm": warm_ids, "all": np.concatenate([warm_ids, cold_ids])},
                    _items_by_user(ds, split.train), _items_by_user(ds, np.concatenate([split.test, cold_rows]), threshold),
                    _items_by_user(ds, split.train, threshold))


def masks(proto: Protocol, users: list[int], cands: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[users, candidates]: (test positives, candidates each user is ranked over: all but their training items)."""
    positive = np.array([[int(i) in proto.test_pos.get(int(u), ()) for i in cands] for u in users]).reshape(len(users), len(cands))
    valid = np.array([[int(i) not in proto.train_seen.get(int(u), ()) for i in cands] for u in users]).reshape(len(users), len(cands))
    return positive, valid


def validation_protocol(ds: Dataset, val: Validation, threshold: float) -> Protocol:
    """The validation slice as a protocol: pseudo-cold items against each other, held rows against
    the items trained on; only training rows are read."""
    cold_ids = np.array(sorted(ds.item_ids[k] for k in val.cold_items), np.int64)
    warm_ids = np.array(sorted({ds.item_ids[ds.rows[i].item] for i in val.train}), np.int64)
    return Protocol({"cold": cold_ids, "warm": warm_ids}, _items_by_user(ds, val.train),
                    _items_by_user(ds, np.concatenate([val.warm_rows, val.cold_rows]), threshold), _items_by_user(ds, val.train, threshold))


def _matrices(reader: IndexReader, proto: Protocol, name: str) -> tuple:
    """The model's (scores, positive, valid, users, candidates) for one candidate set, over the users
    with a positive there (a user the version does not know ranks nothing: scored as zero)."""
    cands = proto.candidates[name]
    members = set(cands.tolist())
    wanted = sorted(u for u, items in proto.test_pos.items() if items & members)
    vecs, users = reader.user_vectors(wanted)
    missing = sorted(set(wanted) - set(users))
    scores = reader.score_matrix(vecs, cands) if users else np.zeros((0, len(cands)), np.float32)
    scores = np.concatenate([scores, np.zeros((len(missing), len(cands)), np.float32)])
    users = users + missing
    return (scores, *masks(proto, users, cands), users, cands)


def export_split(ds: Dataset, split: Split, threshold: float, out: Path) -> Path:
    """Writes the exact split (`split.npz` and a README of its fields), so an outside model can be
    trained and scored on the rows, candidates and masks `score_split` uses."""
    proto = protocol(ds, split, threshold)
    users = np.array(sorted(proto.test_pos), np.int64)
    raw_users = np.array(sorted(ds.user_ids, key=ds.user_ids.get), dtype=object).astype(str)
    raw_items = np.array(sorted(ds.item_ids, key=ds.item_ids.get), dtype=object).astype(str)
    rows = [ds.rows[i] for i in split.train]
    arrays = {
        "train_user": np.array([ds.user_ids[r.user] for r in rows], np.int64),
        "train_item": np.array([ds.item_ids[r.item] for r in rows], np.int64),
        "train_ts": np.array([r.ts for r in rows], np.float64),
        "train_event": np.array([event_of(r, threshold) for r in rows]).astype(str),
        "user_raw": raw_users, "item_raw": raw_items, "eval_users": users,
        "test_user": np.array([u for u in users for _ in sorted(proto.test_pos[u])], np.int64),
        "test_item": np.array([i for u in users for i in sorted(proto.test_pos[u])], np.int64),
    }
    for name, cands in proto.candidates.items():
        arrays[f"{name}_items"] = cands
        positive, valid = masks(proto, users, cands)
        arrays[f"{name}_positive"], arrays[f"{name}_valid"] = np.packbits(positive, axis=1), np.packbits(valid, axis=1)
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "split.npz", **arrays)
    (out / "README.md").write_text(SPLIT_README.format(users=len(users), users_all=len(raw_users), items=len(raw_items), rows=len(rows), threshold=threshold,
                                                       **{f"n_{k}": len(v) for k, v in proto.candidates.items()}))
    return out / "split.npz"


SPLIT_README = """# A coldstream evaluation split

`split.npz` (numpy). Ids are dense (0..n-1, in order of first appearance in time); `user_raw[d]` and
`item_raw[d]` are the raw ids of dense id d, as the dataset spells them.

| field | shape | meaning |
|---|---|---|
| train_user, train_item, train_ts, train_event | [{rows}] | the training rows, in time order; event is like/skip (rating >= {threshold} or below), or the file's own event. coldstream replays these minus its validation slice (5% of items, 5% of each user's rows: `streaming/replay.py:validation_split`); the baselines train on all of them |
| user_raw, item_raw | [{users_all}], [{items}] | raw ids |
| eval_users | [{users}] | the users scored: those with a test positive (row r of every mask below is eval_users[r]) |
| test_user, test_item | pairs | the test positives: warm test rows at or above the threshold, and every positive on a cold item |
| cold_items, warm_items, all_items | [{n_cold}], [{n_warm}], [{n_all}] | the candidates of each set (dense item ids); columns of the masks |
| <set>_positive | [{users}, ceil(n/8)] | np.packbits of the test positives (np.unpackbits(m, axis=1, count=n).astype(bool)) |
| <set>_valid | [{users}, ceil(n/8)] | np.packbits of the candidates each user is ranked over: all but their training items |

Score every valid candidate, rank per user (break ties at random), and average Recall / NDCG at 10 and
20 over users with a positive among their valid candidates: that is `trainer/metrics.py:score_metrics`.
"""


def score_external(split_dir: Path, scores_file: Path) -> dict:
    """`launch.py score`: an outside model's score matrices (`cold`, `warm`, `all` in an npz, each
    [eval_users, that set's candidates]) ranked with the project's metrics on an exported split;
    the same JSON fields as `launch.py eval` gives its own model."""
    split, scores = np.load(Path(split_dir) / "split.npz"), np.load(scores_file)
    users = split["eval_users"].tolist()
    result: dict = {}
    for name in ("cold", "warm", "all"):
        if name not in scores.files:
            continue
        cands = split[f"{name}_items"]
        shape = (len(users), len(cands))
        if scores[name].shape != shape:
            raise ValueError(f"{scores_file}: '{name}' has shape {scores[name].shape}, the split's {name} set needs {shape} "
                             f"(eval_users x {name}_items)")
        positive, valid = (np.unpackbits(split[f"{name}_{m}"], axis=1, count=len(cands)).astype(bool) for m in ("positive", "valid"))
        result[name] = {k: round(v, 5) for k, v in score_metrics(scores[name].astype(np.float64), positive, valid, users, cands).items()}
    if not result:
        raise ValueError(f"{scores_file}: no 'cold', 'warm' or 'all' matrix in it")
    return result


def score_split(reader: IndexReader, ds: Dataset, split: Split, threshold: float, shard_dir: Path, seed: int) -> dict:
    proto = protocol(ds, split, threshold)
    cold_ids, warm_ids, all_ids = proto.candidates["cold"], proto.candidates["warm"], proto.candidates["all"]
    train_seen, test_pos, train_pos = proto.train_seen, proto.test_pos, proto.train_pos
    user_vecs, users = reader.user_vectors(sorted(test_pos))
    users_missing = sorted(set(test_pos) - set(users))  # never in the training stream: no vector, ranked last
    dim = user_vecs.shape[1]
    if users_missing:
        user_vecs = np.concatenate([user_vecs, np.zeros((len(users_missing), dim), np.float32)])
        users = users + users_missing

    # item vectors as published (for MEMER's averaging baselines) and content features (for k-NN)
    cur = reader.current
    vec_of = {int(i): cur.index.reconstruct(int(i)) for i in cur.item_ids}
    content = {}
    for url in sorted({p.resolve().as_uri() for p in shard_dir.glob("*.tar")}):
        content.update(read_shard(url, 1, 32))
    frame_desc = np.zeros((len(ds.item_ids), FRAME_DIM), np.float32)  # items whose shard failed: zeros
    text_desc = np.zeros((len(ds.item_ids), TEXT_DIM), np.float32)
    for i, c in content.items():
        frame_desc[i], text_desc[i] = frame_descriptor(c.frames), text_descriptor(c.text)
    features = np.concatenate([frame_desc, text_desc], 1)
    tags = {i: set(c.meta.get("tags", [])) for i, c in content.items()}
    liked = [np.array(sorted(train_pos.get(u, ())), np.int64) for u in users]
    pos_count = np.zeros(len(ds.item_ids))
    for items_liked in train_pos.values():
        pos_count[list(items_liked)] += 1
    warm_vecs = np.stack([vec_of[int(i)] for i in warm_ids if int(i) in vec_of])
    warm_with_vec = [int(i) for i in warm_ids if int(i) in vec_of]
    averaged = {
        "global_avg": dict(zip(cold_ids.tolist(), baselines.global_average_vectors(warm_vecs, len(cold_ids)))),
        "tag_avg": dict(zip(cold_ids.tolist(), baselines.tag_average_vectors(
            warm_vecs, [tags.get(i, set()) for i in warm_with_vec], [tags.get(int(i), set()) for i in cold_ids]))),
    }

    # the learned baselines: ALS on the training positives, and content regressed to its item factors
    user_f, item_f = baselines.als_factors(train_pos, len(ds.user_ids), len(ds.item_ids), seed)
    fit = pos_count > 0  # DeepMusic-style: the same content regression the model serves new items by, onto ALS's factors
    content_f = np.where(fit[:, None], item_f, ContentRegression.fit(frame_desc[fit], text_desc[fit], item_f[fit], seed).raw(frame_desc, text_desc))
    als_users = user_f[np.array(users, np.int64)]

    def matrices(cands: np.ndarray, with_averages: bool) -> dict[str, np.ndarray]:
        """Score matrices per method; the averaging baselines only replace cold items' vectors,
        so on warm candidates they would be the model itself and are left out."""
        zero = np.zeros(dim, np.float32)
        out = {
            "model": reader.score_matrix(user_vecs, cands),
            "random": baselines.random_scores(len(users), len(cands), seed),
            "popularity": baselines.popularity_scores(pos_count[cands], len(users)),
            "content_knn": baselines.content_knn_scores(liked, features, features[cands]),
            "als": als_users @ item_f[cands].T,
        }
        if with_averages:  # a cold item has no ALS factors of its own: its content's regressed ones
            out["content_to_als"] = als_users @ content_f[cands].T
        for name, table in (averaged.items() if with_averages else ()):
            vecs = np.stack([table.get(int(i), vec_of.get(int(i), zero)) for i in cands])
            out[name] = exact_scores(user_vecs, vecs)
        return out

    result: dict = {"baselines": {}}
    for set_name, cands in (("cold", cold_ids), ("warm", warm_ids), ("all", all_ids)):
        if len(cands) == 0:
            continue
        positive, valid = masks(proto, users, cands)
        for method, scores in matrices(cands, with_averages=set_name != "warm").items():
            m = {k: round(v, 5) for k, v in score_metrics(scores, positive, valid, users, cands).items()}
            if method == "model":
                result[set_name] = m
            else:
                result["baselines"].setdefault(method, {})[set_name] = m
    result["index_version"] = reader.version
    version_dir = reader.root / f"v{reader.version:06d}"
    vectors = dict(zip(users, user_vecs))
    known = {u: vectors[u] for u in users if u not in users_missing}
    everything = _items_by_user(ds, np.concatenate([split.train, split.test]))
    published = MappedVersion.load(version_dir, shard_dir)
    if published.mapper is not None:  # CIERec's report: the cold items embedded with and without their images
        cold_rows = [r for r, u in enumerate(users) if test_pos.get(u, set()) & set(cold_ids.tolist())]
        positive, valid = masks(proto, [users[r] for r in cold_rows], cold_ids)
        result["cold_images_withheld"] = {
            name: {k: round(v, 5) for k, v in score_metrics(exact_scores(user_vecs[cold_rows], published.remap(cold_ids, withhold_images=hide)),
                                                              positive, valid, [users[r] for r in cold_rows], cold_ids).items()}
            for name, hide in (("with_images", False), ("images_withheld", True))}
    result["early_stage"] = early_stage(published, known, _items_by_user(ds, split.test, threshold), everything, tags, seed)
    counts: dict[int, int] = {}
    for idx in split.train:
        item = ds.item_ids[ds.rows[idx].item]
        counts[item] = counts.get(item, 0) + 1
    result["transition"] = transition(published, users, user_vecs, test_pos, train_seen, counts)
    return result


def write_report(result: dict, run_dir: Path) -> None:
    """eval.json, a markdown table and a bar chart (recall@20 per method, cold / warm / all)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (run_dir / "eval.json").write_text(json.dumps(result, indent=1))
    methods = {"model": {s: result[s] for s in ("cold", "warm", "all") if s in result}} | result["baselines"]
    cols = ["recall@10", "recall@20", "ndcg@10", "ndcg@20", "precision@10", "precision@20", "auc"]
    lines = ["| method | set | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for name, sets in methods.items():
        for s, m in sets.items():
            lines.append(f"| {name} | {s} | " + " | ".join(f"{m[c]:.4f}" for c in cols) + " |")
    early = result.get("early_stage") or {}
    if early:
        lines += ["", f"Early stage (MEMER protocol, {early['items']} items mature in training, {early['pairs']} test pairs):", "",
                  "| method | AUC | RelaImpr |", "|---|---|---|"]
        lines += [f"| {m} | {a:.4f} | {early['relaimpr'].get(m, 1.0):.3f} |" for m, a in early["auc"].items()]
    (run_dir / "eval.md").write_text("\n".join(lines) + "\n")
    if result.get("transition", {}).get("bins"):
        plots.transition(result["transition"], run_dir / "transition.png")
    plots.maturity_curve(run_dir / "index", run_dir / "maturity.png")
    fig, ax = plt.subplots(figsize=(9, 4))
    names = list(methods)
    for j, s in enumerate(("cold", "warm", "all")):
        ax.bar(np.arange(len(names)) + (j - 1) * 0.27, [methods[n].get(s, {}).get("recall@20", 0) for n in names], 0.27, label=s)
    ax.set_xticks(np.arange(len(names)), names)
    ax.set(ylabel="recall@20", title="cold-start evaluation: recall@20 per method")
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "eval.png", dpi=100)
    plt.close(fig)
