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
from trainer.losses import info_nce
from trainer.memer import Memer

USER, ITEM, FRAME_CLUSTER, TEXT_CLUSTER = "user_id", "item_id", "frame_cluster", "text_cluster"
FEATURES = (USER, ITEM, FRAME_CLUSTER, TEXT_CLUSTER)
N_MODALITIES = 2  # frames, text: one cluster table, one modal interest each


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


class UserTower(nn.Module):
    """M3CSR's user side (paper 001, 4.4): multi-head attention with the user's ID embedding as the
    query over the ID embeddings of their last L positives (behavioural interest, eq. 3), and per
    modality over the history's cluster embeddings with a stop-gradient query (eq. 4); the
    interest intensity (eqs. 5-7) weighs the modalities per user with a softmax at a temperature.

    The user's own embedding is always one of the keys, so a user without history attends to
    themselves (no all-masked row). The parts are summed, not concatenated, so the served vector
    keeps `embedding_dim` and the ID / content share is set on the item side by the gate.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        e = cfg.embedding_dim
        heads = cfg.heads if e % cfg.heads == 0 else 1
        self.intensity_temperature = cfg.intensity_temperature if cfg.interest_intensity else None
        self.behaviour = nn.MultiheadAttention(e, heads, batch_first=True)
        self.modal = nn.ModuleList(nn.MultiheadAttention(e, heads, batch_first=True) for _ in range(N_MODALITIES))
        self.modal_proj = nn.ModuleList(nn.Linear(e, e) for _ in range(N_MODALITIES))
        self.intensity = nn.Linear(2 * e, 1)

    def forward(self, user_emb: torch.Tensor, hist: tuple[torch.Tensor, ...], pad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """user_emb [B, e]; hist = (item ID, frame cluster, text cluster) embeddings [B, L, e]; pad [B, L]
        True where a position is empty. Returns (user vector before normalisation, orthogonality loss)."""
        q = user_emb.unsqueeze(1)
        mask = torch.cat([torch.zeros_like(pad[:, :1]), pad], 1)

        def attend(mha: nn.MultiheadAttention, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
            kv = torch.cat([query, keys], 1)
            return mha(query, kv, kv, key_padding_mask=mask, need_weights=False)[0][:, 0]

        h_u = user_emb + attend(self.behaviour, q, hist[0])
        interests = [proj(attend(mha, q.detach(), h)) for mha, proj, h in zip(self.modal, self.modal_proj, hist[1:])]
        if self.intensity_temperature is None:
            weighted = interests
        else:
            logits = torch.cat([self.intensity(torch.cat([h_u.detach(), h], 1)) for h in interests], 1)
            weights = torch.softmax(logits.float() / self.intensity_temperature, 1).to(h_u.dtype)
            weighted = [w.unsqueeze(1) * h for w, h in zip(weights.unbind(1), interests)]
        ortho = sum(((a.float() * b.float()).sum(1) ** 2).mean() for k, a in enumerate(weighted) for b in weighted[k + 1:])
        return h_u + sum(weighted), ortho


class CrossModal(nn.Module):
    """CIERec (paper 003, III-D/E): each modality inferred from the other, and a gated fusion of the
    observed and the inferred features; an item without an image (or without text) is served by
    what its other modality implies instead of zeros. The inference is taught on items that have
    both (cosine to the detached observed feature)."""

    def __init__(self, d: int):
        super().__init__()
        self.infer = nn.ModuleList(nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d)) for _ in range(2))
        self.gate = nn.ModuleList(nn.Linear(2 * d, d) for _ in range(2))

    def forward(self, z_frames, z_text, has_frames, has_text) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(frames feature, text feature, inference loss)."""
        out, loss = [], z_frames.new_zeros((), dtype=torch.float32)
        for k, (z, other, has, has_other) in enumerate(((z_frames, z_text, has_frames, has_text), (z_text, z_frames, has_text, has_frames))):
            inferred = self.infer[k](other)
            g = torch.sigmoid(self.gate[k](torch.cat([z, inferred], 1)))
            h = has.to(z.dtype).unsqueeze(1)
            out.append(h * (g * z + (1 - g) * inferred) + (1 - h) * inferred)
            both = (has * has_other).float()
            target = self.infer[k](other.detach())
            loss = loss + ((1 - F.cosine_similarity(target.float(), z.detach().float(), dim=1)) * both).sum() / both.sum().clamp_min(1)
        return out[0], out[1], loss


POP_BINS = 32  # log2 bins of an item's positives: 0, 1, 2-3, 4-7, ... (scale-free: no dataset's counts in it)


def popularity_bin(counts: torch.Tensor) -> torch.Tensor:
    return torch.floor(torch.log2(counts.float().clamp_min(0) + 1)).long().clamp(0, POP_BINS - 1)


class DenseArch(nn.Module):
    """Content encoders, both towers and MEMER's early-stage mapping; returns unit-norm fp32 vectors.

    Its inputs arrive in fp32 (the sparse lookups keep fp32 rows); each entry point casts
    them once to the engine's dtype (bf16 under DeepSpeed's bf16 mode), and the outputs go
    back to fp32, so the loss and the exported vectors are computed in fp32 either way.

    Each cold-start part is a switch of `ModelConfig` (all off is the seed model): the attention
    user tower with interest intensity and orthogonality (M3CSR), the popularity gate between an
    item's ID part and content part (M3CSR 4.5, instead of a hard maturity switch), cross-modal
    inference of a missing modality (CIERec), and the auxiliary losses: content <-> ID
    contrast (CLCRec R-E) and frames <-> text alignment (seed 000, 5.3.2).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, e = cfg.d_model, cfg.embedding_dim
        self.cfg = cfg
        self.memer_weights = tuple(cfg.memer_weights)
        self.frames = FrameEncoder(cfg)
        self.text = TextEncoder(cfg)
        # M3CSR's Modal Encoder per modality: its content feature mapped to the ID space, next to its
        # cluster embedding (eq. 2); the fusion MLP then makes the item's content part of both
        self.modal = nn.ModuleList(nn.Linear(d, e) for _ in range(N_MODALITIES))
        self.fuse = nn.Sequential(nn.Linear(2 * N_MODALITIES * e, 2 * e), nn.GELU(), nn.Linear(2 * e, e))
        self.id_proj = nn.Linear(e, e, bias=False)
        # the ID part of an item seen as new (dropped in training, without a row at export): one learned
        # vector for all of them, which the item's content then places (zeros: content alone at the start)
        self.new_item = nn.Parameter(torch.zeros(e))
        self.user_mlp = nn.Sequential(nn.Linear(e, e), nn.GELU(), nn.Linear(e, e))
        self.user_tower = UserTower(cfg) if cfg.user_tower == "attention" else None
        self.cross_modal = CrossModal(d) if cfg.infer_missing else None
        self.popularity = nn.Sequential(nn.Embedding(POP_BINS, e), nn.Linear(e, 1)) if cfg.popularity_gate else None
        self.align = nn.ModuleList([nn.Linear(d, e), nn.Linear(d, e)]) if cfg.alignment_weight else None
        self.memer = Memer(d, e, cfg.memer_hidden, cfg.memer_signals) if cfg.memer_signals else None

    @property
    def dtype(self) -> torch.dtype:
        return self.id_proj.weight.dtype

    def user_vector(self, user_emb: torch.Tensor, hist: tuple[torch.Tensor, ...] | None = None,
                    pad: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(unit user vectors, orthogonality loss). hist / pad: the history's embeddings (see UserTower)."""
        user_emb = user_emb.to(self.dtype)
        ortho = user_emb.new_zeros((), dtype=torch.float32)
        if self.user_tower is not None:
            if hist is None:  # no history given: one empty position, so the user attends to themselves
                hist = tuple(user_emb.new_zeros((len(user_emb), 1, user_emb.shape[1])) for _ in range(3))
                pad = torch.ones((len(user_emb), 1), dtype=torch.bool, device=user_emb.device)
            user_emb, ortho = self.user_tower(user_emb, tuple(h.to(self.dtype) for h in hist), pad)
        return F.normalize((user_emb + self.user_mlp(user_emb)).float(), dim=-1), ortho

    def content_features(self, frames: torch.Tensor, tokens: torch.Tensor, has_frames: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(frames feature, text feature, cross-modal inference loss): what both the item tower and MEMER start from."""
        z_frames, z_text = self.clip_features(frames), self.text(tokens)
        if self.cross_modal is None:
            return z_frames * has_frames.to(self.dtype).unsqueeze(1), z_text, z_frames.new_zeros((), dtype=torch.float32)
        return self.cross_modal(z_frames, z_text, has_frames, (tokens != 0).any(1).to(has_frames.dtype))

    def clip_features(self, frames: torch.Tensor) -> torch.Tensor:
        """Seed 000 (5.1.2, 5.4): frames [N, F * S, ...] hold S clips of F frames. In training one random
        clip per item is encoded; in eval mode (export, the published mapping) every clip is, and the
        features are max-pooled over clips, so a long item is judged by its best part."""
        f = self.cfg.frames
        clips = frames.shape[1] // f
        if clips <= 1:
            return self.frames(frames[:, :f])
        n = len(frames)
        if self.training:
            start = torch.randint(0, clips, (n,), device=frames.device) * f
            index = (start[:, None] + torch.arange(f, device=frames.device)).view(n, f, 1, 1, 1).expand(-1, -1, *frames.shape[2:])
            return self.frames(frames.gather(1, index))
        every = self.frames(frames[:, : clips * f].reshape(n * clips, f, *frames.shape[2:]))
        return every.view(n, clips, -1).amax(1)

    def gate(self, counts: torch.Tensor) -> torch.Tensor:
        """[N, 1] share of the content part in an item's vector, from its positives so far (M3CSR eq. 10)."""
        return torch.sigmoid(self.popularity(popularity_bin(counts))).to(self.dtype)

    def item_parts(self, item_emb, frame_cluster_emb, text_cluster_emb, frames, tokens, has_frames, aux: dict | None = None):
        """(content part, ID part, MEMER's fused features or None), before they are combined. `aux`,
        when given, receives the auxiliary losses of the content path."""
        item_emb, frame_cluster_emb, text_cluster_emb = (t.to(self.dtype) for t in (item_emb, frame_cluster_emb, text_cluster_emb))
        z_frames, z_text, infer_loss = self.content_features(frames, tokens, has_frames)
        modal = [self.modal[0](z_frames), frame_cluster_emb, self.modal[1](z_text), text_cluster_emb]
        content = self.fuse(torch.cat(modal, 1))
        id_part = self.id_proj(item_emb)
        if aux is not None:
            aux["infer"] = infer_loss
            aux["clcrec"] = info_nce(content, id_part, self.cfg.temperature) if self.cfg.clcrec_weight else infer_loss * 0
            both = has_frames > 0
            aux["align"] = (info_nce(self.align[0](z_frames[both]), self.align[1](z_text[both]), self.cfg.temperature)
                            if self.align is not None and int(both.sum()) > 1 else infer_loss * 0)
        feat = (self.memer.features(z_frames.detach(), z_text.detach(), content.detach(), has_frames)
                if self.memer is not None else None)
        return content, id_part, feat

    def combine(self, content: torch.Tensor, id_part: torch.Tensor, id_keep: torch.Tensor, counts: torch.Tensor | None = None) -> torch.Tensor:
        """The unit item vector. id_keep [N] in {0,1}: 0 sees the item as new, as a cold item is served:
        its ID part is the shared `new_item` vector and, with the gate, its positives count as 0 (CLCRec's
        hybrid rho in training; an item without a row at export). With the gate, `counts` [N] sets the mix."""
        keep = id_keep.to(self.dtype).unsqueeze(1)
        id_part = keep * id_part + (1 - keep) * self.new_item.to(self.dtype)
        if self.popularity is None:
            return F.normalize((content + id_part).float(), dim=-1)
        share = self.gate(counts * id_keep.to(counts.dtype))
        return F.normalize((share * content + (1 - share) * id_part).float(), dim=-1)

    def as_new(self, content: torch.Tensor) -> torch.Tensor:
        """The unit vector of items known by their content alone (`combine` with no row, no positives):
        what a cold item is served with, and where MEMER's mapping starts from."""
        none = torch.zeros(len(content), device=content.device)
        return self.combine(content, torch.zeros_like(content), none, none)  # counts: read by the gate alone

    def forward(self, user_emb, item_emb, frame_cluster_emb, text_cluster_emb, frames, tokens, has_frames, id_keep,
                item_counts=None, hist=None, pad=None, memer_inputs: tuple[torch.Tensor, ...] | None = None):
        """(user vectors, item vectors, auxiliary loss: MEMER's, plus the weighted switches').
        memer_inputs = (item_index, freq, mature, labels), see `Memer.loss`."""
        users, ortho = self.user_vector(user_emb, hist, pad)
        aux: dict = {}
        content, id_part, feat = self.item_parts(item_emb, frame_cluster_emb, text_cluster_emb, frames, tokens, has_frames, aux)
        items = self.combine(content, id_part, id_keep, item_counts)
        c = self.cfg
        loss = (c.orthogonality_weight * ortho + aux["infer"] + c.clcrec_weight * aux["clcrec"] + c.alignment_weight * aux["align"])
        if self.memer is None or memer_inputs is None:
            return users, items, loss
        item_index, freq, mature, labels = memer_inputs
        mature_vecs = self.combine(content, id_part, torch.ones_like(id_keep), item_counts).detach()
        base = self.as_new(content).detach()
        loss = loss + self.memer.loss(feat, base, mature_vecs, freq, mature, users.detach(), item_index, labels, self.memer_weights)
        return users, items, loss
