"""Typed settings of the model and the training step (a section of the run configuration)."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from streaming.schema import POSITIVE_EVENTS


# Each ID table is cut into this many buckets of its id range and of its rows; a rank owns whole
# buckets, so a checkpoint written by N workers loads on any M workers (the remap state of a bucket
# moves with it) as long as both divide ID_BUCKETS.
ID_BUCKETS = 48


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    embedding_dim: int = Field(64, ge=4, description="width of ID tables and of the served vectors")
    user_rows: int = Field(20_000, ge=2, description="rows of the user table: ids are unbounded, the least frequently "
                           "used lose their row when a new one needs it (rounded up to a multiple of 48)")
    item_rows: int = Field(20_000, ge=2, description="rows of the item table, as user_rows; an item without a row is "
                           "served by its content vector")
    n_clusters: int = Field(16, ge=2, description="k-means clusters per modality (M3CSR cluster IDs)")
    frames: int = Field(4, ge=1, description="frames per item clip")
    frame_size: int = Field(32, ge=8)
    patch: int = Field(8, ge=2)
    d_model: int = Field(64, ge=8)
    heads: int = Field(4, ge=1)
    frame_layers: int = Field(2, ge=1)
    temporal_layers: int = Field(1, ge=1)
    text_layers: int = Field(2, ge=1)
    text_vocab: int = Field(4096, ge=16, description="hash buckets of the word tokenizer")
    text_len: int = Field(16, ge=2)
    temperature: float = Field(0.1, gt=0)
    id_dropout: float = Field(0.5, ge=0, le=1, description="share of training items seen without their ID embedding, so the content path learns to stand alone")
    maturity_threshold: int = Field(5, ge=0, description="interactions before an item's ID embedding is used in the served "
                                    "vector, until the embedding-stability curve has measured M (see maturity_epsilon)")
    maturity_epsilon: float = Field(0.02, gt=0, lt=2, description="M is the interaction count from which the median "
                                    "drift (1 - cosine) of an item's embedding between versions stays below this")
    memer_signals: list[str] = Field(["positive", "play"], description="one MEMER mapping per signal: 'positive' (any "
                                     "positive event) or an event type; the first serves early-stage items; [] turns MEMER off")
    memer_hidden: int = Field(128, ge=4)
    memer_weights: tuple[float, float, float] = Field((1.0, 1.0, 1.0), description="alpha, beta, gamma of MEMER's "
                                                      "eq. 11: Wasserstein, reconstruction, interaction BCE")

    @model_validator(mode="after")
    def _shapes(self) -> "ModelConfig":
        bad = [s for s in self.memer_signals if s != "positive" and s not in POSITIVE_EVENTS]
        if bad or len(set(self.memer_signals)) != len(self.memer_signals):
            raise ValueError(f"memer_signals={self.memer_signals}: each must be 'positive' or one of {sorted(POSITIVE_EVENTS)}, once")
        if self.frame_size % self.patch:
            raise ValueError(f"frame_size={self.frame_size} must be a multiple of patch={self.patch}")
        if self.d_model % self.heads:
            raise ValueError(f"d_model={self.d_model} must be a multiple of heads={self.heads}")
        return self


class OptimConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    batch_size: int = Field(256, ge=2, description="positive pairs per worker per step")
    dense_lr: float = Field(1e-3, gt=0)
    sparse_lr: float = Field(0.05, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    zero_stage: int = Field(1, ge=0, le=2)
    gradient_clipping: float = Field(1.0, ge=0)
    replay_window: int = Field(200_000, ge=1, description="recent positives kept for replay between fresh events")
