"""Where an index's vectors live and how they are searched: one module per backend, one row per (backend,
kind) in :data:`BACKENDS` (docs/search.md, "The backends", compares them).

Why an interface (:class:`~.base.Backend`): building, adding, removing (``build.py``) and querying
(``search.py``) call the same few methods whatever holds the vectors; another vector store is one module and
a row in :data:`BACKENDS`.

The life of a write: ``build.py`` reads the current generation (records, and the vectors when they are
local), asks the backend for the next generation's :class:`IndexData` (:meth:`Backend.build`,
:meth:`~Backend.add`, :meth:`~Backend.remove`; the backend updates its own structures on the way), writes that
generation and commits the manifest, then calls :meth:`~Backend.committed`. A backend that keeps its vectors
elsewhere orders its own writes so that the database always holds at least the committed records' points
(added before the commit, removed after it; docs/search.md, "Consistency between the folder and the
database").
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vsekit.index.backends.base import Backend
from vsekit.index.backends.faiss import FaissAnn
from vsekit.index.backends.numpy import LocalConfig, NumpyExact
from vsekit.index.backends.qdrant import QdrantBackend, QdrantConfig, point_id
from vsekit.index.data import AnnParams, IndexData, SearchIndexError

BackendConfig = LocalConfig | QdrantConfig

BACKENDS: dict[tuple[str, str], type[Backend]] = {
    ("local", "exact"): NumpyExact,
    ("local", "ivf"): FaissAnn,
    ("local", "hnsw"): FaissAnn,
    ("qdrant", "exact"): QdrantBackend,
    ("qdrant", "hnsw"): QdrantBackend,
}


def kinds_of(backend: str) -> list[str]:
    """The kinds of index ``backend`` serves (none for a name it does not know)."""
    return [k for b, k in BACKENDS if b == backend]


def backend_class(backend: str, kind: str) -> type[Backend]:
    if (cls := BACKENDS.get((backend, kind))) is not None:
        return cls
    if not (kinds := kinds_of(backend)):
        raise SearchIndexError(f"unknown backend {backend!r}; known: {', '.join(sorted({b for b, _ in BACKENDS}))}")
    raise SearchIndexError(f"the {backend} backend has no {kind!r} index; its kinds: {', '.join(kinds)}")


def manifest_backend(manifest: dict[str, Any]) -> type[Backend]:
    """The backend class a (validated) manifest names."""
    return backend_class(manifest.get("backend", "local"), manifest["kind"])


def backend_files() -> dict[str, str]:
    """Extension -> what it holds, of every backend's own files in a generation folder."""
    return {ext: what for cls in BACKENDS.values() for ext, what in cls.files.items()}


def create_backend(config: BackendConfig, *, index_dir: str | Path, kind: str, params: AnnParams,
                   similarity: str, targets: Sequence[str], overwrite: bool = False) -> Backend:
    """The backend a new index is built with; refuses, before anything is encoded, a similarity or kind it
    cannot serve and (Qdrant) collections that exist already."""
    cls = backend_class(config.name, kind)
    cls.check_model(similarity, kind)
    return cls.create(config, index_dir=index_dir, kind=kind, params=params, targets=targets,
                      overwrite=overwrite)


def open_backend(manifest: dict[str, Any], data: IndexData, params: AnnParams | None = None) -> Backend:
    """The backend of an opened index, bound to its ``data``; ``params`` overrides the manifest's search
    parameters (``nprobe``, ``ef_search``)."""
    backend = manifest_backend(manifest).from_manifest(manifest, params or AnnParams.of_manifest(manifest))
    try:
        backend.attach(data)
    except BaseException:
        backend.close()
        raise
    return backend


__all__ = ["BACKENDS", "Backend", "BackendConfig", "FaissAnn", "LocalConfig", "NumpyExact", "QdrantBackend",
           "QdrantConfig", "backend_class", "backend_files", "create_backend", "kinds_of", "manifest_backend",
           "open_backend", "point_id"]
