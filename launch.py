#!/usr/bin/env python
"""coldstream's one command line.

  demo     local broker + synthetic world + 2 Ray workers + index publication + evaluation
  train    train on a broker's streams (--bootstrap-servers), or on the embedded default
  produce  run the synthetic world against a broker (shards + announcements + events)
  broker   run a local Tansu broker with the project's topics until Ctrl-C
  replay   replay a dataset (generic CSV format, or --movielens) through Kafka + WebDataset
  eval     the cold-start evaluation protocol on a dataset: split, replay, train, publish, rank
  score    rank an outside model's score matrices on a split `eval --export-split` wrote
  serve    the published index over HTTP: /recommend /similar POST /items /healthz /metrics

Every subcommand reads one typed configuration: --config FILE.yaml, then
--set section.field=value overrides, then the flags below. A bad value stops the
run before anything starts, with a message naming the field.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    score = sub.add_parser("score", help="rank an outside model's scores on an exported split (see eval --export-split)")
    score.add_argument("--split", required=True, help="the folder `eval --export-split` wrote")
    score.add_argument("--scores", required=True, help="npz with cold / warm / all: [eval_users, candidates] score matrices")
    for name in ("demo", "train", "produce", "broker", "replay", "eval", "serve"):
        s = sub.add_parser(name)
        s.add_argument("--config", help="YAML file with any of the sections: kafka, world, model, optim, train, publish")
        s.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
        s.add_argument("--bootstrap-servers", help="host:port of an existing Kafka cluster (default: start a local Tansu broker)")
        s.add_argument("--run-name")
        s.add_argument("--runs-dir")
        if name in ("replay", "eval"):
            s.add_argument("--interactions", help="CSV: user_id,item_id,timestamp[,rating|,event]")
            s.add_argument("--items", help="CSV: item_id,title[,tags]")
            s.add_argument("--images", help="folder of <item_id>.jpg|png or <item_id>/<n>.jpg")
            s.add_argument("--movielens", nargs="?", const="default", help="use MovieLens 100K (default: ../shared/datasets/movielens-100k)")
            s.add_argument("--threshold", type=float, default=4.0, help="rating >= threshold is a positive; lower ratings are explicit negatives")
        if name == "broker":
            s.add_argument("--port", type=int, help="listen here (default: a free port); a restart on the same port "
                                                   "and --run-name comes back with the broker's log")
        if name == "serve":
            s.add_argument("--index", required=True, help="a published index directory (the one holding LATEST)")
            s.add_argument("--host", default="127.0.0.1")
            s.add_argument("--port", type=int, default=8000)
        if name == "replay":
            s.add_argument("--speedup", type=float, help="replay at this multiple of real time (default: as fast as possible)")
        if name == "eval":
            s.add_argument("--cold-fraction", type=float, default=0.15)
            s.add_argument("--seed", type=int, default=0)
            s.add_argument("--minutes", type=float, default=10.0, help="the whole run's budget, start-up and scoring included")
            s.add_argument("--export-split", metavar="DIR", help="write the exact split (npz + README of its fields) to DIR and stop")
        if name in ("demo", "train", "eval"):
            s.add_argument("--workers", type=int)
            s.add_argument("--address", help="join an existing Ray cluster: auto, or ray://head:10001 (default: RAY_ADDRESS, else a local one)")
            s.add_argument("--duration-s", type=float)
            s.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None, help="force CUDA on/off (default: use it when present)")
    return p


def _interrupt(signum, frame) -> None:
    """SIGTERM behaves like Ctrl-C, so context managers stop the broker and Ray cleanly."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "score":  # no run configuration: a split and a score file
        from cluster.offline import score_external

        try:
            print(json.dumps(score_external(Path(args.split), Path(args.scores))), flush=True)
        except (OSError, KeyError, ValueError) as exc:
            print(f"score: {exc}", file=sys.stderr)
            return 2
        return 0
    from cluster.config import ConfigError, load_config
    from cluster.logs import setup_logging

    setup_logging()
    try:
        cfg = load_config(
            args.config, args.overrides,
            **{"kafka.bootstrap_servers": args.bootstrap_servers, "run_name": args.run_name, "runs_dir": args.runs_dir,
               "train.workers": getattr(args, "workers", None), "train.ray_address": getattr(args, "address", None), "train.duration_s": getattr(args, "duration_s", None),
               "train.use_gpu": getattr(args, "gpu", None),
               "kafka.local_port": getattr(args, "port", None) if args.command == "broker" else None},
        )
    except ConfigError as exc:
        print(exc.message, file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    # Ctrl-C / SIGINT stops cleanly even when this was started as a script's background job: such a
    # process inherits SIGINT ignored, and Python then installs no handler of its own.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        result = COMMANDS[args.command](cfg, args)
    except ConfigError as exc:  # an impossible setup found after start (topic, GPUs): named, exit 2
        print(exc.message, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    if result is not None:
        print(json.dumps(result), flush=True)
    return 0


def _serve_until_interrupted(message: str) -> None:
    """Keeps a local broker (and this process) up for a trainer until Ctrl-C."""
    print(message, flush=True)
    while True:
        time.sleep(3600)


def _demo(cfg, args):
    from cluster.demo import demo

    summary = demo(cfg)
    print(f"serve the index it published:  {summary['serve']}\nthen, from another shell:       {summary['curl']}", flush=True)
    return summary


def _train(cfg, args):
    from cluster.train import train

    return train(cfg)


def _produce(cfg, args):
    from cluster.services import WorldProducer, broker_for, write_truth

    with broker_for(cfg) as bootstrap:
        print(f"producing to {bootstrap}", flush=True)
        producer = WorldProducer(cfg, bootstrap)
        producer.start()
        producer.join()
        write_truth(producer.world, cfg.run_dir / "truth.json", cfg.world.seed)
        if not cfg.kafka.bootstrap_servers:
            _serve_until_interrupted(f"done; broker stays up at {bootstrap} until Ctrl-C")
    return {"produced": producer.producer.sent, "items": cfg.world.initial_items + cfg.world.new_items,
            "cold_items": len(producer.world.cold_items), "shards": str(producer.shard_dir)}


def _broker(cfg, args):
    """Serves until Ctrl-C; if the broker dies, this exits non-zero rather than sleep beside it
    (whoever runs it, a shell or a supervisor, then sees the failure and restarts it)."""
    from cluster.config import ConfigError
    from cluster.services import local_broker
    from streaming.topics import ensure_topics

    if cfg.kafka.bootstrap_servers:
        raise ConfigError("config error: launch.py broker runs a local broker; drop --bootstrap-servers")
    with local_broker(cfg) as broker:
        ensure_topics(cfg.kafka, broker.bootstrap)
        print(f"broker ready: --bootstrap-servers {broker.bootstrap} (cluster id {broker.cluster_id}, "
              f"log {broker.data_dir or 'in memory'})", flush=True)
        while (why := broker.died()) is None:
            time.sleep(0.5)
    raise SystemExit(f"broker at {broker.bootstrap} died: {why}. Run the same launch.py broker --port {broker.port} "
                     f"--run-name {cfg.run_name} to bring it back with its log")


def _dataset_paths(cfg, args):
    if args.movielens:
        from streaming.movielens import DEFAULT_DIR, to_generic

        src = DEFAULT_DIR if args.movielens == "default" else Path(args.movielens)
        return to_generic(src, cfg.runs_dir.resolve() / "_data" / src.name)
    if not args.interactions:
        raise SystemExit("give --interactions FILE (and optionally --items, --images) or --movielens")
    return Path(args.interactions), Path(args.items) if args.items else None, Path(args.images) if args.images else None


def _replay(cfg, args):
    from cluster.services import broker_for
    from streaming.datasets import load_dataset
    from streaming.producer import EventProducer
    from streaming.replay import pack_items, replay

    ds = load_dataset(*_dataset_paths(cfg, args))
    with broker_for(cfg) as bootstrap:
        urls = pack_items(ds, cfg.location("shards"))
        prod = EventProducer(cfg.kafka, bootstrap)
        for line in replay(ds, urls, prod.sink(), speedup=args.speedup, threshold=args.threshold):
            print(line, flush=True)
        prod.close()
        if not cfg.kafka.bootstrap_servers:
            _serve_until_interrupted(f"done; broker stays up at {bootstrap} until Ctrl-C")
    return {"produced": prod.sent, "items": len(ds.item_ids), "users": len(ds.user_ids), "rows_skipped": len(ds.problems)}


def _eval(cfg, args):
    from cluster.offline import evaluate_dataset, export_split
    from streaming.datasets import load_dataset
    from streaming.replay import split_dataset

    if args.export_split:  # the split only, for an outside model: no training
        ds = load_dataset(*_dataset_paths(cfg, args))
        path = export_split(ds, split_dataset(ds, args.cold_fraction, args.seed), args.threshold, Path(args.export_split))
        return {"split": str(path), "readme": str(path.parent / "README.md"), "seed": args.seed, "cold_fraction": args.cold_fraction}
    return evaluate_dataset(cfg, *_dataset_paths(cfg, args), args.cold_fraction, args.seed, args.minutes, args.threshold)


def _serve(cfg, args):
    from cluster.serve import serve

    serve(args.index, args.host, args.port)


COMMANDS = {"serve": _serve, "demo": _demo, "train": _train, "produce": _produce, "broker": _broker, "replay": _replay, "eval": _eval}

if __name__ == "__main__":
    logging.captureWarnings(True)
    sys.exit(main())
