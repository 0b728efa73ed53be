"""Vectors in the index folder, searched exactly: the generation's memory-mapped ``.npy``, chunked matmul
and a partial sort. Also the exact top-``k`` that similarity-network and order searches rank with, and the
recall of an approximate search against it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from vsekit.index.backends.base import Backend
from vsekit.index.data import IndexData

_CHUNK = 65536  # default rows per block of exact_top_k
RECALL_K = 10
RECALL_QUERIES = 500
# Exact search scores the collection in blocks of at most this many (query, row) pairs (16 MiB of float32),
# whatever the number of queries
_EXACT_BLOCK_SCORES = 1 << 22


@dataclass(frozen=True)
class LocalConfig:
    """Vectors in the index folder: NumPy exact search, or the approximate structures of ``ivf`` and ``hnsw``
    beside them."""

    name: ClassVar[str] = "local"


# -- exact top-k -------------------------------------------------------------------------------------------
def exact_top_k(score_block: Callable[[int, int], np.ndarray], n: int, k: int,
                chunk: int = _CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` (scores, rows), best first, ties by row, from ``score_block(a, b) -> (Q, b - a)``; the
    collection is scored ``chunk`` rows at a time, so memory is O(Q * (k + chunk)) whatever N is."""
    k = min(k, n)
    best_s = best_r = None
    for a in range(0, n, chunk):
        s = np.asarray(score_block(a, min(a + chunk, n)), dtype=np.float32)
        r = np.broadcast_to(np.arange(a, a + s.shape[1]), s.shape)
        # the block's own top k first, so that the merge with the best so far is (Q, 2k), not (Q, k + chunk);
        # exact under the tie rule because every row of the block is above every row kept so far
        s, r = _keep_best(s, r, k)
        if best_s is not None:
            s, r = _keep_best(np.concatenate([best_s, s], 1), np.concatenate([best_r, r], 1), k)
        best_s, best_r = s, r
    if best_s is None:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.int64)
    order = np.lexsort((best_r, -best_s), axis=-1)
    return np.take_along_axis(best_s, order, 1), np.take_along_axis(best_r, order, 1).astype(np.int64)


def _keep_best(s: np.ndarray, r: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best columns of each row, ties at the cut going to the lowest rows; ``r`` ascends along
    each row and so does the result (``argpartition`` alone would cut ties arbitrarily)."""
    if s.shape[1] <= k:
        return s, r
    c = s.shape[1]
    kth = np.partition(s, c - k, axis=1)[:, c - k: c - k + 1]  # the k-th largest score of each row
    above, tied = s > kth, s == kth
    keep = above | tied
    if (keep.sum(1) != k).any():  # more ties at the cut than places left: the lowest rows get them
        need = k - above.sum(1, keepdims=True)
        keep = above | (tied & (np.cumsum(tied, axis=1) <= need))
    return s[keep].reshape(len(s), k), r[keep].reshape(len(s), k)


def inner_product_top_k(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-``k`` of ``queries`` over ``vectors`` (a memory map is read in place, block by
    block: no copy of the collection is made), ties by row."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    chunk = max(1024, min(1 << 18, _EXACT_BLOCK_SCORES // max(1, len(queries))))
    return exact_top_k(lambda a, b: queries @ np.asarray(vectors[a:b]).T, len(vectors), k, chunk=chunk)


# -- recall of an approximate search --------------------------------------------------------------------
def recall_at_k(search: Callable[[np.ndarray, int], Any], vectors: np.ndarray, queries: np.ndarray,
                k: int = RECALL_K) -> float:
    """Mean fraction of the exact top-``k`` (inner product) of ``queries`` over ``vectors`` that
    ``search(queries, k) -> (scores, rows)`` also returns in its top ``k``."""
    n = len(vectors)
    if n == 0 or len(queries) == 0:
        return 1.0
    k = min(k, n)
    _, exact = inner_product_top_k(vectors, queries, k)
    _, approx = search(np.ascontiguousarray(queries, dtype=np.float32), k)
    hits = [len(set(e.tolist()) & set(a.tolist())) for e, a in zip(exact, approx)]
    return float(np.sum(hits) / (k * len(queries)))


def measure_recall(data: IndexData, targets: list[str],
                   search: Callable[[str, np.ndarray, int], Any]) -> dict[str, float]:
    """recall@10 of ``search(target, queries, k)`` on each of ``targets`` against exact search, on a sample of
    realistic queries: captions query the images (text -> image), images query the captions (image -> text)."""
    out = {}
    for target in targets:
        qv = data.caption_vectors if target == "images" else data.image_vectors
        if qv is None or len(qv) == 0:  # no captions: images query themselves
            qv = data.vectors(target)
        sample = np.sort(np.random.default_rng(0).choice(len(qv), min(len(qv), RECALL_QUERIES), replace=False))
        queries = np.asarray(qv[sample], dtype=np.float32)
        out[target] = round(recall_at_k(lambda q, k, t=target: search(t, q, k), data.vectors(target), queries), 4)
    return out


# -- the backends of the folder's vectors --------------------------------------------------------------------
class LocalBackend(Backend):
    """Vectors in the generation's ``.npy`` files (written with the records); a subclass keeps its search
    structures in ``data.ann`` up to date through :meth:`_index`, :meth:`_added` and :meth:`_rebuilt`."""

    name = "local"

    def build(self, data: IndexData) -> IndexData:
        data.ann = {}
        self._index(data)
        self.data = data
        return data

    def add(self, old: IndexData, new: IndexData) -> IndexData:
        data = old.appended(new)
        data.ann = old.ann
        self._added(data, new)
        self.data = data
        return data

    def remove(self, old: IndexData, keep: dict[str, np.ndarray]) -> IndexData:
        data = old.subset(keep)
        self._rebuilt(old, data)
        self.data = data
        return data

    def _index(self, data: IndexData) -> None:
        """Build the search structures of a fresh ``data``."""

    def _added(self, data: IndexData, new: IndexData) -> None:
        """Bring the structures of ``data`` (the old ones) up to date with the items of ``new``."""

    def _rebuilt(self, old: IndexData, data: IndexData) -> None:
        """Structures for ``data``, a subset of ``old``."""


class NumpyExact(LocalBackend):
    """Exact search on the memory-mapped vectors, block by block (:func:`inner_product_top_k`): no second
    copy of the collection, as a flat index of an ANN library is (why: docs/search.md, "The backends")."""

    def search(self, target: str, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return inner_product_top_k(self._bound().vectors(target), queries, k)
