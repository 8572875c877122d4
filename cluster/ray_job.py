"""Ray bring-up and the TorchTrainer that runs `train_loop_per_worker`."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import ray
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from cluster.config import Config, ConfigError
from cluster.devices import backend, want_gpu
from cluster.worker import train_loop_per_worker
from streaming.topics import partition_count

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent.parent


def worker_env(gpu: bool) -> dict[str, str]:
    """Environment every worker gets: CPU accelerator for DeepSpeed unless the run uses CUDA
    (also on a CUDA host told not to), a project-owned cache for DeepSpeed's JIT-compiled ops,
    one thread per worker."""
    env = {
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions")),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONWARNINGS": "ignore",
    }
    env["DS_ACCELERATOR"] = "cuda" if gpu else "cpu"  # explicit both ways: an inherited value must not win
    return env


def start_ray(cfg: Config) -> None:
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    env = worker_env(want_gpu(cfg.train.use_gpu))
    os.environ.update(env)
    address = os.environ.get("RAY_ADDRESS")
    if address:  # a real cluster: join it
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True)
        return
    ray.init(
        num_cpus=max(cfg.train.workers, os.cpu_count() or 1),
        object_store_memory=256 * 1024**2,
        include_dashboard=False,
        _temp_dir=f"/tmp/ray-cs-{os.getuid()}",
        runtime_env={"env_vars": env},
        logging_level=logging.WARNING,
        log_to_driver=True,
    )


def check_partitions(cfg: Config, bootstrap: str) -> None:
    """Stops at start, with exit status 2, when the topic and the config disagree or some worker
    would own no partition: a rank without one never becomes ready, and nobody would train."""
    topic = cfg.kafka.interactions_topic
    actual = partition_count(bootstrap, topic)
    if actual is None:
        raise ConfigError(f"config error: no metadata for topic {topic!r} on {bootstrap} (missing, or the broker did not answer)")
    if actual != cfg.kafka.interaction_partitions:
        raise ConfigError(f"config error: kafka.interaction_partitions={cfg.kafka.interaction_partitions}, but topic {topic!r} "
                          f"has {actual} partitions; reading fewer would drop data")
    if cfg.train.workers > actual:
        raise ConfigError(f"config error: train.workers={cfg.train.workers} exceeds the {actual} partitions of {topic!r}; "
                          f"each worker must own at least one (use --workers {actual})")


def run_training(cfg: Config, bootstrap: str) -> dict:
    """Trains until the configured budget; returns the final metrics of rank 0."""
    check_partitions(cfg, bootstrap)
    start_ray(cfg)
    gpu = want_gpu(cfg.train.use_gpu)
    if gpu:
        have = int(ray.cluster_resources().get("GPU", 0))
        if have < cfg.train.workers:  # Ray would otherwise wait for the missing GPUs for ever
            raise ConfigError(f"config error: train.workers={cfg.train.workers} needs {cfg.train.workers} GPUs, "
                              f"the Ray cluster has {have} (use --workers {max(have, 1)}, or --no-gpu)")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json") | {"runs_dir": str(cfg.runs_dir.resolve())}, "bootstrap": bootstrap},
        torch_config=TorchConfig(backend=backend(gpu)),
        scaling_config=ScalingConfig(num_workers=cfg.train.workers, use_gpu=gpu, resources_per_worker={"CPU": 1} | ({"GPU": 1} if gpu else {})),
        run_config=RunConfig(name=cfg.run_name, storage_path=str(cfg.run_dir / "ray"), failure_config=FailureConfig(max_failures=cfg.train.max_failures)),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    return dict(result.metrics or {})
