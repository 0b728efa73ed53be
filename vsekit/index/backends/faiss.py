"""FAISS IVF and HNSW over the index folder's vectors: one ``<target>.faiss`` file per target beside the
``.npy``. The only module of vsekit that imports FAISS or knows its files."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vsekit.index.backends.numpy import LocalBackend, measure_recall
from vsekit.index.data import KINDS, TARGETS, AnnParams, IndexData, SearchIndexError, read_file

_ADD_CHUNK = 65536  # vectors per call of index.add: a memory map is never copied whole
# k-means training points per IVF list: FAISS wants 39 to 256; 64 keeps training of 1M x 1024 near a minute
# on two cores
_IVF_TRAIN_PER_LIST = 64


def faiss_module():
    """The ``faiss`` module, imported on first use so that order-similarity indexes work without it."""
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # it logs every CPU variant it tries
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - faiss-cpu is a declared dependency of search
        raise SearchIndexError("FAISS is not installed; install it with `pip install faiss-cpu`") from e
    return faiss


def default_nlist(n: int) -> int:
    """About sqrt(N) inverted lists, but at least 39 training points per list (FAISS's own minimum)."""
    return max(1, min(round(math.sqrt(n)), n // 39))


def build_faiss(vectors: np.ndarray, kind: str, params: AnnParams, seed: int = 0):
    """A FAISS inner-product index of ``kind`` over ``vectors`` (added in chunks, so a memory map is never
    copied whole). Indexes use the approximate kinds; ``exact`` (an ``IndexFlatIP``, what exact indexes
    held before they were searched with NumPy) is kept for comparisons and benchmarks."""
    faiss = faiss_module()
    n, d = vectors.shape
    if kind == "exact":
        index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        nlist = params.nlist or default_nlist(n)
        if n < nlist:
            raise SearchIndexError(f"an IVF index with {nlist} lists needs at least {nlist} vectors, got {n}; "
                                   "use --kind exact for small collections")
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        sample = min(n, nlist * _IVF_TRAIN_PER_LIST)
        rows = np.sort(np.random.default_rng(seed).choice(n, sample, replace=False)) if sample < n else slice(None)
        index.train(np.ascontiguousarray(vectors[rows], dtype=np.float32))
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params.ef_construction
    else:
        raise SearchIndexError(f"unknown index kind {kind!r}; known kinds: {', '.join(KINDS)}")
    add_vectors(index, vectors)
    set_search_params(index, params)
    return index


def add_vectors(index, vectors: np.ndarray) -> None:
    for a in range(0, len(vectors), _ADD_CHUNK):
        index.add(np.ascontiguousarray(vectors[a: a + _ADD_CHUNK], dtype=np.float32))


def set_search_params(index, params: AnnParams) -> None:
    faiss = faiss_module()
    if isinstance(index, faiss.IndexIVF):
        index.nprobe = min(params.nprobe, index.nlist)
    elif isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = params.ef_search


def emptied_like(index, kind: str, params: AnnParams, dim: int):
    """An empty index of the same kind; an IVF index keeps its trained lists so removal needs no k-means."""
    if kind != "ivf":
        return build_faiss(np.zeros((0, dim), np.float32), kind, params)
    index = faiss_module().clone_index(index)
    index.reset()
    return index


class FaissAnn(LocalBackend):
    """FAISS IVF or HNSW over the vectors of the folder (a FAISS file per target); recall@10 against exact
    search is measured on every write."""

    files = {"faiss": "FAISS"}
    inner_product_only = ("FAISS {kind} search", "Use --kind exact (exact, chunked {similarity} scoring)")

    @classmethod
    def load_files(cls, gen: Path, names: Sequence[str], manifest: dict[str, Any]) -> dict[str, Any]:
        """The FAISS indexes of ``names``, checked against the manifest's counts and dimension and set to its
        search parameters."""
        out, dim, params = {}, int(manifest["dim"]), AnnParams.of_manifest(manifest)
        for name in names:
            path, target = gen / name, name.removesuffix(".faiss")
            index = read_file(path, "FAISS index", lambda p=path: faiss_module().read_index(str(p)))
            want = int(manifest[f"num_{target}"])
            if index.ntotal != want or index.d != dim:
                raise SearchIndexError(f"{path}: corrupt index file: holds {index.ntotal} vectors of dimension "
                                       f"{index.d}, not {want} x {dim}")
            set_search_params(index, params)
            out[target] = index
        return out

    @classmethod
    def save_files(cls, folder: Path, data: IndexData) -> None:
        for target, index in data.ann.items():
            faiss_module().write_index(index, str(folder / f"{target}.faiss"))

    def _index(self, data: IndexData) -> None:
        targets = TARGETS if data.caption_vectors is not None else ("images",)
        data.ann = {t: build_faiss(data.vectors(t), self.kind, self.params) for t in targets}

    def _added(self, data: IndexData, new: IndexData) -> None:
        for target, index in data.ann.items():
            add_vectors(index, new.vectors(target))

    def _rebuilt(self, old: IndexData, data: IndexData) -> None:
        for target, index in old.ann.items():
            fresh = emptied_like(index, self.kind, self.params, index.d)
            add_vectors(fresh, data.vectors(target))
            data.ann[target] = fresh

    def attach(self, data: IndexData) -> None:
        """Bind to ``data``, with the search parameters (``nprobe``, ``ef_search``) of this backend."""
        for index in data.ann.values():
            set_search_params(index, self.params)
        self.data = data

    def search(self, target: str, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        data = self._bound()
        index = data.ann.get(target)
        if index is None:
            raise SearchIndexError(f"this {self.kind} index has no FAISS structure for {target}; rebuild it")
        return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)

    def manifest_fields(self) -> dict[str, Any]:
        data = self._bound()
        return {**super().manifest_fields(),
                "nlist": {t: int(ix.nlist) for t, ix in data.ann.items()} if self.kind == "ivf" else None,
                "recall_at_10": measure_recall(data, list(data.ann), self.search) if data.ann else None}
