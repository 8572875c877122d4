"""The one run configuration: sections owned by each layer, composed here, loaded
from YAML with `section.field=value` overrides, validated once at start."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from streaming.config import KafkaConfig, Strict, WorldConfig
from trainer.config import ID_BUCKETS, ModelConfig, OptimConfig


class TrainLoopConfig(Strict):
    workers: int = Field(2, ge=1, description="Ray Train workers; each owns some partitions and table shards")
    ray_address: str | None = Field(None, description="join this Ray cluster ('auto', 'ray://head:10001'); None: RAY_ADDRESS, else start a local one")
    use_gpu: bool | None = Field(None, description="None: use CUDA when present")
    precision: Literal["fp32", "bf16"] | None = Field(None, description="dense engine precision; None: bf16 on CUDA, fp32 on CPU (sparse rows stay fp32)")
    prefetch_batches: int = Field(4, ge=1, description="batches the input thread may build ahead of the step (bounds its memory)")
    threads_per_worker: int = Field(1, ge=1)
    duration_s: float = Field(150.0, gt=0, description="stop training after this long (a service runs with a large value)")
    max_steps: int | None = Field(None, ge=1)
    publish_every_s: float = Field(30.0, gt=0)
    publish_every_steps: int = Field(1000, ge=1)
    checkpoint_every_s: float = Field(120.0, gt=0)
    status_every_s: float = Field(10.0, gt=0)
    max_failures: int = Field(3, ge=0, description="worker failures Ray restarts from the last checkpoint before the job fails")
    min_items_before_training: int = Field(64, ge=1, description="announced items to wait for before fitting cluster IDs")
    seed: int = 0


class PublishConfig(Strict):
    keep_versions: int = Field(3, ge=1)
    index_factory: str = Field("Flat", description="FAISS index_factory string, e.g. Flat, HNSW32, IVF1024,Flat "
                               "(benchmarks/ivf.py measures IVF's recall against Flat)")
    search_params: str = Field("", description="FAISS ParameterSpace string set on each base, e.g. nprobe=16 for IVF")
    rebase_every: int = Field(10, ge=1, description="every this many versions, the trainer renews the encoder version its "
                              "vectors come from, exports every item and writes a full base; between, delta segments of "
                              "what changed")
    rebase_fraction: float = Field(0.2, gt=0, description="a base also when the rows changed since the last one exceed this share of the catalogue")


class Config(Strict):
    run_name: str = Field("demo", pattern=r"^[A-Za-z0-9_.-]+$")
    runs_dir: Path = Path("runs")
    storage: str | None = Field(None, pattern=r"^s3://[a-z0-9.-]+(/.*)?$",
                                description="s3://bucket/prefix: shards, checkpoints and the index live there (for runs across "
                                            "machines); None: under the run directory")
    kafka: KafkaConfig = KafkaConfig()
    world: WorldConfig = WorldConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainLoopConfig = TrainLoopConfig()
    publish: PublishConfig = PublishConfig()

    @model_validator(mode="after")
    def _workers_split_tables(self) -> "Config":
        if ID_BUCKETS % self.train.workers:
            raise ValueError(f"train.workers={self.train.workers} must divide {ID_BUCKETS}: each worker owns whole buckets "
                             "of the ID tables, so that checkpoints reshard between worker counts")
        return self

    @property
    def run_dir(self) -> Path:
        return (self.runs_dir / self.run_name).resolve()

    def location(self, what: str) -> str | Path:
        """Where 'shards', 'index' or 'ray' (checkpoints) live: under `storage` when set, else the run directory."""
        return f"{self.storage.rstrip('/')}/{self.run_name}/{what}" if self.storage else self.run_dir / what


class ConfigError(SystemExit):
    """Raised with a message that names the offending field; exits the CLI with status 2."""

    def __init__(self, message: str):
        super().__init__(message)
        self.code = 2
        self.message = message


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config error: {dotted}: {k} is not a section")
    node[keys[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] = (), **fields: Any) -> Config:
    """YAML file (optional) < `a.b=value` overrides < keyword fields (dotted names, from CLI flags)."""
    tree: dict = {}
    if path:
        try:
            tree = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"config error: cannot read {path}: {exc}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config error: {path} must hold a mapping")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"config error: override {item!r} must look like section.field=value")
        key, raw = item.split("=", 1)
        _set_path(tree, key.strip(), yaml.safe_load(raw))
    for key, value in fields.items():
        if value is not None:
            _set_path(tree, key, value)
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"]) or "config"
            got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
            lines.append(f"config error: {field}: {err['msg']}{got}")
        raise ConfigError("\n".join(lines)) from None
