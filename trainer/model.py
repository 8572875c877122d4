"""The two-tower retrieval model, split the way it is trained.

`SparseArch` holds the TorchRec ID tables (users, items, per-modality cluster IDs) behind
managed collisions (embeddings.tables); it is wrapped by DistributedModelParallel and its
rows are updated by fused optimizers inside backward. `DenseArch` holds everything else (the seed-000 style
transformer frame/clip encoder, the text encoder, fusion and tower MLPs); it is the
DeepSpeed engine. One backward through the loss updates both.

The item vector adds a content part (frames, text, cluster IDs: known the moment an
item is announced) and an ID part (learned from interactions). Training drops the
ID part for a share of items, so the content part alone must place an item well:
that is what a cold item is served with.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torchrec import KeyedJaggedTensor
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingCollection

from trainer.config import ModelConfig
from trainer.memer import Memer

USER, ITEM, FRAME_CLUSTER, TEXT_CLUSTER = "user_id", "item_id", "frame_cluster", "text_cluster"
FEATURES = (USER, ITEM, FRAME_CLUSTER, TEXT_CLUSTER)


class SparseArch(nn.Module):
    """ID embedding tables; forward returns one [n, D] tensor per feature (one id per row)."""

    def __init__(self, tables: ManagedCollisionEmbeddingCollection):
        super().__init__()
        self.mc_ec = tables

    def forward(self, kjt: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        embeddings, _ = self.mc_ec(kjt)
        return {k: jt.values() for k, jt in embeddings.items()}


# cuDNN's fused attention fails at large batch in bf16 (measured at 65,536 sequences on an H100);
# flash and memory-efficient attention do not, and the math kernel is the CPU path.
ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _encoder(d: int, heads: int, layers: int) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(d, heads, dim_feedforward=2 * d, dropout=0.0, batch_first=True, norm_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


class FrameEncoder(nn.Module):
    """ViT over patches of each frame, then a temporal transformer over the clip ([CLS] both times)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        n_patches = (cfg.frame_size // cfg.patch) ** 2
        self.patchify = nn.Conv2d(3, d, cfg.patch, cfg.patch)
        self.pos = nn.Parameter(torch.randn(1, n_patches + 1, d) * 0.02)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.spatial = _encoder(d, cfg.heads, cfg.frame_layers)
        self.tpos = nn.Parameter(torch.randn(1, cfg.frames + 1, d) * 0.02)
        self.tcls = nn.Parameter(torch.zeros(1, 1, d))
        self.temporal = _encoder(d, cfg.heads, cfg.temporal_layers)
        self.norm = nn.LayerNorm(d)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """frames: uint8 [N, F, S, S, 3] -> [N, d]."""
        n, f = frames.shape[:2]
        x = frames.flatten(0, 1).permute(0, 3, 1, 2).to(self.patchify.weight.dtype).div(127.5).sub(1.0)
        x = self.patchify(x).flatten(2).transpose(1, 2)  # [N*F, P, d]
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], 1) + self.pos
        with sdpa_kernel(ATTENTION_BACKENDS):
            per_frame = self.spatial(x)[:, 0].view(n, f, -1)
            clip = torch.cat([self.tcls.expand(n, -1, -1), per_frame], 1) + self.tpos[:, : f + 1]
            return self.norm(self.temporal(clip)[:, 0])


def _sinusoid(length: int, d: int) -> torch.Tensor:
    pos = torch.arange(length).unsqueeze(1)
    div = torch.exp(torch.arange(0, d, 2) * (-math.log(10000.0) / d))
    pe = torch.zeros(length, d)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * div), torch.cos(pos * div)
    return pe


class TextEncoder(nn.Module):
    """BERT-like: word embeddings + fixed sinusoidal positions + transformer, [CLS] out."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.words = nn.Embedding(cfg.text_vocab, d, padding_idx=0)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.register_buffer("pos", _sinusoid(cfg.text_len + 1, d).unsqueeze(0), persistent=False)
        self.encoder = _encoder(d, cfg.heads, cfg.text_layers)
        self.norm = nn.LayerNorm(d)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: int64 [N, T] (0 = padding) -> [N, d]."""
        x = torch.cat([self.cls.expand(len(tokens), -1, -1), self.words(tokens)], 1) + self.pos[:, : tokens.shape[1] + 1].to(self.cls.dtype)
        pad = torch.cat([torch.zeros_like(tokens[:, :1], dtype=torch.bool), tokens == 0], 1)
        with sdpa_kernel(ATTENTION_BACKENDS):
            return self.norm(self.encoder(x, src_key_padding_mask=pad)[:, 0])


class DenseArch(nn.Module):
    """Content encoders, both towers and MEMER's early-stage mapping; returns unit-norm fp32 vectors.

    Its inputs arrive in fp32 (the sparse lookups keep fp32 rows); each entry point casts
    them once to the engine's dtype (bf16 under DeepSpeed's bf16 mode), and the outputs go
    back to fp32, so the loss and the exported vectors are computed in fp32 either way.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, e = cfg.d_model, cfg.embedding_dim
        self.memer_weights = tuple(cfg.memer_weights)
        self.frames = FrameEncoder(cfg)
        self.text = TextEncoder(cfg)
        self.fuse = nn.Sequential(nn.Linear(2 * d + 2 * e, 2 * e), nn.GELU(), nn.Linear(2 * e, e))
        self.id_proj = nn.Linear(e, e, bias=False)
        self.user_mlp = nn.Sequential(nn.Linear(e, e), nn.GELU(), nn.Linear(e, e))
        self.memer = Memer(d, e, cfg.memer_hidden, cfg.memer_signals) if cfg.memer_signals else None

    @property
    def dtype(self) -> torch.dtype:
        return self.id_proj.weight.dtype

    def user_vector(self, user_emb: torch.Tensor) -> torch.Tensor:
        user_emb = user_emb.to(self.dtype)
        return F.normalize((user_emb + self.user_mlp(user_emb)).float(), dim=-1)

    def content_features(self, frames: torch.Tensor, tokens: torch.Tensor, has_frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The frame and text encoders' outputs: what both the item tower and MEMER start from."""
        return self.frames(frames) * has_frames.to(self.dtype).unsqueeze(1), self.text(tokens)

    def item_parts(self, item_emb, frame_cluster_emb, text_cluster_emb, frames, tokens, has_frames):
        """(content part, ID part, MEMER's fused features or None), before they are combined."""
        item_emb, frame_cluster_emb, text_cluster_emb = (t.to(self.dtype) for t in (item_emb, frame_cluster_emb, text_cluster_emb))
        z_frames, z_text = self.content_features(frames, tokens, has_frames)
        content = self.fuse(torch.cat([z_frames, z_text, frame_cluster_emb, text_cluster_emb], 1))
        feat = (self.memer.features(z_frames.detach(), z_text.detach(), content.detach(), has_frames)
                if self.memer is not None else None)
        return content, self.id_proj(item_emb), feat

    def item_vector(self, item_emb, frame_cluster_emb, text_cluster_emb, frames, tokens, has_frames, id_keep) -> torch.Tensor:
        """id_keep [N] in {0,1}: 0 serves the item from content alone (cold or dropped)."""
        content, id_part, _ = self.item_parts(item_emb, frame_cluster_emb, text_cluster_emb, frames, tokens, has_frames)
        return self._combine(content, id_part, id_keep)

    def _combine(self, content: torch.Tensor, id_part: torch.Tensor, id_keep: torch.Tensor) -> torch.Tensor:
        return F.normalize((content + id_part * id_keep.to(self.dtype).unsqueeze(1)).float(), dim=-1)

    def forward(self, user_emb, item_emb, frame_cluster_emb, text_cluster_emb, frames, tokens, has_frames, id_keep,
                memer_inputs: tuple[torch.Tensor, ...] | None = None):
        """(user vectors, item vectors, MEMER loss). memer_inputs = (item_index, freq, mature, labels), see `Memer.loss`."""
        users = self.user_vector(user_emb)
        content, id_part, feat = self.item_parts(item_emb, frame_cluster_emb, text_cluster_emb, frames, tokens, has_frames)
        items = self._combine(content, id_part, id_keep)
        if self.memer is None or memer_inputs is None:
            return users, items, users.new_zeros(())
        item_index, freq, mature, labels = memer_inputs
        mature_vecs = F.normalize((content + id_part).float(), dim=-1).detach()
        base = F.normalize(content.float(), dim=-1).detach()
        loss = self.memer.loss(feat, base, mature_vecs, freq, mature, users.detach(), item_index, labels, self.memer_weights)
        return users, items, loss
