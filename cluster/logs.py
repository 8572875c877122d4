"""Logging setup shared by the driver and the workers: our INFO lines, libraries' warnings."""
from __future__ import annotations

import logging


OURS = ("coldstream", "cluster", "streaming", "trainer", "embeddings")


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", force=True)
    for name in OURS:
        logging.getLogger(name).setLevel(level)
    # kafka-python logs every refused connection at ERROR while a broker starts or stops.
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
