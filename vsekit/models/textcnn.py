"""The deep residual text CNN of Dual-Path (Zheng et al., TOMM 2020).

No recurrence: a caption is a fixed window of ``seq_len`` (32) token slots, word embeddings feed a ResNet-style
stack of bottleneck blocks whose middle convolution has kernel 2 along the words, the sequence is averaged and
projected by FC + BN + ReLU. During training the caption sits at a random offset of the window ("shift"
augmentation, the paper's text augmentation), so the network cannot tie a word to an absolute position.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vsekit.models.base import Encoder
from vsekit.models.text import TEXT_ENCODERS, word_embedding

# the paper's stages: widths, blocks per stage, stride of each stage's first block (length 32 -> 32 -> 16 -> 8 -> 8)
PAPER_WIDTHS = (256, 512, 1024, 2048)
PAPER_BLOCKS = (3, 4, 6, 1)
PAPER_STRIDES = (1, 2, 2, 1)


class TextBottleneck(nn.Module):
    """1x1 conv -> kernel-2 conv (left pad 1, ``stride``) -> 1x1 conv, BN after each, plus a shortcut.

    The shortcut is a strided 1x1 conv + BN when the width or the length changes (the projection shortcut of
    ResNet), the identity otherwise. With left padding of one slot, a stride-2 block maps length L to
    ``(L - 1) // 2 + 1``: 32 -> 16 -> 8.
    """

    def __init__(self, c_in: int, c_mid: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(c_in, c_mid, 1, bias=False)
        self.bn1 = nn.BatchNorm1d(c_mid)
        self.conv2 = nn.Conv1d(c_mid, c_mid, 2, stride=stride, bias=False)
        self.bn2 = nn.BatchNorm1d(c_mid)
        self.conv3 = nn.Conv1d(c_mid, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm1d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if c_in != c_out or stride != 1:
            self.shortcut = nn.Sequential(nn.Conv1d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm1d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(F.pad(h, (1, 0)))))
        h = self.bn3(self.conv3(h))
        return torch.relu(h + self.shortcut(x))


def _mid_width(stage: int, block: int, width: int) -> int:
    # the reference's bottleneck widths: first block of stage 1 halves (300 -> 128 -> 256), the first block of
    # the later stages keeps the full width (256 -> 512 -> 512 -> 512), every other block quarters it
    if block == 0:
        return max(1, width // 2) if stage == 0 else width
    return max(1, width // 4)


@TEXT_ENCODERS.register("textcnn")
class TextCNNEncoder(Encoder):
    """Dual-Path text path: Embedding -> BN -> residual kernel-2 CNN -> average pool -> FC + BN + ReLU -> L2-norm.

    Input is ``forward(tokens, lengths)`` like the GRU encoder: the first ``lengths[i]`` ids of row i are the
    caption (``<start>``/``<end>`` included, as the vocabulary encodes them). They are copied into a
    ``seq_len``-slot window, left-aligned in eval mode and at a uniformly random offset in training mode
    (``shift=True``; drawn from the global torch RNG, so runs are reproducible under a seed); the other slots
    hold the padding id, whose embedding is zero. Captions longer than the window are cut to ``seq_len``.

    Args:
        embed_size: output size (the paper: 2048, equal to the last stage width).
        word_dim: word-embedding size (300 for word2vec).
        seq_len: the window (32).
        widths, blocks, strides: the stages (paper: 256/512/1024/2048, 3/4/6/1, 1/2/2/1).
        width_mult: scales every stage width (e.g. 0.125 for a CPU-sized model); ``embed_size`` is not scaled.
        word_vectors: a GloVe/word2vec text file or a matrix folder (:func:`vsekit.models.text.load_word_vectors`)
            initialising the embedding rows of the vocabulary (``itos``);
            skipped when ``itos`` is None (a model rebuilt for a checkpoint, whose weights come from the file).
        shift: random-offset augmentation in training mode.
    """

    def __init__(self, vocab_size: int, embed_size: int = 2048, word_dim: int = 300, seq_len: int = 32,
                 widths: Sequence[int] = PAPER_WIDTHS, blocks: Sequence[int] = PAPER_BLOCKS,
                 strides: Sequence[int] = PAPER_STRIDES, width_mult: float = 1.0, shift: bool = True,
                 word_vectors: str | None = None, itos: list[str] | None = None, no_txtnorm: bool = False,
                 use_abs: bool = False) -> None:
        super().__init__()
        if not (len(widths) == len(blocks) == len(strides)) or not widths:
            raise ValueError("text_encoder widths, blocks and strides must be non-empty and of equal length")
        if seq_len < 1:
            raise ValueError(f"text_encoder.seq_len must be >= 1, got {seq_len}")
        self.seq_len, self.shift = int(seq_len), bool(shift)
        self.embed, self.words_from_file = word_embedding(vocab_size, word_dim, word_vectors, itos)
        with torch.no_grad():
            self.embed.weight[0].zero_()  # the empty window slots add nothing
        self.embed_bn = nn.BatchNorm1d(word_dim)
        layers, c_in = [], word_dim
        for s, (w, n, stride) in enumerate(zip(widths, blocks, strides)):
            c_out = max(1, round(int(w) * float(width_mult)))
            for b in range(int(n)):
                layers.append(TextBottleneck(c_in, _mid_width(s, b, c_out), c_out, int(stride) if b == 0 else 1))
                c_in = c_out
        self.blocks = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, embed_size, bias=False)
        self.fc_bn = nn.BatchNorm1d(embed_size)
        self.normalize, self.use_abs = not no_txtnorm, use_abs
        for m in self.modules():
            if isinstance(m, nn.Conv1d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def window(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, seq_len) ids: each caption copied into the window, at a random offset when training with shift."""
        b, dev = tokens.shape[0], tokens.device
        lengths = lengths.to(dev).clamp(max=self.seq_len)
        t = min(tokens.shape[1], self.seq_len)
        if self.training and self.shift:
            room = (self.seq_len - lengths + 1).to(torch.float32)  # offsets 0 .. seq_len - length
            offsets = (torch.rand(b).to(dev) * room).long().clamp(max=self.seq_len - 1)
        else:
            offsets = torch.zeros(b, dtype=torch.long, device=dev)
        pos = torch.arange(t, device=dev)
        valid = pos.unsqueeze(0) < lengths.unsqueeze(1)  # (B, t)
        out = torch.zeros(b, self.seq_len, dtype=tokens.dtype, device=dev)
        target = (offsets.unsqueeze(1) + pos.unsqueeze(0)).clamp(max=self.seq_len - 1)
        rows = torch.arange(b, device=dev).unsqueeze(1).expand(b, t)
        out[rows[valid], target[valid]] = tokens[:, :t][valid]
        return out

    def sequence_features(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, C, L) output of the residual stack (L = 8 for the paper's strides); exposed for tests."""
        x = self.embed(self.window(tokens, lengths)).transpose(1, 2)  # (B, word_dim, seq_len)
        return self.blocks(self.embed_bn(x))

    def forward_features(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """f_txt: the FC + BN + ReLU feature before the L2 normalisation (what the instance loss classifies)."""
        pooled = self.sequence_features(tokens, lengths).mean(2)
        return torch.relu(self.fc_bn(self.fc(pooled)))
