"""The local broker's object store: moto's S3 server, made durable with a write journal.

Tansu's s3 engine needs S3 conditional writes (If-Match / If-None-Match): it updates each
partition's watermark optimistically and relies on a 412 to learn that its cached copy is
stale. Measured on this machine, s3rver and `rclone serve s3` ignore those headers, so a
restarted Tansu overwrote offset 0 of every partition; moto honours them, but keeps objects
in memory. This process adds what moto lacks: every successful write (PUT, POST, DELETE) is
appended to a journal file before the response goes out, and replayed into a fresh moto at
start, so the broker's log outlives this process as well as Tansu.

The journal only grows (Tansu does not delete records here). It is flushed per write, not
fsynced: it survives a crash of any process, not a power cut.

Run as `python -m cluster.objectstore --dir D --port P`; ready when the port accepts.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Callable, Iterable

log = logging.getLogger(__name__)
WRITES = {"PUT", "POST", "DELETE"}
CONDITIONS = {"If-Match", "If-None-Match", "If-Modified-Since", "If-Unmodified-Since"}


class JournaledApp:
    """WSGI middleware around moto: journals successful writes, replays them at start."""

    def __init__(self, app: Callable, journal: Path):
        self.app = app
        self.path = journal
        self.replayed = self._replay() if journal.exists() else 0
        self.journal = open(journal, "a", encoding="ascii")

    def _replay(self) -> int:
        from werkzeug.test import EnvironBuilder

        n = 0
        with open(self.path, encoding="ascii") as f:
            for line in f:
                if not line.endswith("\n"):
                    break  # a write cut short by a crash was never acknowledged
                rec = json.loads(line)
                # It succeeded once, in this order: its preconditions held then and hold now.
                headers = {k: v for k, v in rec["headers"].items() if k not in CONDITIONS}
                env = EnvironBuilder(method=rec["method"], path=rec["path"], query_string=rec["query"],
                                     headers=headers, data=base64.b64decode(rec["body"])).get_environ()
                status = []
                for _ in self.app(env, lambda s, h, e=None: status.append(s)):
                    pass
                n += 1
        return n

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        if environ["REQUEST_METHOD"] not in WRITES:
            return self.app(environ, start_response)
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        environ["wsgi.input"] = io.BytesIO(body)
        held: list = []
        chunks = list(self.app(environ, lambda status, headers, exc=None: held.append((status, headers, exc))))
        status, headers, exc = held[0]
        if status.startswith("2"):
            headers_in = {k[5:].replace("_", "-").title(): v for k, v in environ.items() if k.startswith("HTTP_")}
            headers_in["Content-Type"] = environ.get("CONTENT_TYPE", "")
            self.journal.write(json.dumps({"method": environ["REQUEST_METHOD"], "path": environ.get("PATH_INFO", ""),
                                           "query": environ.get("QUERY_STRING", ""), "headers": headers_in,
                                           "body": base64.b64encode(body).decode()}) + "\n")
            self.journal.flush()
        start_response(status, headers, exc)
        return chunks


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", required=True, type=Path)
    p.add_argument("--port", required=True, type=int)
    p.add_argument("--bucket", default="tansu")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s objectstore %(message)s")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    args.dir.mkdir(parents=True, exist_ok=True)
    app = JournaledApp(DomainDispatcherApplication(create_backend_app), args.dir / "journal.jsonl")
    log.info("replayed %d writes from %s", app.replayed, app.path)
    server = make_server("127.0.0.1", args.port, app, threaded=False)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    _create_bucket(app, args.bucket)
    log.info("S3 on http://127.0.0.1:%d, bucket %s", args.port, args.bucket)
    server.serve_forever()


def _create_bucket(app: JournaledApp, bucket: str) -> None:
    from werkzeug.test import EnvironBuilder

    env = EnvironBuilder(method="PUT", path=f"/{bucket}", headers={"Host": "localhost"}).get_environ()
    for _ in app(env, lambda *a: None):  # journaled like any write; an existing bucket answers 409 and is not
        pass


if __name__ == "__main__":
    main()
