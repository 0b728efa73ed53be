"""Text encoders: word embeddings + GRU (VSE++), last valid state, L2-normalised."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from vsekit.data.corpus import DataError
from vsekit.models.base import Encoder
from vsekit.models.layers import l2norm
from vsekit.registry import Registry

TEXT_ENCODERS = Registry("text encoder", injected=("vocab_size", "embed_size", "itos", "txt_dim"))


def load_word_vectors(path: str | Path, itos: list[str], dim: int) -> tuple[torch.Tensor, int]:
    """Rows of a word-vector text file (GloVe / word2vec text: ``word v1 ... vd`` per line) for the vocabulary.

    Returns (|V|, dim) initial weights (words absent from the file keep U(-0.1, 0.1)) and the number found.
    A header line ``count dim`` (word2vec) is skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"word vectors: no such file {path}")
    index = {w: i for i, w in enumerate(itos)}
    weight = torch.empty(len(itos), dim).uniform_(-0.1, 0.1)
    found = 0
    with path.open(encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.rstrip().split(" ")
            if lineno == 1 and len(parts) == 2 and all(p.isdigit() for p in parts):
                continue
            if len(parts) < 2:
                continue
            row = index.get(parts[0])
            if row is None:
                continue
            if len(parts) - 1 != dim:
                raise DataError(f"{path}:{lineno}: vector of {len(parts) - 1} values, expected word_dim={dim}")
            try:
                weight[row] = torch.tensor([float(v) for v in parts[1:]])
            except ValueError:
                raise DataError(f"{path}:{lineno}: not a number in the vector of {parts[0]!r}") from None
            found += 1
    return weight, found


def word_embedding(vocab_size: int, word_dim: int, word_vectors: str | None = None,
                   itos: list[str] | None = None) -> tuple[nn.Embedding, int]:
    """Word embeddings, U(-0.1, 0.1) (VSE++), padding id 0, with the rows of ``word_vectors`` (a GloVe-style
    text file) for the words of ``itos``; returns the layer and how many words the file had. Without
    ``itos`` (a model rebuilt for a checkpoint, whose weights replace these) the file is not read."""
    embed = nn.Embedding(vocab_size, word_dim, padding_idx=0)
    nn.init.uniform_(embed.weight, -0.1, 0.1)
    found = 0
    if word_vectors and itos is not None:
        weight, found = load_word_vectors(word_vectors, itos, word_dim)
        with torch.no_grad():
            embed.weight.copy_(weight)
    return embed, found


@TEXT_ENCODERS.register("gru")
class GRUTextEncoder(Encoder):
    """Embedding(V, word_dim) -> GRU -> hidden state at the last valid token -> L2-norm (optionally abs()).

    ``pooling="last"`` (VSE++): uni-directional, the final state of the last layer; bi-directional, the mean
    of the two directions' final states. ``pooling="mean"`` (VSE-infinity's text side): the last layer's
    outputs averaged over the valid tokens (bi-directional: the two directions' outputs averaged first).
    Sequences are packed, so padding never reaches the GRU.
    """

    def __init__(self, vocab_size: int, embed_size: int = 1024, word_dim: int = 300, num_layers: int = 1,
                 bidirectional: bool = False, word_vectors: str | None = None, itos: list[str] | None = None,
                 no_txtnorm: bool = False, use_abs: bool = False, pooling: str = "last") -> None:
        super().__init__()
        if pooling not in ("last", "mean"):
            raise ValueError(f"text_encoder.pooling must be 'last' or 'mean', got {pooling!r}")
        self.pooling = pooling
        self.embed, self.words_from_file = word_embedding(vocab_size, word_dim, word_vectors, itos)
        self.rnn = nn.GRU(word_dim, embed_size, num_layers, batch_first=True, bidirectional=bidirectional)
        self.bidirectional = bidirectional
        self.no_txtnorm, self.use_abs = no_txtnorm, use_abs

    def _run(self, tokens: torch.Tensor, lengths: torch.Tensor) -> tuple[nn.utils.rnn.PackedSequence, torch.Tensor]:
        x = self.embed(tokens)
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        return self.rnn(packed)  # h: (layers * dirs, B, H), final state at each sequence's last valid step

    def word_states(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, T, H) last-layer output at every word (bi-directional: the two directions averaged), zeros
        past each caption's end; T is the longest length in the batch."""
        out, _ = nn.utils.rnn.pad_packed_sequence(self._run(tokens, lengths)[0], batch_first=True)
        if self.bidirectional:
            half = out.shape[2] // 2
            out = (out[:, :, :half] + out[:, :, half:]) / 2
        return out

    def forward_features(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The caption feature before the L2 normalisation (what an instance classifier sees)."""
        if self.pooling == "last":
            h = self._run(tokens, lengths)[1]
            return (h[-2] + h[-1]) / 2 if self.bidirectional else h[-1]
        out = self.word_states(tokens, lengths)
        return out.sum(1) / lengths.to(out.device, out.dtype).clamp(min=1).unsqueeze(1)

    def finish(self, out: torch.Tensor) -> torch.Tensor:
        if not self.no_txtnorm:
            out = l2norm(out)
        if self.use_abs:
            out = out.abs()
        return out
