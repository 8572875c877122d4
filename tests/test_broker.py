"""The real Tansu broker process with kafka-python: topics, partition ownership,
dead letters, seeking to checkpointed offsets, and cleanup when the parent dies."""
import base64
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition

from streaming.consumer import InteractionStream, owned_partitions
from streaming.producer import EventProducer
from streaming.schema import MAX_MESSAGE_BYTES, Interaction
from streaming.topics import ensure_topics
from tests.conftest import ROOT

pytestmark = pytest.mark.integration


def _drain(stream, want, timeout=20):
    got, deadline = [], time.time() + timeout
    while len(got) < want and time.time() < deadline:
        got += stream.poll(200)
    return got


def test_partitions_split_dead_letters_and_seek(broker, kafka_cfg):
    ensure_topics(kafka_cfg, broker.bootstrap)
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    assert {kafka_cfg.interactions_topic, kafka_cfg.items_topic, kafka_cfg.dead_letter_topic} <= set(admin.list_topics())
    admin.close()
    prod = EventProducer(kafka_cfg, broker.bootstrap)
    for i in range(400):
        prod.interaction(Interaction(i % 40, i % 17, "play", float(i)))
    bad = [b"{oops", json.dumps({"user_id": 1, "item_id": 2**62, "event": "play", "ts": 1}).encode(),
           b"[" * 900_000, b"[" * 5_000, b'{"user_id": 1, "item_id": 3, "event": "play", "ts": Infinity}']  # poison
    for b in bad:
        prod.raw_interaction(1, b)
    prod.flush()

    streams = [InteractionStream(kafka_cfg, broker.bootstrap, owned_partitions(4, r, 2)) for r in range(2)]
    got = [_drain(s, 200) for s in streams]
    time.sleep(1)
    got = [g + s.poll(500) for g, s in zip(got, streams)]
    assert sum(map(len, got)) == 400
    assert not {e.user_id for e in got[0]} & {e.user_id for e in got[1]}  # keyed by user: disjoint owners
    assert sum(s.stats.malformed for s in streams) == len(bad)
    positions = [s.positions() for s in streams]
    for s in streams:
        s.close()

    dlq = KafkaConsumer(bootstrap_servers=broker.bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=5000)
    dlq.assign([TopicPartition(kafka_cfg.dead_letter_topic, 0)])
    records = [json.loads(r.value) for r in dlq]
    dlq.close()
    # the copies are whole up to the size cap; a larger one keeps its head, length and hash
    assert sorted(base64.b64decode(r["value_b64"]) for r in records) == sorted(b[:MAX_MESSAGE_BYTES] for b in bad)
    assert sorted(r["value_bytes"] for r in records) == sorted(map(len, bad))
    assert any("outside" in r["reason"] for r in records) and any("JSON" in r["reason"] for r in records)
    assert any("oversize" in r["reason"] for r in records) and any("nested" in r["reason"] for r in records)
    assert any("non-finite" in r["reason"] for r in records)

    # a resumed consumer seeks to the saved offsets: it sees only what came after
    prod.interaction(Interaction(2, 3, "like", 0.0))
    prod.flush()
    resumed = [InteractionStream(kafka_cfg, broker.bootstrap, owned_partitions(4, r, 2), positions[r]) for r in range(2)]
    after = [_drain(s, 1, timeout=5) for s in resumed]
    assert [e for a in after for e in a] == [Interaction(2, 3, "like", 0.0)]
    for s in resumed:
        s.close()
    prod.close()


def test_broker_dies_with_its_parent(tmp_path):
    pid_file = tmp_path / "pid"
    code = ("import sys, time; sys.path.insert(0, %r)\n"
            "from cluster.broker import LocalBroker\n"
            "b = LocalBroker().start(); open(%r, 'w').write(str(b.proc.pid)); time.sleep(60)") % (str(ROOT), str(pid_file))
    parent = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.time() + 30
    while not pid_file.exists() or not pid_file.read_text():
        assert time.time() < deadline, "broker did not start"
        time.sleep(0.1)
    broker_pid = int(pid_file.read_text())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    for _ in range(50):
        try:
            os.kill(broker_pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    pytest.fail("broker outlived its parent")


def test_a_broker_that_lost_its_log_is_detected(kafka_cfg):
    """Tansu restarted on the same port without its log: positions lie past the new high-water
    marks, fetches return nothing and lag reads 0. The consumer must say so, not go quiet."""
    from cluster.broker import LocalBroker, free_port
    from streaming.consumer import BrokerDataLoss

    port = free_port()
    with LocalBroker(port=port, cluster_id="same-id") as first:
        ensure_topics(kafka_cfg, first.bootstrap)
        prod = EventProducer(kafka_cfg, first.bootstrap)
        for i in range(200):
            prod.interaction(Interaction(i % 40, i % 17, "play", float(i)))
        prod.close()
        streams = {policy: InteractionStream(kafka_cfg.model_copy(update={"on_data_loss": policy}), first.bootstrap, [0, 1, 2, 3])
                   for policy in ("fail", "rewind")}
        for s in streams.values():
            assert len(_drain(s, 200)) == 200
    with LocalBroker(port=port, cluster_id="same-id") as second:  # same address and id, empty log
        ensure_topics(kafka_cfg, second.bootstrap)
        prod = EventProducer(kafka_cfg, second.bootstrap)
        for i in range(20):
            prod.interaction(Interaction(i % 40, i % 17, "like", float(i)))
        prod.close()
        with pytest.raises(BrokerDataLoss, match="high-water mark"):
            deadline = time.time() + 30
            while time.time() < deadline:
                streams["fail"].poll(200)
        rewound = _drain(streams["rewind"], 20, timeout=30)
        assert len(rewound) == 20 and streams["rewind"].stats.data_loss_incidents >= 1
        for s in streams.values():
            s.close()


def test_a_recreated_broker_is_detected_by_its_cluster_id(kafka_cfg):
    """A memory broker restarted on the same address reports a new cluster id: stop, by default."""
    from cluster.broker import LocalBroker, free_port
    from streaming.consumer import BrokerDataLoss

    port = free_port()
    with LocalBroker(port=port) as first:
        ensure_topics(kafka_cfg, first.bootstrap)
        stream = InteractionStream(kafka_cfg, first.bootstrap, [0, 1, 2, 3])
        stream.poll(500)
        assert stream.watch.cluster_id == first.cluster_id
    with LocalBroker(port=port) as second:
        ensure_topics(kafka_cfg, second.bootstrap)
        with pytest.raises(BrokerDataLoss, match="cluster id changed"):
            deadline = time.time() + 30
            while time.time() < deadline:
                stream.poll(200)
        stream.close()


def test_durable_broker_survives_kills_and_outages(tmp_path, kafka_cfg):
    """The default local broker: its log outlives Tansu (killed, restarted by the supervisor)
    and the object store itself (stopped and started again on the same directory). An outage
    is reported once, and consumption carries on from the same positions afterwards."""
    from cluster.broker import LocalBroker, free_port

    cfg = kafka_cfg.model_copy(update={"broker_timeout_s": 2.0})
    port, data = free_port(), tmp_path / "broker"
    broker = LocalBroker(port, tmp_path / "broker.log", data).start()
    ensure_topics(cfg, broker.bootstrap)
    prod = EventProducer(cfg, broker.bootstrap)
    for i in range(300):
        prod.interaction(Interaction(i % 40, i % 17, "play", float(i)))
    prod.flush()
    stream = InteractionStream(cfg, broker.bootstrap, [0, 1, 2, 3])
    assert len(_drain(stream, 300)) == 300

    broker.supervise(check_s=0.2)
    os.kill(broker.proc.pid, signal.SIGKILL)  # Tansu dies; the supervisor brings it back, log intact
    for i in range(100):
        prod.interaction(Interaction(i % 40, i % 17, "like", float(i)))
    prod.flush()
    after = _drain(stream, 100, timeout=60)
    assert len(after) == 100 and {e.event for e in after} == {"like"} and broker.restarts == 1
    assert stream.stats.data_loss_incidents == 0

    broker._stopping.set()  # no supervisor now: an outage the consumer must notice, then recover from
    broker._supervisor.join(5)  # else a check that began before the flag could restart Tansu beside ours (seen once on CI)
    os.kill(broker.proc.pid, signal.SIGKILL)
    deadline = time.time() + 30
    while stream.stats.outages == 0 and time.time() < deadline:
        stream.poll(200)
    assert stream.stats.outages == 1 and stream.watch.down_s > 0
    broker._start_tansu(30)
    deadline = time.time() + 30
    while stream.watch.down_s > 0 and time.time() < deadline:
        stream.poll(200)
    assert stream.watch.down_s == 0 and stream.stats.outages == 1
    stream.close()
    prod.close()
    cluster_id = broker.cluster_id
    broker.stop()

    with LocalBroker(port, tmp_path / "broker.log", data) as again:  # object store and Tansu both new
        assert again.cluster_id == cluster_id
        fresh = InteractionStream(cfg, again.bootstrap, [0, 1, 2, 3])
        assert len(_drain(fresh, 400, timeout=30)) == 400
        assert fresh.watch.cluster_id == cluster_id and fresh.stats.data_loss_incidents == 0
        fresh.close()


def test_launch_broker_exits_when_its_broker_dies_and_restarts_with_its_log(tmp_path, kafka_cfg):
    from cluster.broker import free_port

    port = free_port()
    cmd = [sys.executable, str(ROOT / "launch.py"), "broker", "--port", str(port), "--runs-dir", str(tmp_path), "--run-name", "b"]

    def start():
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = proc.stdout.readline()
        assert "broker ready" in line, proc.stderr.read()
        return proc

    proc = start()
    prod = EventProducer(kafka_cfg, f"127.0.0.1:{port}")
    for i in range(50):
        prod.interaction(Interaction(i, i, "play", float(i)))
    prod.close()
    tansu = subprocess.run(["pgrep", "-f", f"tansu broker --listener-url tcp://127.0.0.1:{port}"], capture_output=True, text=True)
    os.kill(int(tansu.stdout.split()[0]), signal.SIGKILL)
    assert proc.wait(30) != 0
    assert "died" in proc.stderr.read()

    proc = start()
    try:
        stream = InteractionStream(kafka_cfg, f"127.0.0.1:{port}", [0, 1, 2, 3])
        assert len(_drain(stream, 50, timeout=30)) == 50
        stream.close()
    finally:
        proc.send_signal(signal.SIGINT)
        try:  # communicate drains both pipes, so a chatty shutdown cannot block on a full one
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
            pytest.fail(f"launch.py broker did not stop within 60 s of SIGINT; its stderr ends: {err[-2000:]}")
