"""Typed settings of the model and the training step (a section of the run configuration)."""
from __future__ import annotations

from typing import Literal

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
    n_clusters: int = Field(1024, ge=2, description="most k-means clusters per modality (the M3CSR cluster tables' rows); "
                            "k is sqrt(items known), refit each time the catalogue doubles")
    frames: int = Field(4, ge=1, description="frames per item clip")
    clips: int = Field(1, ge=1, description="seed 000: an item keeps frames x clips frames (evenly spaced over its own); "
                       "training encodes a random clip of `frames` of them, export the max over all clips")
    frame_size: int = Field(32, ge=8)
    patch: int = Field(8, ge=2)
    d_model: int = Field(64, ge=8)
    heads: int = Field(4, ge=1)
    frame_layers: int = Field(2, ge=1)
    temporal_layers: int = Field(1, ge=1)
    text_layers: int = Field(2, ge=1)
    text_vocab: int = Field(4096, ge=16, description="hash buckets of the word tokenizer")
    text_len: int = Field(16, ge=2)
    temperature: float = Field(0.2, gt=0, description="of the in-batch softmax over unit vectors: at 0.1 the hardest in-batch "
                               "negatives dominate it (README: 'Tuning', measured)")
    id_dropout: float = Field(0.5, ge=0, le=1, description="share of training items seen as new (the shared new-item ID part, "
                              "no positives for the gate), so the content path learns to place them (CLCRec's hybrid training, rho = 1 - id_dropout)")
    skip_negatives: float = Field(0.25, ge=0, description="recent skipped items drawn as extra negatives of every "
                                  "step's softmax, as a share of batch_size: an item people were shown and passed over "
                                  "is not new, and without them an item with skips alone never trained a row (softmax losses; 0: off)")
    maturity_threshold: int = Field(5, ge=0, description="interactions before an item's ID embedding is used in the served "
                                    "vector, until the embedding-stability curve has measured M (see maturity_epsilon)")
    maturity_epsilon: float = Field(0.02, gt=0, lt=2, description="M is the interaction count from which the median "
                                    "drift (1 - cosine) of an item's embedding between versions stays below this")
    # The cold-start parts (issue 6); each is a switch, all off is the seed model. See README's ablation table.
    user_tower: Literal["id", "attention"] = Field("attention", description="'attention': M3CSR's user tower, multi-head "
                                                   "attention over the user's last history_length positives")
    history_length: int = Field(32, ge=1, description="positives per user the attention tower reads (a cap: a user's history is what they have)")
    interest_intensity: bool = Field(True, description="M3CSR eqs. 5-7: per-user softmax weights over the modal interests "
                                     "(of the attention tower: without it there are none, and this does nothing)")
    intensity_temperature: float = Field(0.07, gt=0, description="temperature of the interest-intensity softmax (M3CSR's 0.07)")
    orthogonality_weight: float = Field(1.0, ge=0, description="weight of M3CSR's orthogonality loss between modal interests (attention tower)")
    popularity_gate: bool = Field(True, description="M3CSR 4.5: a learned gate on an item's positives mixes its ID and content parts, "
                                  "in training and at export (instead of the hard switch at maturity_threshold)")
    loss: Literal["softmax", "symmetric", "bpr"] = Field("softmax", description="in-batch softmax (user -> item) with logQ "
                                                         "correction; 'symmetric' adds seed 000's item -> user direction; or BPR over in-batch negatives")
    clcrec_weight: float = Field(0.0, ge=0, description="weight of CLCRec's R-E contrast between an item's content part and its ID part")
    alignment_weight: float = Field(0.0, ge=0, description="weight of seed 000's frames <-> text alignment loss")
    cold_regression: bool = Field(True, description="serve an item without a row or an interaction by a ridge regression "
                                  "from its content descriptors onto the trained items' served vectors, refit with each encoder "
                                  "version (trainer/regression.py); off: by MEMER's mapping at stage 0 (the item tower's content path)")
    infer_missing: bool = Field(False, description="CIERec: infer a missing modality from the other, with gated fusion")
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
    sparse_lr: float = Field(0.3, gt=0, description="RowWiseAdagrad's rate for the ID tables, whose rows start at unit norm "
                             "(embeddings.tables.init_bound); an ID-only model on them learned alike at 0.3 and 1.0 (README: 'Model', measured)")
    weight_decay: float = Field(0.1, ge=0, description="AdamW's decoupled decay of the dense weights; at 0.01 a 10-minute "
                                "MovieLens run's cold recall fell by a fifth from its peak while warm held, at 0.1 by a tenth")
    zero_stage: int = Field(1, ge=0, le=2)
    gradient_clipping: float = Field(1.0, ge=0)
    lr_schedule: Literal["constant", "cosine"] = Field("cosine", description="'cosine': linear warm-up, then cosine decay "
                                                       "to lr_floor of both learning rates over the run's budget (train.duration_s or max_steps) or schedule_passes, whichever ends first")
    schedule_passes: float | None = Field(5.0, gt=0, description="the cosine schedule also ends after this many passes over the "
                                          "positives the workers hold (their replay windows), if that comes before the budget; null: the budget alone")
    warmup_fraction: float = Field(0.05, ge=0, lt=1)
    lr_floor: float = Field(0.1, ge=0, le=1, description="the cosine schedule's end, as a share of the learning rate")
    replay_window: int = Field(200_000, ge=1, description="recent positives kept for replay between fresh events")
