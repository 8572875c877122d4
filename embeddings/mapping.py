"""MEMER's early-stage mapping as a published artefact: content in, an embedding out.

Each version holds `mapping.pt`: the item tower's content path (frame and text
encoders, the k-means centroids and cluster embeddings, the fusion layer), the semantic
module and every signal's enc2 + decoder, in fp32, with the model configuration they
were built from. `EarlyStageMapper` loads it from a version directory alone: no Ray, no
Kafka, no training checkpoint. It is how the service embeds an item nobody has seen,
and how the evaluation re-embeds mature items as if they were new.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from streaming.shards import decode_frames, item_text
from embeddings.clusters import ClusterModel, frame_descriptor, text_descriptor
from trainer.config import ModelConfig
from trainer.memer import stage
from trainer.model import DenseArch
from trainer.regression import REGRESSION_FILE, ContentRegression
from trainer.text import tokenize

MAPPING_FILE = "mapping.pt"
PARTS = ("frames", "text", "cross_modal", "modal", "fuse", "memer")  # of DenseArch: the content path and the mapping (when present)


def save_mapping(dense: nn.Module, cfg: ModelConfig, maturity: int, centroids: tuple[np.ndarray, np.ndarray],
                 cluster_rows: tuple[np.ndarray, np.ndarray], path: Path) -> dict:
    """Writes the mapping of `dense` (a DenseArch) to `path`, with the k-means centroids and cluster
    embeddings a new item's cluster IDs come from; returns what the manifest says of it."""
    state = {name: {k: v.detach().float().cpu() for k, v in getattr(dense, name).state_dict().items()}
             for name in PARTS if getattr(dense, name) is not None}
    clusters = {"frame_centroids": centroids[0], "text_centroids": centroids[1], "frame_rows": cluster_rows[0], "text_rows": cluster_rows[1]}
    torch.save({"config": cfg.model_dump(mode="json"), "maturity": int(maturity), "state": state,
                "clusters": {k: torch.from_numpy(np.ascontiguousarray(v, np.float32)) for k, v in clusters.items()}}, path)
    return {"file": MAPPING_FILE, "signals": list(cfg.memer_signals), "maturity": int(maturity), "frames": cfg.frames,
            "frame_size": cfg.frame_size, "text_len": cfg.text_len, "text_vocab": cfg.text_vocab}


class EarlyStageMapper(nn.Module):
    """The published mapping, ready to embed items from raw images and text."""

    def __init__(self, cfg: ModelConfig, maturity: int, clusters: dict[str, np.ndarray]):
        super().__init__()
        self.cfg, self.maturity = cfg, maturity
        self.dense = DenseArch(cfg)  # only its content path and MEMER are loaded and used
        self.frame_clusters, self.text_clusters = ClusterModel(clusters["frame_centroids"]), ClusterModel(clusters["text_centroids"])
        self.frame_rows, self.text_rows = (torch.as_tensor(clusters[k]) for k in ("frame_rows", "text_rows"))
        self.regression: ContentRegression | None = None  # what the version serves items without interactions by

    @classmethod
    def load(cls, version_dir: str | Path) -> "EarlyStageMapper":
        blob = torch.load(Path(version_dir) / MAPPING_FILE, map_location="cpu", weights_only=True)
        mapper = cls(ModelConfig.model_validate(blob["config"]), blob["maturity"], {k: v.numpy() for k, v in blob["clusters"].items()})
        for name, state in blob["state"].items():
            getattr(mapper.dense, name).load_state_dict(state)
        if (Path(version_dir) / REGRESSION_FILE).exists():
            mapper.regression = ContentRegression.load(Path(version_dir) / REGRESSION_FILE)
        return mapper.eval()

    @property
    def signals(self) -> list[str]:
        return self.dense.memer.signals

    @torch.no_grad()
    def embed_content(self, frames: np.ndarray, has_frames: np.ndarray, texts: list[str], counts: np.ndarray,
                      signal: str | None = None, regression: bool = True) -> np.ndarray:
        """frames uint8 [N, F, S, S, 3], has_frames [N], texts, interaction counts [N] -> unit
        vectors [N, D] of `signal` (default: the first, the one the index serves). An item without
        interactions gets the version's content regression, as the index serves it, unless
        `regression` is False (MEMER's mapping alone)."""
        frame_desc = np.stack([frame_descriptor(f) for f in frames])  # blank frames (none, or withheld): zeros
        text_desc = np.stack([text_descriptor(t) for t in texts])
        counts = np.asarray(counts)
        new = (counts == 0) if regression and self.regression is not None else np.zeros(len(frames), bool)
        out = np.empty((len(frames), self.cfg.embedding_dim), np.float32)
        if new.any():  # the regression alone: the encoders are not run for the items it serves
            out[new] = self.regression.predict(frame_desc[new], text_desc[new])
        old = ~new
        if old.any():
            fc, tc = self.frame_clusters.assign(frame_desc[old]), self.text_clusters.assign(text_desc[old])
            tokens = np.stack([tokenize(t, self.cfg.text_vocab, self.cfg.text_len) for t, keep in zip(texts, old) if keep])
            content, _, feat = self.dense.item_parts(torch.zeros(int(old.sum()), self.cfg.embedding_dim), self.frame_rows[fc],
                                                     self.text_rows[tc], torch.as_tensor(frames[old]), torch.as_tensor(tokens),
                                                     torch.as_tensor(np.asarray(has_frames)[old], dtype=torch.float32))
            freq = stage(torch.as_tensor(counts[old]), self.maturity)
            base = self.dense.as_new(content)
            out[old] = self.dense.memer.maps[signal or self.signals[0]].early(feat, freq, base).numpy()
        return out

    def embed(self, images: list[bytes], title: str = "", tags: list[str] = (), count: int = 0,
              signal: str | None = None) -> np.ndarray:
        """One item from encoded images (any format PIL reads; none is allowed) and its text.
        Raises PIL.UnidentifiedImageError / OSError for an image that cannot be decoded."""
        frames = decode_frames(images, self.cfg.frames * self.cfg.clips, self.cfg.frame_size)
        return self.embed_content(frames[None], np.array([float(bool(images))]), [item_text(title, list(tags))], np.array([count]), signal)[0]
