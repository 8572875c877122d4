"""`launch.py demo`: the whole data path from one command, scored as it goes.

Broker up, topics created, the synthetic world producing in the background, Ray
workers training and publishing, and (demo) every new index version scored on the
cold items the world held out. Ends with a summary JSON line.
"""
from __future__ import annotations

import json
import logging
import shutil
import sys
import time

from cluster.config import Config
from cluster.monitor import VersionWatcher, cold_quality
from cluster.plots import maturity_curve, training_curves
from cluster.ray_job import run_training
from cluster.services import WorldProducer, broker_for, write_truth
from embeddings.reader import IndexReader

log = logging.getLogger(__name__)


def demo(cfg: Config, fresh: bool = True) -> dict:
    run_dir = cfg.run_dir
    if fresh and run_dir.exists():
        shutil.rmtree(run_dir)  # the demo's broker is in memory: old offsets would point nowhere
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with broker_for(cfg) as bootstrap:
        producer = WorldProducer(cfg, bootstrap)
        producer.start()
        producer.initial_done.wait()
        if producer.error:
            raise producer.error
        reader = IndexReader(cfg.location("index"), cache=run_dir / "index-cache")
        truth: dict[int, list[int]] = {}

        def score() -> dict:
            nonlocal truth
            truth = producer.world.eval_truth(cfg.world.seed)  # cold set grows while new items arrive
            return cold_quality(reader, truth, set(producer.world.cold_items), true_scores=producer.world.score)

        watcher = VersionWatcher(reader, score)
        watcher.start()
        try:
            final = run_training(cfg, bootstrap)
        finally:
            producer.stop()
            watcher.stop()
        watcher.poll()  # the last version, if the watcher had not seen it yet
        write_truth(producer.world, run_dir / "truth.json", cfg.world.seed)
    quality = cold_quality(reader, producer.world.eval_truth(cfg.world.seed), set(producer.world.cold_items), true_scores=producer.world.score)
    plot = training_curves(run_dir / "metrics.jsonl", watcher.history, run_dir / "curves.png")
    maturity_plot = maturity_curve(reader.root, run_dir / "maturity.png")
    latest = reader.current.manifest if reader.current else {}
    user = next(iter(reader.current.user_rows), 0) if reader.current else 0
    summary = {
        "events_consumed": final.get("events_consumed"),
        "dead_lettered": final.get("dead_lettered"),
        "items_skipped": final.get("items_skipped"),
        "train_steps": final.get("train_steps"),
        "examples_per_s": round(final.get("examples_per_s", 0.0), 1),
        "step_examples_per_s": round(final.get("step_examples_per_s", 0.0), 1),
        "loop_step_ratio": round(final.get("loop_step_ratio", 0.0), 3),
        "device": final.get("device"),
        "workers": cfg.train.workers,
        "precision": final.get("precision"),
        "final_loss": final.get("final_loss"),
        "index_versions": reader.version,
        "index_dir": str(cfg.location("index")),
        "cold_items": quality.get("cold_items"),
        "eval_users": quality.get("users"),
        "cold_recall_at_20": quality.get("model", {}).get("recall@20"),
        "cold_ndcg_at_20": quality.get("model", {}).get("ndcg@20"),
        "popularity_recall_at_20": quality.get("popularity", {}).get("recall@20"),
        "random_recall_at_20": quality.get("random", {}).get("recall@20"),
        "oracle_recall_at_20": quality.get("oracle", {}).get("recall@20"),
        "recall_history": [round(h["model"]["recall@20"], 4) for h in watcher.history],
        "plot": str(plot),
        "maturity_threshold": latest.get("maturity", {}).get("threshold"),
        "maturity_plot": str(maturity_plot) if maturity_plot else None,
        "freshness": latest.get("freshness"),
        "serve": f"{sys.executable} launch.py serve --index {cfg.location('index')} --port 8000",
        "curl": f"curl 'http://127.0.0.1:8000/recommend?user_id={user}&k=5'",
        "wall_s": round(time.time() - started, 1),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary

