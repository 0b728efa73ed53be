"""SGRAF (Diao et al., AAAI 2021, "Similarity Reasoning and Filtration for Image-Text Matching").

The encoders (``sgraf_regions``, ``sgraf_words``) keep their local vectors: their pooled means are the embeddings
(what an inner-product shortlist can use), the regions and words the *contexts* from which the similarity
network (:class:`SGRAFSimilarity`, registered as ``sgr`` and ``saf``) scores a pair: a global alignment and one
local alignment per word, then graph reasoning (SGR) or a gated mean (SAF), read out to a score in (0, 1).
Batched over tiles of the (image, caption) grid, padding masked everywhere. The method step by step, its config
and where it departs from the reference code (on purpose): docs/methods/sgraf.md.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vsekit.models.base import Encoder
from vsekit.models.image import IMAGE_ENCODERS
from vsekit.models.layers import l2norm, xavier_linear_
from vsekit.models.similarity import SIMILARITY_NETWORKS, SimilarityNetwork
from vsekit.models.text import TEXT_ENCODERS, word_embedding

# Evaluation tiles: images per tile, and at most this many floats in one (n, m, T, max(E, R)) tensor
# (64 MiB of float32 on CPU; accelerators take 4x larger tiles).
IMAGE_TILE = 32
MAX_TILE_CAPTIONS = 64
TILE_ELEMENTS = {"cpu": 1 << 24, "accel": 1 << 26}
# fixed_shapes: a caption of length L is always scored padded to the next multiple of this
LENGTH_STEP = 4


def _no_abs(use_abs: bool, what: str) -> None:
    if use_abs:
        raise ValueError(f"{what} keeps signed local vectors; use_abs (order embeddings) does not apply")


@IMAGE_ENCODERS.register("sgraf_regions")
class SGRAFRegionEncoder(Encoder):
    """Region features (B, R, D) -> one linear layer -> L2 per region: the (B, R, E) regions are the context;
    their mean (L2-normalised by :meth:`finish`) is the embedding. ``img_dim``/``num_regions`` come from the
    data set's feature shape."""

    reads_features = True
    normalize = True

    def __init__(self, img_dim: int, embed_size: int = 1024, num_regions: int | None = None,
                 use_abs: bool = False) -> None:
        super().__init__()
        if not num_regions:
            raise ValueError("sgraf_regions reads region features (N, R, D); this data set has one vector per "
                             "image")
        _no_abs(use_abs, "sgraf_regions")
        self.fc = xavier_linear_(nn.Linear(img_dim, embed_size))

    def forward_parts(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if feats.dim() != 3:
            raise ValueError(f"sgraf_regions expects (B, R, D) region features, got shape {tuple(feats.shape)}")
        regions = l2norm(self.fc(feats))
        return regions.mean(1), regions


@TEXT_ENCODERS.register("sgraf_words")
class SGRAFWordEncoder(Encoder):
    """Embedding(V, word_dim) -> dropout -> GRU (bi-directional by default, the two directions averaged) ->
    L2 per word: the (B, T, E) words are the context (zeros past each caption's length); their mean over the
    valid words (L2-normalised by :meth:`finish`) is the embedding."""

    normalize = True

    def __init__(self, vocab_size: int, embed_size: int = 1024, word_dim: int = 300, num_layers: int = 1,
                 bidirectional: bool = True, dropout: float = 0.4, word_vectors: str | None = None,
                 itos: list[str] | None = None, use_abs: bool = False) -> None:
        super().__init__()
        _no_abs(use_abs, "sgraf_words")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"text_encoder.dropout must be in [0, 1), got {dropout}")
        self.embed, self.words_from_file = word_embedding(vocab_size, word_dim, word_vectors, itos)
        self.dropout = nn.Dropout(dropout)
        self.rnn = nn.GRU(word_dim, embed_size, num_layers, batch_first=True, bidirectional=bidirectional)
        self.bidirectional = bidirectional

    def forward_parts(self, tokens: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.dropout(self.embed(tokens))
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=tokens.shape[1])
        if self.bidirectional:
            half = out.shape[2] // 2
            out = (out[:, :, :half] + out[:, :, half:]) / 2
        valid = word_mask(lengths.to(out.device), out.shape[1])
        words = l2norm(out) * valid.unsqueeze(-1)
        pooled = words.sum(1) / lengths.to(out.device, out.dtype).clamp(min=1).unsqueeze(1)
        return pooled, words


def word_mask(lengths: torch.Tensor, size: int) -> torch.Tensor:
    """(M, size) bool: True at the first ``lengths[j]`` positions of row j."""
    return torch.arange(size, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


def _xavier(*layers: nn.Linear) -> None:
    for layer in layers:
        xavier_linear_(layer)


def masked_batch_norm(x: torch.Tensor, valid: torch.Tensor, bn: nn.BatchNorm1d) -> torch.Tensor:
    """``bn`` (one channel) applied to the scalars ``x`` with the statistics of the ``valid`` entries only, in
    training; in evaluation the running statistics, as batch norm does. Padding never enters the statistics."""
    if bn.training:
        sel = x[valid]
        mean = sel.mean()
        var = sel.var(unbiased=False)
        with torch.no_grad():
            n = sel.numel()
            m = bn.momentum if bn.momentum is not None else 0.1
            bn.running_mean.mul_(1 - m).add_(m * mean.detach())
            bn.running_var.mul_(1 - m).add_(m * var.detach() * n / max(n - 1, 1))
            bn.num_batches_tracked.add_(1)
    else:
        mean, var = bn.running_mean[0], bn.running_var[0]
    return (x - mean) / torch.sqrt(var + bn.eps) * bn.weight[0] + bn.bias[0]


class _VisualSelfAttention(nn.Module):
    """The global image vector: regions weighted by their agreement with the region mean (both embedded by
    linear + batch norm + tanh), then L2-normalised."""

    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.local = nn.Linear(dim, dim)
        self.local_bn = nn.BatchNorm1d(dim)
        self.glob = nn.Linear(dim, dim)
        self.glob_bn = nn.BatchNorm1d(dim)
        self.common = nn.Linear(dim, 1)
        self.dropout = nn.Dropout(dropout)
        _xavier(self.local, self.glob, self.common)

    def forward(self, regions: torch.Tensor) -> torch.Tensor:
        n, r, e = regions.shape
        local = self.local_bn(self.local(regions).reshape(n * r, e)).reshape(n, r, e)
        local = self.dropout(torch.tanh(local))
        glob = self.dropout(torch.tanh(self.glob_bn(self.glob(regions.mean(1)))))
        weights = torch.softmax(self.common(local * glob.unsqueeze(1)).squeeze(-1), dim=1)
        return l2norm((weights.unsqueeze(-1) * regions).sum(1))


class _TextSelfAttention(nn.Module):
    """The global caption vector: the valid words weighted by their agreement with the word mean (linear +
    tanh), then L2-normalised."""

    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.local = nn.Linear(dim, dim)
        self.glob = nn.Linear(dim, dim)
        self.common = nn.Linear(dim, 1)
        self.dropout = nn.Dropout(dropout)
        _xavier(self.local, self.glob, self.common)

    def forward(self, words: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        mean = words.sum(1) / valid.sum(1, keepdim=True).clamp(min=1).to(words.dtype)
        local = self.dropout(torch.tanh(self.local(words)))
        glob = self.dropout(torch.tanh(self.glob(mean)))
        logits = self.common(local * glob.unsqueeze(1)).squeeze(-1).masked_fill(~valid, float("-inf"))
        weights = torch.softmax(logits, dim=1)
        return l2norm((weights.unsqueeze(-1) * words).sum(1))


class _GraphReasoning(nn.Module):
    """One step of SGR: edges = softmax over the valid nodes of query . key, nodes <- ReLU(W (edges @ nodes))."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        _xavier(self.query, self.key, self.out)

    def forward(self, nodes: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        logits = self.query(nodes) @ self.key(nodes).transpose(-1, -2)  # (..., L, L)
        edges = torch.softmax(logits.masked_fill(~valid.unsqueeze(-2), float("-inf")), dim=-1)
        return torch.relu(self.out(edges @ nodes))


class SGRAFSimilarity(SimilarityNetwork):
    """The SGRAF similarity network; ``module`` ``"sgr"`` (graph reasoning) or ``"saf"`` (attention filtration).

    ``sim_dim``: size of the alignment vectors (256 in the paper); ``sgr_step``: reasoning steps (SGR only);
    ``smooth``: the inverse temperature of the word-to-region softmax (9 as SCAN); ``dropout``: of the
    self-attention layers. ``embed_size`` is the joint space of the contexts.
    """

    def __init__(self, embed_size: int, module: str = "sgr", sim_dim: int = 256, sgr_step: int = 3,
                 smooth: float = 9.0, dropout: float = 0.4) -> None:
        super().__init__()
        if module not in ("sgr", "saf"):
            raise ValueError(f"module must be 'sgr' or 'saf', got {module!r}")
        if sim_dim < 1 or sgr_step < 1:
            raise ValueError(f"sim_dim and sgr_step must be >= 1, got {sim_dim} and {sgr_step}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.module = self.name = module
        self.embed_size, self.sim_dim, self.smooth = int(embed_size), int(sim_dim), float(smooth)
        self.visual_sa = _VisualSelfAttention(embed_size, dropout)
        self.text_sa = _TextSelfAttention(embed_size, dropout)
        self.local_proj = nn.Linear(embed_size, sim_dim)
        self.global_proj = nn.Linear(embed_size, sim_dim)
        self.score = nn.Linear(sim_dim, 1)
        _xavier(self.local_proj, self.global_proj, self.score)
        if module == "sgr":
            self.reasoning = nn.ModuleList(_GraphReasoning(sim_dim) for _ in range(sgr_step))
        else:
            self.gate = nn.Linear(sim_dim, 1)
            self.gate_bn = nn.BatchNorm1d(1)
            _xavier(self.gate)

    def extra_repr(self) -> str:
        steps = f", sgr_step={len(self.reasoning)}" if self.module == "sgr" else ""
        return f"module={self.module}, sim_dim={self.sim_dim}{steps}, smooth={self.smooth}"

    # -- one tile: n images x m captions ---------------------------------------------------------------------
    def _tile(self, regions: torch.Tensor, img_glo: torch.Tensor, words: torch.Tensor, cap_glo: torch.Tensor,
              valid: torch.Tensor) -> torch.Tensor:
        """(n, m) scores of ``regions`` (n, R, E) against ``words`` (m, T, E) with their global vectors."""
        n, r, e = regions.shape
        m, t, _ = words.shape
        # SCAN text-to-image attention: every word attends over the regions of every image
        attn = (words.reshape(m * t, e) @ regions.reshape(n * r, e).t()).reshape(m, t, n, r).permute(2, 0, 1, 3)
        attn = F.leaky_relu(attn, 0.1) * valid[None, :, :, None]  # (n, m, T, R); padding words are 0
        attn = l2norm(attn, dim=2)  # over the caption's words, per region
        attn = torch.softmax(attn * self.smooth, dim=3)
        attended = torch.bmm(attn.reshape(n, m * t, r), regions).reshape(n, m, t, e)
        attended = l2norm(attended)
        local = l2norm(self.local_proj((attended - words.unsqueeze(0)).pow(2)))  # (n, m, T, S)
        glob = l2norm(self.global_proj((img_glo.unsqueeze(1) - cap_glo.unsqueeze(0)).pow(2)))  # (n, m, S)
        nodes = torch.cat([glob.unsqueeze(2), local], dim=2)  # (n, m, 1 + T, S)
        node_valid = torch.cat([valid.new_ones(m, 1), valid], dim=1)  # (m, 1 + T)
        if self.module == "sgr":
            for step in self.reasoning:
                nodes = step(nodes, node_valid.unsqueeze(0))
            out = nodes[:, :, 0]
        else:
            gate = self.gate(nodes).squeeze(-1)  # (n, m, 1 + T)
            full = node_valid.unsqueeze(0).expand_as(gate)
            gate = torch.sigmoid(masked_batch_norm(gate, full, self.gate_bn)) * full
            gate = gate / (gate.sum(-1, keepdim=True) + 1e-8)
            out = l2norm((gate.unsqueeze(-1) * nodes).sum(2))
        return torch.sigmoid(self.score(out)).squeeze(-1)

    # -- the grid ---------------------------------------------------------------------------------------------
    def forward(self, regions: torch.Tensor, words: torch.Tensor, lengths: torch.Tensor, *,
                fixed_shapes: bool = False) -> torch.Tensor:
        """(N, M) scores of every image against every caption. In training, one pass over the whole grid (the
        batch-norm statistics are the batch's); otherwise tiles of at most ``TILE_ELEMENTS`` floats, and with
        ``fixed_shapes`` every tile padded to one shape per caption length class, so that a pair's score is
        bitwise the same whatever else is in the call."""
        _check_contexts(regions, words, lengths, self.embed_size)
        lengths = lengths.to(words.device)
        words = words * word_mask(lengths, words.shape[1]).unsqueeze(-1).to(words.dtype)  # padding is zero
        n, m = regions.shape[0], words.shape[0]
        if n == 0 or m == 0:
            return regions.new_zeros((n, m))
        if self.training:
            valid = word_mask(lengths, words.shape[1])
            return self._tile(regions, self.visual_sa(regions), words, self.text_sa(words, valid), valid)
        if fixed_shapes:
            return self._fixed_grid(regions, words, lengths)
        return self._tiled_grid(regions, words, lengths)

    def _tile_budget(self, device: torch.device) -> int:
        return TILE_ELEMENTS["cpu" if device.type == "cpu" else "accel"]

    def _tiled_grid(self, regions: torch.Tensor, words: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        n, r, e = regions.shape
        m, t, _ = words.shape
        t = max(1, int(lengths.max()))
        words = words[:, :t]
        valid = word_mask(lengths, t)
        pairs = max(1, self._tile_budget(words.device) // (t * max(e, r)))
        ni = min(n, IMAGE_TILE if pairs >= IMAGE_TILE else pairs)
        mc = max(1, min(pairs // ni, MAX_TILE_CAPTIONS))
        img_glo = self.visual_sa(regions)
        cap_glo = self.text_sa(words, valid)
        out = regions.new_empty((n, m))
        for c0 in range(0, m, mc):
            c1 = min(c0 + mc, m)
            for a in range(0, n, ni):
                b = min(a + ni, n)
                out[a:b, c0:c1] = self._tile(regions[a:b], img_glo[a:b], words[c0:c1], cap_glo[c0:c1],
                                             valid[c0:c1])
        return out

    def _fixed_grid(self, regions: torch.Tensor, words: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Tiles of exactly IMAGE_TILE images x a fixed number of captions per length class (a caption of
        length L is padded to the class's length, a multiple of LENGTH_STEP): no tile shape depends on the call."""
        n, r, e = regions.shape
        m = words.shape[0]
        budget = self._tile_budget(words.device)
        ni = IMAGE_TILE
        n_pad = math.ceil(n / ni) * ni
        padded_regions = regions.new_zeros((n_pad, r, e))
        padded_regions[:n] = regions
        img_glo = torch.cat([self.visual_sa(padded_regions[a:a + ni]) for a in range(0, n_pad, ni)])
        classes = (lengths.clamp(min=1) + LENGTH_STEP - 1) // LENGTH_STEP * LENGTH_STEP
        out = regions.new_empty((n, m))
        for t in sorted(set(classes.tolist())):
            cols = torch.nonzero(classes == t).squeeze(1)
            mc = max(1, min(budget // (ni * t * max(e, r)), MAX_TILE_CAPTIONS))
            for s in range(0, len(cols), mc):
                idx = cols[s:s + mc]
                k = len(idx)
                tile_words = words.new_zeros((mc, t, e))
                have = min(t, words.shape[1])
                tile_words[:k, :have] = words[idx, :have]
                tile_lengths = lengths.new_ones(mc)
                tile_lengths[:k] = lengths[idx]
                valid = word_mask(tile_lengths, t)
                tile_words = tile_words * valid.unsqueeze(-1)
                cap_glo = self.text_sa(tile_words, valid)
                for a in range(0, n_pad, ni):
                    scores = self._tile(padded_regions[a:a + ni], img_glo[a:a + ni], tile_words, cap_glo, valid)
                    b = min(a + ni, n)
                    out[a:b, idx] = scores[: b - a, :k]
        return out


def _check_contexts(regions: torch.Tensor, words: torch.Tensor, lengths: torch.Tensor, embed_size: int) -> None:
    """Shapes a similarity network can score; a mismatch is a config problem (the wrong encoders), said so."""
    from vsekit.errors import ConfigError

    if regions is None or words is None:
        raise ConfigError("model.similarity: a similarity network scores the encoders' contexts, but an encoder "
                          "returned none; use encoders that keep their local vectors (e.g. image_encoder "
                          "sgraf_regions and text_encoder sgraf_words)")
    if regions.dim() != 3 or words.dim() != 3 or regions.shape[-1] != embed_size or words.shape[-1] != embed_size:
        raise ConfigError(f"model.similarity: expects (N, R, {embed_size}) image and (M, T, {embed_size}) caption "
                          f"contexts, got {tuple(regions.shape)} and {tuple(words.shape)}")
    if lengths.shape != (words.shape[0],):
        raise ValueError(f"lengths must have shape ({words.shape[0]},), got {tuple(lengths.shape)}")


@SIMILARITY_NETWORKS.register("sgr")
def sgr(embed_size: int, sim_dim: int = 256, sgr_step: int = 3, smooth: float = 9.0,
        dropout: float = 0.4) -> SGRAFSimilarity:
    """SGRAF's similarity graph reasoning (SGR)."""
    return SGRAFSimilarity(embed_size, "sgr", sim_dim=sim_dim, sgr_step=sgr_step, smooth=smooth, dropout=dropout)


@SIMILARITY_NETWORKS.register("saf")
def saf(embed_size: int, sim_dim: int = 256, smooth: float = 9.0, dropout: float = 0.4) -> SGRAFSimilarity:
    """SGRAF's similarity attention filtration (SAF)."""
    return SGRAFSimilarity(embed_size, "saf", sim_dim=sim_dim, smooth=smooth, dropout=dropout)
