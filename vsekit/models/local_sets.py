"""Sets of local vectors (the regions of images, the words of captions) stored packed, for scoring later.

A similarity network scores pairs from the encoders' contexts, so evaluation and search keep those contexts,
not just one vector per item. Captions have different lengths: padding them to the longest would store
mostly zeros, so the sets are packed -- all vectors in one (total, E) array, item i's vectors at rows
``offsets[i]:offsets[i + 1]`` -- and padded only when a block of items is gathered for scoring. The array
may be a read-only memory map (a large collection never has to fit in RAM), in float32 or float16.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

DTYPES = {"float32": np.float32, "float16": np.float16}


class LocalSets:
    """``n`` variable-size sets of E-dimensional vectors, packed: ``vectors`` (total, E), ``offsets`` (n + 1,)."""

    def __init__(self, vectors: np.ndarray, offsets: np.ndarray) -> None:
        offsets = np.asarray(offsets, dtype=np.int64)
        if vectors.ndim != 2:
            raise ValueError(f"local vectors must be a (total, E) array, got shape {vectors.shape}")
        if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != vectors.shape[0]:
            raise ValueError(f"offsets must run from 0 to {vectors.shape[0]} (the number of vectors)")
        if np.any(np.diff(offsets) < 0):
            raise ValueError("offsets must not decrease")
        if vectors.dtype not in (np.float32, np.float16):
            raise ValueError(f"local vectors must be float32 or float16, got {vectors.dtype}")
        self.vectors, self.offsets = vectors, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __repr__(self) -> str:
        return f"LocalSets(n={len(self)}, dim={self.dim}, vectors={self.vectors.shape[0]}, dtype={self.vectors.dtype})"

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def padded(self, rows: Sequence[int] | np.ndarray | None = None, *, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, L, E) tensor of the sets at ``rows`` (all when None), zero-padded to ``L`` = ``length`` or the
        longest of them, and their (k,) lengths (int64, on ``device``). Reads only those rows of a memory map."""
        rows = np.arange(len(self)) if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1)
        sizes = self.lengths[rows]
        top = int(sizes.max()) if len(sizes) else 0
        width = top if length is None else int(length)
        if width < top:
            raise ValueError(f"length {width} is shorter than the longest set ({top})")
        out = torch.zeros((len(rows), width, self.dim), dtype=dtype)
        total = int(sizes.sum())
        if total:
            within = np.arange(total) - np.repeat(np.cumsum(sizes) - sizes, sizes)
            flat = np.repeat(self.offsets[rows], sizes) + within
            item = np.repeat(np.arange(len(rows)), sizes)
            vecs = torch.from_numpy(np.asarray(self.vectors[flat], dtype=np.float32))
            out[torch.from_numpy(item), torch.from_numpy(within)] = vecs.to(dtype)
        return out.to(device), torch.from_numpy(sizes.astype(np.int64)).to(device)

    def subset(self, rows: Sequence[int] | np.ndarray) -> LocalSets:
        """The sets at ``rows``, in that order, as a new in-memory :class:`LocalSets`."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        sizes = self.lengths[rows]
        within = np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        flat = np.repeat(self.offsets[rows], sizes) + within
        return LocalSets(np.asarray(self.vectors[flat]), np.concatenate([[0], np.cumsum(sizes)]))

    @staticmethod
    def concat(parts: Sequence[LocalSets]) -> LocalSets:
        """One :class:`LocalSets` holding the sets of ``parts`` one after the other (in memory)."""
        if not parts:
            raise ValueError("nothing to concatenate")
        dims = {p.dim for p in parts}
        if len(dims) != 1:
            raise ValueError(f"local vectors of different sizes: {sorted(dims)}")
        dtype = np.result_type(*[p.vectors.dtype for p in parts])
        vectors = np.concatenate([np.asarray(p.vectors, dtype=dtype) for p in parts])
        lengths = np.concatenate([p.lengths for p in parts])
        return LocalSets(vectors, np.concatenate([[0], np.cumsum(lengths)]))

    def astype(self, dtype: str) -> LocalSets:
        want = DTYPES[dtype]
        return self if self.vectors.dtype == want else LocalSets(np.asarray(self.vectors, dtype=want), self.offsets)

    # -- files ------------------------------------------------------------------------------------------------
    @staticmethod
    def file_names(prefix: str) -> tuple[str, str]:
        """The two files of a saved set collection: ``{prefix}.sets.npy`` (vectors), ``{prefix}.offsets.npy``."""
        return f"{prefix}.sets.npy", f"{prefix}.offsets.npy"

    def save(self, folder: str | Path, prefix: str) -> None:
        vec_name, off_name = self.file_names(prefix)
        folder = Path(folder)
        for name, array in ((vec_name, self.vectors), (off_name, self.offsets)):
            with open(folder / name, "wb") as f:
                np.save(f, np.ascontiguousarray(array))

    @classmethod
    def load(cls, folder: str | Path, prefix: str, mmap: bool = True) -> LocalSets:
        vec_name, off_name = cls.file_names(prefix)
        folder = Path(folder)
        vectors = np.load(folder / vec_name, mmap_mode="r" if mmap else None, allow_pickle=False)
        offsets = np.load(folder / off_name, allow_pickle=False)
        return cls(vectors, offsets)


class LocalSetsWriter:
    """Collects the sets of consecutive batches (``append(padded (B, L, E), lengths (B,))``) into a
    :class:`LocalSets`: in memory, or, given ``spill_dir``, written as they come to a file there that is then
    memory-mapped (so encoding a large corpus never holds its local vectors in RAM)."""

    def __init__(self, dtype: str = "float32", spill_dir: str | Path | None = None) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"local vectors are stored as {' or '.join(DTYPES)}, not {dtype!r}")
        self.dtype = DTYPES[dtype]
        self.lengths: list[np.ndarray] = []
        self.chunks: list[np.ndarray] = []
        self.dim: int | None = None
        self.file = None
        if spill_dir is not None:
            fd, self.path = tempfile.mkstemp(prefix="local-sets-", suffix=".bin", dir=spill_dir)
            self.file = os.fdopen(fd, "wb")

    def append(self, padded: torch.Tensor, lengths: torch.Tensor) -> None:
        lengths = lengths.detach().cpu().numpy().astype(np.int64)
        x = padded.detach().float().cpu().numpy()
        if self.dim is None:
            self.dim = int(x.shape[-1])
        valid = np.arange(x.shape[1])[None, :] < lengths[:, None]
        rows = np.ascontiguousarray(x[valid], dtype=self.dtype)  # (sum of lengths, E), item by item in order
        self.lengths.append(lengths)
        if self.file is not None:
            self.file.write(rows.tobytes())
        else:
            self.chunks.append(rows)

    def finish(self, dim: int | None = None) -> LocalSets:
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        d = self.dim if self.dim is not None else int(dim or 0)
        if self.file is not None:
            self.file.close()
            total = int(offsets[-1])
            vectors = (np.memmap(self.path, dtype=self.dtype, mode="r", shape=(total, d)) if total
                       else np.zeros((0, d), self.dtype))
        else:
            vectors = np.concatenate(self.chunks) if self.chunks else np.zeros((0, d), self.dtype)
        return LocalSets(vectors, offsets)
