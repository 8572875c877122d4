"""Goal: faults lose nothing. One live `launch.py train` (2 Ray workers) against the durable
local broker, with faults injected in turn while it trains:

  poison   one 900 kB message of nested '[' on the interactions topic
  flood    10,000 malformed and 10,000 valid events
  broker   Tansu killed (-9) and restarted on the same address by the supervisor
  worker   one Ray Train worker killed (-9): Ray restarts the group from the last checkpoint
  publish  a crash just before version N is renamed into place (COLDSTREAM_CRASH_PUBLISH)

Prints one JSON line per fault (when it was injected, seconds until the next new index
version, whether versions stayed monotone) and a final line that accounts for every event:
produced, consumed (once per offset: counters roll back with the offsets), positives trained,
positives trained again from below a restored checkpoint's trained offsets (beyond the rollback
window), dead-lettered by the trainer's counters and read back from the dead-letter topic, lost,
and the exit status. Goal: lost 0, trained twice 0, versions monotone, exit status 0.

  python benchmarks/chaos.py [--duration-s 240]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kafka import KafkaConsumer, TopicPartition  # noqa: E402

from cluster.broker import LocalBroker  # noqa: E402
from embeddings.publish import MANIFEST, version_dirs  # noqa: E402
from streaming.config import KafkaConfig, WorldConfig  # noqa: E402
from streaming.producer import EventProducer  # noqa: E402
from streaming.schema import Interaction  # noqa: E402
from streaming.synthetic import World, run_world  # noqa: E402
from streaming.topics import ensure_topics  # noqa: E402


class Manifests(threading.Thread):
    """Records every published version as it appears (versions are pruned on disk)."""

    def __init__(self, index: Path):
        super().__init__(daemon=True)
        self.index, self.seen, self.stop = index, {}, threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.2):
            for d in version_dirs(self.index) if self.index.exists() else []:
                if d.name not in self.seen:
                    try:
                        self.seen[d.name] = (time.monotonic(), json.loads((d / MANIFEST).read_text()))
                    except (OSError, json.JSONDecodeError):
                        pass

    def newest_after(self, t: float, timeout_s: float) -> float | None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            later = [at for at, _ in self.seen.values() if at > t]
            if later:
                return min(later) - t
            time.sleep(0.2)
        return None

    def monotone(self) -> bool:
        ms = [m for _, m in sorted(self.seen.values(), key=lambda v: v[1]["version"])]
        for a, b in zip(ms, ms[1:]):
            if b["step"] < a["step"]:
                return False
            for topic, parts in b.get("kafka_offsets", {}).items():
                if any(o < a.get("kafka_offsets", {}).get(topic, {}).get(p, -1) for p, o in parts.items()):
                    return False
        return True


def dead_letter_records(bootstrap: str, cfg: KafkaConfig) -> int:
    c = KafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=5000)
    c.assign([TopicPartition(cfg.dead_letter_topic, 0)])
    n = sum(1 for _ in c)
    c.close()
    return n


def ray_worker_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-f", "RayTrainWorker"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration-s", type=float, default=240.0)
    ap.add_argument("--gap-s", type=float, default=30.0, help="time between faults")
    args = ap.parse_args()
    cfg = KafkaConfig()
    work = Path(tempfile.mkdtemp(prefix="coldstream-chaos-"))
    broker = LocalBroker(log_path=work / "broker.log", data_dir=work / "broker").start()
    broker.supervise(check_s=0.2)
    ensure_topics(cfg, broker.bootstrap)
    prod = EventProducer(cfg, broker.bootstrap)
    world = World.create(WorldConfig(n_users=400, initial_items=200, new_items=0, malformed_fraction=0.0))
    for _ in run_world(world, work / "shards", prod.sink(), realtime=False):
        pass
    prod.flush()
    manifests = Manifests(work / "r" / "index")
    manifests.start()
    env = dict(os.environ, COLDSTREAM_CRASH_PUBLISH="4")
    train = subprocess.Popen(
        [sys.executable, str(ROOT / "launch.py"), "train", "--bootstrap-servers", broker.bootstrap, "--runs-dir", str(work),
         "--run-name", "r", "--no-gpu", "--duration-s", str(args.duration_s), "--set", "train.checkpoint_every_s=20",
         "--set", "train.publish_every_s=8", "--set", "train.max_failures=4", "--set", "train.min_items_before_training=32",
         "--set", "optim.batch_size=256"],
        stdout=subprocess.PIPE, stderr=open(work / "train.log", "w"), text=True, cwd=ROOT, env=env)
    if manifests.newest_after(0, 300) is None:
        raise SystemExit(f"no index version within 300 s; see {work / 'train.log'}")

    def valid(n: int, tag: float) -> None:
        for i in range(n):
            prod.interaction(Interaction(i % world.cfg.n_users, i % world.cfg.initial_items, "like", tag))

    def poison() -> None:
        prod.raw_interaction(1, b"[" * 900_000)

    def flood() -> None:
        for i in range(10_000):
            prod.raw_interaction(i, b'{"user_id": "x", "item_id": 1, "event": "play", "ts": 0}')
        valid(10_000, 1.0)

    def kill_broker() -> None:
        os.kill(broker.proc.pid, signal.SIGKILL)
        valid(500, 2.0)  # sent while it restarts: the producer retries

    def kill_worker() -> None:
        pids = ray_worker_pids()
        if not pids:
            raise RuntimeError("no Ray Train worker found")
        os.kill(pids[-1], signal.SIGKILL)

    faults = [("poison", poison), ("flood", flood), ("broker", kill_broker), ("worker", kill_worker)]
    for name, inject in faults:
        time.sleep(args.gap_s)
        if train.poll() is not None:
            break
        t = time.monotonic()
        inject()
        prod.flush()
        recovered = manifests.newest_after(t, 120)
        print(json.dumps({"fault": name, "recovered_s": None if recovered is None else round(recovered, 1),
                          "versions_monotone": manifests.monotone()}), flush=True)
    out, _ = train.communicate(timeout=args.duration_s + 600)
    manifests.stop.set()
    prod.close()
    summary = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
    crashed = [m for _, m in manifests.seen.values() if m["version"] == 4]
    print(json.dumps({"fault": "publish", "crash_before_version": 4, "version_4_published_after_retry": bool(crashed),
                      "leftovers": len(list((work / "r" / "index").glob(".tmp-v*"))), "versions_monotone": manifests.monotone()}))
    dlq = dead_letter_records(broker.bootstrap, cfg)
    consumed = summary.get("events_consumed", 0)
    print(json.dumps({
        "fault": "total", "exit_status": train.returncode, "produced": prod.sent, "consumed": consumed,
        "dead_lettered": summary.get("dead_lettered"), "dead_letter_records": dlq, "lost": prod.sent - consumed,
        "positives_trained": summary.get("positives_trained"),
        "trained_twice_beyond_rollback": summary.get("trained_twice_beyond_rollback"),
        "train_steps": summary.get("train_steps"), "versions": len(manifests.seen), "versions_monotone": manifests.monotone(),
        "broker_restarts": broker.restarts, "work_dir": str(work),
    }))
    broker.stop()


if __name__ == "__main__":
    main()
