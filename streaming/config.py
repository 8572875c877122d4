"""Typed settings of the streaming layer (a section of the one run configuration)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    """Unknown keys are errors, so a typo in YAML fails at start and names the field."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class KafkaConfig(Strict):
    bootstrap_servers: str | None = Field(None, description="host:port of an existing cluster; None starts a local Tansu broker")
    interactions_topic: str = "interactions"
    items_topic: str = "items"
    dead_letter_topic: str = "interactions.dead-letter"
    interaction_partitions: int = Field(4, ge=1)
    poll_timeout_ms: int = Field(200, ge=1)
    max_poll_records: int = Field(2000, ge=1)
    local_storage: Literal["s3", "memory"] = Field(
        "s3", description="where a local Tansu broker keeps its log: s3 (s3rver on disk under the run directory; "
                          "survives broker restarts) or memory (lost on restart)")
    local_port: int | None = Field(None, ge=1, le=65535, description="port of a local broker (None: a free one)")
    broker_timeout_s: float = Field(10.0, gt=0, description="no metadata from the broker for this long is reported as an outage")
    broker_outage_fail_s: float = Field(300.0, gt=0, description="an outage longer than this stops the job (exit != 0)")
    on_data_loss: Literal["fail", "rewind"] = Field(
        "fail", description="a consumer position past the broker's high-water mark means the broker lost records "
                            "(restarted without its log) or a changed cluster id: fail stops the job, rewind re-reads what the broker has")


class WorldConfig(Strict):
    """The synthetic world of the embedded default: sizes and how hard it is to learn."""

    seed: int = 0
    n_users: int = Field(600, ge=2)
    initial_items: int = Field(300, ge=1)
    new_items: int = Field(200, ge=0, description="items announced while training runs")
    new_item_interval_s: float = Field(0.25, gt=0)
    cold_holdout_fraction: float = Field(0.5, ge=0, le=1, description="share of new items whose events are held out for evaluation")
    latent_dim: int = Field(8, ge=2)
    frames_per_item: int = Field(4, ge=1)
    frame_size: int = Field(32, ge=8)
    caption_words: int = Field(10, ge=2)
    events_per_user: int = Field(60, ge=1, description="events per user for the initial catalogue")
    events_per_new_item: int = Field(40, ge=0)
    popularity_skew: float = Field(1.0, ge=0, description="std of the log-normal popularity bias")
    taste_temperature: float = Field(0.5, gt=0)
    malformed_fraction: float = Field(0.002, ge=0, le=1, description="share of deliberately broken events (exercises the dead-letter path)")
    eval_events_per_user: int = Field(30, ge=1)
    items_per_shard: int = Field(50, ge=1)
