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


def setup_ray_worker() -> None:
    """Ray's `worker_process_setup_hook` on a local cluster: runs first in every Ray worker
    process, before the libraries log at import (fbgemm and faiss announce each library they
    load at INFO), so workers log like the driver.

    Ray Train's PlacementGroupCleaner also asks Ray's State API, every few seconds, whether the
    train controller is alive. That API needs the dashboard, which `ray[train]` does not
    install, so on a local cluster every check warns "Failed to query Ray Train Controller
    actor state" for the whole run (171 lines in a demo). There is nothing for it to clean
    there: placement groups end with the local cluster. Its warnings go; its errors stay.
    """
    setup_logging()
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
    # Ray Train then sets the root logger of its workers to INFO: what libraries log at INFO
    # (fbgemm through the root logger, faiss's loader, TorchRec's planner notes) stays out.
    logging.getLogger().addFilter(lambda record: record.levelno >= logging.WARNING or record.name != "root")
    logging.getLogger("faiss").setLevel(logging.WARNING)
    # "a known issue with TorchRec's dense tensor size calculation in dry run": the planner's
    # estimate for tables it has not materialised, on every start.
    logging.getLogger("torchrec.distributed.planner.storage_reservations").setLevel(logging.ERROR)
