"""Ray bring-up and the TorchTrainer that runs `train_loop_per_worker`."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import ray
from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from cluster.config import Config, ConfigError
from cluster.devices import backend, want_gpu
from cluster.worker import train_loop_per_worker
from streaming import storage
from streaming.topics import partition_count

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent.parent
SETUP_HOOK = "cluster.logs.setup_ray_worker"  # quiet library logs in every Ray worker (see there)
CODE_EXCLUDES = [".venv", "runs", ".cache", ".git", ".gpu", "*.egg-info", ".pytest_cache", "__pycache__"]


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
    address = cfg.train.ray_address or os.environ.get("RAY_ADDRESS")
    if address:  # an existing cluster: join it, and ship this checkout's code to its nodes (their Python environment must match)
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True,
                 runtime_env={"env_vars": env, "working_dir": str(ROOT), "excludes": CODE_EXCLUDES, "worker_process_setup_hook": SETUP_HOOK})
        return
    ray.init(
        num_cpus=max(cfg.train.workers, os.cpu_count() or 1),
        object_store_memory=256 * 1024**2,
        include_dashboard=False,
        _temp_dir=f"/tmp/ray-cs-{os.getuid()}",
        runtime_env={"env_vars": env, "worker_process_setup_hook": SETUP_HOOK},
        logging_level=logging.WARNING,
        log_to_driver=True,
    )


def checkpoint_storage(cfg: Config) -> dict:
    """RunConfig's storage for checkpoints: the run directory, or `storage` through the same
    pyarrow filesystem (endpoint, credentials) that shards and the index use."""
    where = cfg.location("ray")
    if not storage.is_remote(where):
        return {"storage_path": str(where)}
    fs, path = storage.filesystem(where)
    return {"storage_path": path, "storage_filesystem": fs}


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
        run_config=RunConfig(name=cfg.run_name, **checkpoint_storage(cfg), failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                             logging_config=LoggingConfig(log_level="WARNING")),  # not a line per checkpoint
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    return dict(result.metrics or {})
