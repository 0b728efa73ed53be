"""Where an index's vectors live and how they are searched: one small class per backend.

===========  ===========  ==================================================================================
backend      kind         class
===========  ===========  ==================================================================================
``local``    exact        :class:`NumpyExact`: the generation's memory-mapped ``.npy``, chunked matmul and a
                          partial sort; one copy of the vectors, ties by row
``local``    ivf, hnsw    :class:`FaissAnn`: a FAISS structure per target beside the ``.npy``
``qdrant``   exact, hnsw  :class:`QdrantBackend`: one Qdrant collection per target, on a server (a cluster,
                          ``url``) or in a local-mode folder (``path``); the index folder keeps the records
===========  ===========  ==================================================================================

Why an interface: building, adding, removing (``build.py``) and querying (``search.py``) call the same few
methods whatever holds the vectors; another vector store is one class here and a row in :data:`BACKENDS`.

The life of a write: ``build.py`` reads the current generation (records, and the vectors when they are
local), asks the backend for the next generation's :class:`IndexData` (:meth:`Backend.build`,
:meth:`~Backend.add`, :meth:`~Backend.remove`; the backend updates its own structures on the way), writes that
generation and commits the manifest, then calls :meth:`~Backend.committed`. A backend that keeps its vectors
elsewhere orders its own writes so that the database always holds at least the committed records' points:
added points go in before the commit, removed ones go out after it. Points the records do not know (left by a
write that died before its commit, or added by another process since this one opened the index) are never
returned; the next add or remove deletes them.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from vsekit.errors import one_line
from vsekit.index.store import (
    ANN_KINDS,
    COLLECTION_NAME,
    TARGETS,
    AnnParams,
    IndexData,
    SearchIndexError,
    add_vectors,
    build_faiss,
    emptied_like,
    inner_product_top_k,
    manifest_params,
    measure_recall,
    params_dict,
    set_search_params,
)

log = logging.getLogger(__name__)


# -- what a user asks for ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class LocalConfig:
    """Vectors in the index folder: NumPy exact search, or FAISS for the approximate kinds."""

    name: ClassVar[str] = "local"


@dataclass(frozen=True)
class QdrantConfig:
    """Vectors in Qdrant: a server or cluster at ``url`` (its API key, if any, is read from the environment
    variable ``QDRANT_API_KEY`` and never written down), or the Python client's local mode in the folder
    ``path``. The collections are ``<collection>-images`` and ``<collection>-captions``; ``collection=None``
    names them after the index folder. ``shards`` and ``replicas`` are the collections' shard number and
    replication factor on a cluster (the server's defaults when ``None``; local mode ignores them)."""

    url: str | None = None
    path: str | None = None
    collection: str | None = None
    shards: int | None = None
    replicas: int | None = None
    name: ClassVar[str] = "qdrant"

    def __post_init__(self) -> None:
        if (self.url is None) == (self.path is None):
            raise SearchIndexError("a qdrant index needs exactly one of --url (a Qdrant server) and "
                                   "--qdrant-path (a local-mode folder)")
        if self.url is not None and not re.match(r"^https?://[^\s/]+", self.url or ""):
            raise SearchIndexError(f"--url {self.url[:100]!r}: not an http(s) URL, e.g. http://localhost:6333")
        if self.url is not None and len(self.url) > 2048:
            raise SearchIndexError("--url: longer than 2048 characters")
        if self.collection is not None and not COLLECTION_NAME.match(self.collection):
            raise SearchIndexError(f"--collection {self.collection[:100]!r}: use letters, digits, '_', '-' and "
                                   "'.', at most 200, not starting with '-' or '.'")
        for field, v in (("shards", self.shards), ("replicas", self.replicas)):
            if v is not None and not 1 <= v <= 1024:
                raise SearchIndexError(f"--qdrant-{field} must be 1..1024, got {v}")


BackendConfig = LocalConfig | QdrantConfig


# -- the interface -------------------------------------------------------------------------------------------
class Backend(ABC):
    """The vectors of one index: kept in step with its records by the writes, searched by :meth:`search`.

    After :meth:`build`, :meth:`add` or :meth:`remove` the backend is bound to the data it returned; after
    :func:`open_backend`, to the data it was opened with."""

    name: ClassVar[str]

    def __init__(self, kind: str, params: AnnParams) -> None:
        self.kind, self.params = kind, params
        self.data: IndexData | None = None

    @classmethod
    def check_model(cls, similarity: str, kind: str) -> None:
        """Refuse a model whose similarity this backend cannot rank by (before anything is encoded)."""
        return None

    @classmethod
    def create(cls, config: BackendConfig, *, index_dir: str | Path, kind: str, params: AnnParams,
               targets: Sequence[str], overwrite: bool) -> Backend:
        """The backend a new index at ``index_dir`` is built with (not bound to data yet)."""
        return cls(kind, params)

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any], params: AnnParams) -> Backend:
        """The backend an existing index's manifest describes (not bound to data yet)."""
        return cls(manifest["kind"], params)

    def attach(self, data: IndexData) -> None:
        """Bind to the data of an opened index."""
        self.data = data

    @abstractmethod
    def build(self, data: IndexData) -> IndexData:
        """A fresh index of ``data`` (vectors and records); returns the generation to write."""

    @abstractmethod
    def add(self, old: IndexData, new: IndexData) -> IndexData:
        """``old`` plus the items of ``new`` (their vectors and records, appended in this order)."""

    @abstractmethod
    def remove(self, old: IndexData, keep: dict[str, np.ndarray]) -> IndexData:
        """``old`` without the rows whose ``keep[target]`` is False."""

    @abstractmethod
    def search(self, target: str, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows) of the top ``k`` of each query by inner product, best first; rows index
        ``data.records(target)``; a row of -1 pads a list shorter than ``k``."""

    def manifest_fields(self) -> dict[str, Any]:
        """What the manifest records about the backend of the data it is bound to."""
        return {"backend": self.name, "kind": self.kind, "params": params_dict(self.params),
                "nlist": None, "recall_at_10": None}

    def committed(self) -> None:
        """Called once the manifest naming the last write's generation is committed."""
        return None

    def discard(self) -> None:
        """Undo what :meth:`build` did outside the index folder, when its generation was never committed."""
        return None

    def close(self) -> None:
        """Release connections or locks."""
        return None

    def _bound(self) -> IndexData:
        if self.data is None:
            raise SearchIndexError("the backend is not bound to an index's data yet")
        return self.data


# -- local: NumPy exact and FAISS approximate ----------------------------------------------------------------
def _concat(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
    if a is None or b is None:
        return a if b is None else b
    return np.concatenate([a, b])


class _LocalBackend(Backend):
    """Vectors in the generation's ``.npy`` files (written by the index store)."""

    name = "local"

    def build(self, data: IndexData) -> IndexData:
        data.faiss = {}
        self._index(data)
        self.data = data
        return data

    def add(self, old: IndexData, new: IndexData) -> IndexData:
        data = IndexData(_concat(old.image_vectors, new.image_vectors), old.images + new.images)
        if old.has_captions:
            data.caption_vectors = _concat(old.caption_vectors, new.caption_vectors)
            data.captions = (old.captions or []) + (new.captions or [])
        data.faiss = old.faiss
        self._added(data, new)
        self.data = data
        return data

    def remove(self, old: IndexData, keep: dict[str, np.ndarray]) -> IndexData:
        data = IndexData(np.asarray(old.vectors("images")[keep["images"]]),
                         [r for r, k in zip(old.images, keep["images"]) if k])
        if old.has_captions:
            ckeep = keep["captions"]
            data.caption_vectors = np.asarray(old.caption_vectors[ckeep]) if len(ckeep) else old.caption_vectors
            data.captions = [c for c, k in zip(old.captions or [], ckeep) if k]
        self._rebuilt(old, data)
        self.data = data
        return data

    def _targets(self, data: IndexData) -> tuple[str, ...]:
        return TARGETS if data.caption_vectors is not None else ("images",)

    def _index(self, data: IndexData) -> None:
        """Build the search structures of a fresh ``data``."""

    def _added(self, data: IndexData, new: IndexData) -> None:
        """Bring the structures of ``data`` (the old ones) up to date with the items of ``new``."""

    def _rebuilt(self, old: IndexData, data: IndexData) -> None:
        """Structures for ``data``, a subset of ``old``."""


class NumpyExact(_LocalBackend):
    """Exact search on the memory-mapped vectors: scored block by block (``queries @ block.T``), partial sort
    per block. No second copy of the collection (a FAISS ``IndexFlatIP`` is one, in RAM), and on the
    2-core machine of ``benchmarks/search_backends.py`` faster than one; ties go to the lowest row."""

    def search(self, target: str, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return inner_product_top_k(self._bound().vectors(target), queries, k)


class FaissAnn(_LocalBackend):
    """FAISS IVF or HNSW over the vectors of the folder (a FAISS file per target); recall@10 against exact
    search is measured on every write."""

    @classmethod
    def check_model(cls, similarity: str, kind: str) -> None:
        if similarity != "cosine":
            raise SearchIndexError(
                f"this model scores with {similarity!r} similarity, which is not an inner product: FAISS {kind} "
                f"search would rank by the wrong score. Use --kind exact (exact, chunked {similarity} scoring)")

    def _index(self, data: IndexData) -> None:
        data.faiss = {t: build_faiss(data.vectors(t), self.kind, self.params) for t in self._targets(data)}

    def _added(self, data: IndexData, new: IndexData) -> None:
        for target, index in data.faiss.items():
            add_vectors(index, new.vectors(target))

    def _rebuilt(self, old: IndexData, data: IndexData) -> None:
        for target, index in old.faiss.items():
            fresh = emptied_like(index, self.kind, self.params, index.d)
            add_vectors(fresh, data.vectors(target))
            data.faiss[target] = fresh

    def attach(self, data: IndexData) -> None:
        """Bind to ``data``, with the search parameters (``nprobe``, ``ef_search``) of this backend."""
        for index in data.faiss.values():
            set_search_params(index, self.params)
        self.data = data

    def search(self, target: str, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        data = self._bound()
        index = data.faiss.get(target)
        if index is None:
            raise SearchIndexError(f"this {self.kind} index has no FAISS structure for {target}; rebuild it")
        return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)

    def manifest_fields(self) -> dict[str, Any]:
        data = self._bound()
        return {**super().manifest_fields(),
                "nlist": {t: int(ix.nlist) for t, ix in data.faiss.items()} if self.kind == "ivf" else None,
                "recall_at_10": measure_recall(data, self.kind)}


# -- Qdrant -------------------------------------------------------------------------------------------------
def qdrant_module():
    """``qdrant_client``, imported on first use: only qdrant indexes need it."""
    try:
        import qdrant_client
    except ImportError as e:  # pragma: no cover - installed by `make test`
        raise SearchIndexError("Qdrant support needs qdrant-client: pip install 'vsekit[qdrant]'") from e
    return qdrant_client


_LOCAL_CLIENTS: dict[str, list[Any]] = {}  # folder -> [client, users]
_LOCAL_LOCK = threading.Lock()
_POINT_NAMESPACE = uuid.UUID("6f1c3a52-54b9-4d8e-9a37-0e5d0c8b7a21")
_UPSERT_FLOATS = 1 << 18  # floats per upsert request (1 MiB of float32; far below a server's request limit)
_SCROLL = 4096
_TIMEOUT_S = 60
MAX_FETCH = 1 << 16  # most hits asked for per query while skipping points the records do not know


def point_id(record_id: str) -> str:
    """The Qdrant point id of a record: a UUID derived from its id, so an add that is run again after a
    crash writes the same points instead of duplicates."""
    return str(uuid.uuid5(_POINT_NAMESPACE, record_id))


def _acquire_local(path: str):
    """The process's one client of a local-mode folder (Qdrant's local mode locks its folder: a second client,
    even in the same process, is refused), counted so the last user closes it."""
    qc = qdrant_module()
    with _LOCAL_LOCK:
        entry = _LOCAL_CLIENTS.get(path)
        if entry is None:
            try:
                entry = _LOCAL_CLIENTS[path] = [qc.QdrantClient(path=path), 0]
            except RuntimeError as e:
                raise SearchIndexError(
                    f"{path}: Qdrant local-mode folder is in use by another process ({one_line(e)}); local "
                    "mode serves one process at a time: run a Qdrant server for shared access") from None
        entry[1] += 1
        return entry[0]


def _release_local(path: str) -> None:
    with _LOCAL_LOCK:
        entry = _LOCAL_CLIENTS.get(path)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            del _LOCAL_CLIENTS[path]
            entry[0].close()


@atexit.register
def _close_local_clients() -> None:
    """Close the local-mode clients still open when the process exits (e.g. a searcher nobody closed) while the
    interpreter can still import: left to the client's ``__del__`` at shutdown, closing fails with a printed
    ImportError."""
    with _LOCAL_LOCK:
        clients = [client for client, _ in _LOCAL_CLIENTS.values()]
        _LOCAL_CLIENTS.clear()
    for client in clients:
        with contextlib.suppress(Exception):  # exiting: a client that cannot close has nothing left to lose
            client.close()


def _is_local(client: Any) -> bool:
    """Whether ``client`` is the Python client's local mode (not a connection to a server)."""
    try:
        from qdrant_client.local.qdrant_local import QdrantLocal
    except ImportError:  # pragma: no cover - a layout of another client version
        return False
    return isinstance(getattr(client, "_client", None), QdrantLocal)


def default_collection(index_dir: str | Path) -> str:
    """A collection name from the index folder's name."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(index_dir).resolve().name).lstrip("-.")[:200]
    return name or "vsekit"


class QdrantBackend(Backend):
    """Vectors in Qdrant collections (inner product: ``Distance.DOT`` over the model's unit vectors, so the
    scores are the model's cosine scores), with ``{"id"}`` (and a caption's ``"image"``) as payload.

    Rows are not stored in the database: removing items renumbers the rows of the records, while a point's id
    (:func:`point_id`) and payload stay. Search maps the hits' ids to the rows of the records it was opened
    with and drops ids it does not know. ``kind="exact"`` asks the server for exact search
    (``SearchParams(exact=True)``); ``hnsw`` uses its HNSW graph (``hnsw_m``, ``ef_construction``,
    ``ef_search`` of the index's parameters). The client's local mode is a brute-force NumPy scan for both,
    and writes each point in its own SQLite transaction: for tests and small collections."""

    name = "qdrant"

    def __init__(self, kind: str, params: AnnParams, *, url: str | None, path: str | None,
                 collections: dict[str, str], dim: int | None, shards: int | None = None,
                 replicas: int | None = None, client: Any = None) -> None:
        """``client``: an already connected ``QdrantClient`` (e.g. ``QdrantClient(":memory:")`` in a
        benchmark), used instead of connecting to ``url`` or ``path``, and not closed here."""
        super().__init__(kind, params)
        self.url, self.path, self.collections, self.dim = url, path, dict(collections), dim
        self.shards, self.replicas = shards, replicas
        self._owns_client = client is None
        if client is None:
            client = _acquire_local(path) if path is not None else self._remote_client(url)
        self.client = client
        self.local = path is not None or _is_local(client)
        self.where = url or (f"local-mode folder {path}" if path else "the client given")
        self._lock = threading.Lock() if self.local else None  # local mode is not meant for threads
        self._rows: dict[str, dict[str, int]] = {}
        self._created: list[str] = []
        self._pending_deletes: dict[str, list[str]] = {}

    @staticmethod
    def _remote_client(url: str):
        qc = qdrant_module()
        try:
            return qc.QdrantClient(url=url, api_key=os.environ.get("QDRANT_API_KEY") or None, timeout=_TIMEOUT_S,
                                   check_compatibility=False)  # its failure is a warning; ours an error
        except Exception as e:  # noqa: BLE001 - a bad URL, port or TLS setting, reported in one line
            raise SearchIndexError(f"qdrant at {url}: cannot connect ({one_line(e)})") from None

    # -- construction ------------------------------------------------------------------------------------
    @classmethod
    def check_model(cls, similarity: str, kind: str) -> None:
        if similarity != "cosine":
            raise SearchIndexError(
                f"this model scores with {similarity!r} similarity, which is not an inner product: a vector "
                "database would rank by the wrong score. Index it with the local backend (--backend local "
                "--kind exact: exact, chunked scoring by the model's own similarity)")

    @classmethod
    def create(cls, config: BackendConfig, *, index_dir: str | Path, kind: str, params: AnnParams,
               targets: Sequence[str], overwrite: bool) -> QdrantBackend:
        """Connect and check that the collections may be written (they do not exist, or ``overwrite``);
        nothing is created before :meth:`build`."""
        if not isinstance(config, QdrantConfig):
            raise SearchIndexError("a qdrant index needs a QdrantConfig (its server or folder)")
        base = config.collection or default_collection(index_dir)
        path = str(Path(config.path).expanduser().resolve()) if config.path is not None else None
        backend = cls(kind, params, url=config.url, path=path, dim=None,
                      collections={t: f"{base}-{t}" for t in targets},
                      shards=config.shards, replicas=config.replicas)
        try:
            if not overwrite:
                for name in backend.collections.values():
                    if backend._call("check the collections", lambda n=name: backend.client.collection_exists(n)):
                        raise SearchIndexError(
                            f"qdrant at {backend.where}: collection {name!r} already exists; pass --overwrite to "
                            "replace it, or choose another --collection")
        except BaseException:
            backend.close()
            raise
        return backend

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any], params: AnnParams) -> QdrantBackend:
        q = manifest["qdrant"]
        return cls(manifest["kind"], params, url=q.get("url"), path=q.get("path"), collections=q["collections"],
                   dim=int(manifest["dim"]), shards=q.get("shards"), replicas=q.get("replicas"))

    def manifest_fields(self) -> dict[str, Any]:
        if self.url is None and self.path is None:
            raise SearchIndexError("an index on a client given by the caller has no location to record")
        where = {"url": self.url} if self.url is not None else {"path": self.path}
        extra = {k: v for k, v in (("shards", self.shards), ("replicas", self.replicas)) if v is not None}
        return {**super().manifest_fields(),
                "qdrant": {**where, "collections": dict(self.collections), "distance": "dot", **extra}}

    def close(self) -> None:
        if self.client is None or not self._owns_client:
            self.client = None
            return
        if self.path is not None:
            _release_local(self.path)
        else:
            try:
                self.client.close()
            except Exception:  # noqa: BLE001 - closing a dead connection is not worth an error
                pass
        self.client = None

    # -- calls -------------------------------------------------------------------------------------------
    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        """``fn()``, with a failure a one-line SearchIndexError saying where and what failed."""
        if self.client is None:
            raise SearchIndexError(f"qdrant at {self.where}: the connection is closed")
        try:
            if self._lock is None:
                return fn()
            with self._lock:
                return fn()
        except SearchIndexError:
            raise
        except Exception as e:  # noqa: BLE001 - connection, HTTP, gRPC and validation errors alike
            raise SearchIndexError(f"qdrant at {self.where}: could not {what} ({one_line(e)})") from None

    def _payload(self, target: str, rec: dict[str, Any]) -> dict[str, Any]:
        return {"id": rec["id"], "image": rec["image"]} if target == "captions" else {"id": rec["id"]}

    def _upsert(self, target: str, vectors: np.ndarray, records: Sequence[dict[str, Any]]) -> None:
        models = qdrant_module().models
        name = self.collections[target]
        step = max(1, _UPSERT_FLOATS // max(1, self.dim or 1))
        for a in range(0, len(records), step):
            recs = records[a: a + step]
            batch = models.Batch(ids=[point_id(r["id"]) for r in recs],
                                 vectors=np.asarray(vectors[a: a + step], dtype=np.float32).tolist(),
                                 payloads=[self._payload(target, r) for r in recs])
            self._call(f"write points to {name}", lambda b=batch: self.client.upsert(name, points=b, wait=True))

    def _delete(self, name: str, ids: Sequence[str]) -> None:
        models = qdrant_module().models
        for a in range(0, len(ids), _SCROLL):
            sel = models.PointIdsList(points=list(ids[a: a + _SCROLL]))
            self._call(f"delete points of {name}", lambda s=sel: self.client.delete(name, points_selector=s, wait=True))

    def _count(self, name: str) -> int:
        return int(self._call(f"count the points of {name}", lambda: self.client.count(name, exact=True)).count)

    def _drop_unknown(self, target: str, records: Sequence[dict[str, Any]]) -> None:
        """Delete the points of ``target``'s collection that ``records`` do not hold (left by a write that
        died before its commit); a no-op, after one count, when there are none."""
        name = self.collections[target]
        if self._count(name) <= len(records):
            return
        known, stray, offset = {point_id(r["id"]) for r in records}, [], None
        while True:
            points, offset = self._call(f"list the points of {name}", lambda o=offset: self.client.scroll(
                name, limit=_SCROLL, offset=o, with_payload=False, with_vectors=False))
            stray += [str(p.id) for p in points if str(p.id) not in known]
            if offset is None:
                break
        log.warning("qdrant %s: deleting %d points no committed write holds", name, len(stray))
        self._delete(name, stray)

    # -- writes ------------------------------------------------------------------------------------------
    def build(self, data: IndexData) -> IndexData:
        models = qdrant_module().models
        self.dim = int(data.vectors("images").shape[1])
        # m=0: no graph at all for an exact index (the server would otherwise build one nobody searches)
        hnsw = models.HnswConfigDiff(m=self.params.hnsw_m if self.kind == "hnsw" else 0,
                                     ef_construct=self.params.ef_construction)
        extra = {k: v for k, v in (("shard_number", self.shards), ("replication_factor", self.replicas))
                 if v is not None}
        for target, name in self.collections.items():
            if self._call(f"check collection {name}", lambda n=name: self.client.collection_exists(n)):
                self._call(f"replace collection {name}", lambda n=name: self.client.delete_collection(n))
            self._call(f"create collection {name}", lambda n=name: self.client.create_collection(
                n, vectors_config=models.VectorParams(size=self.dim, distance=models.Distance.DOT),
                hnsw_config=hnsw, **extra))
            self._created.append(name)
            self._upsert(target, data.vectors(target), data.records(target))
        return self._bind(IndexData(None, data.images, None, data.captions))

    def discard(self) -> None:
        for name in self._created:
            try:
                self._call(f"delete collection {name}", lambda n=name: self.client.delete_collection(n))
            except SearchIndexError as e:
                log.warning("%s", e)
        self._created = []

    def add(self, old: IndexData, new: IndexData) -> IndexData:
        for target in self.collections:
            self._drop_unknown(target, old.records(target))
            if new.records(target):
                self._upsert(target, new.vectors(target), new.records(target))
        data = IndexData(None, old.images + new.images)
        if old.has_captions:
            data.captions = (old.captions or []) + (new.captions or [])
        return self._bind(data)

    def remove(self, old: IndexData, keep: dict[str, np.ndarray]) -> IndexData:
        self._pending_deletes = {}
        for target in self.collections:
            recs = old.records(target)
            self._drop_unknown(target, recs)
            self._pending_deletes[target] = [point_id(r["id"]) for r, k in zip(recs, keep[target]) if not k]
        data = IndexData(None, [r for r, k in zip(old.images, keep["images"]) if k])
        if old.has_captions:
            data.captions = [c for c, k in zip(old.captions or [], keep["captions"]) if k]
        return self._bind(data)

    def committed(self) -> None:
        """The removed points go only now that the manifest no longer lists them."""
        self._created = []
        pending, self._pending_deletes = self._pending_deletes, {}
        for target, ids in pending.items():
            try:
                self._delete(self.collections[target], ids)
            except SearchIndexError as e:  # the index is consistent without it: searches skip them
                log.warning("%s; the next add or remove deletes the %d points left", e, len(ids))

    # -- reading -----------------------------------------------------------------------------------------
    def _bind(self, data: IndexData) -> IndexData:
        self.data, self._rows = data, {}
        return data

    def attach(self, data: IndexData) -> None:
        """Bind to an opened index's ``data`` after checking that each collection is there, has the index's
        dimension, and holds at least the records' points."""
        for target, name in self.collections.items():
            info = self._call(f"read collection {name}", lambda n=name: self.client.get_collection(n))
            size = getattr(info.config.params.vectors, "size", None)
            if size != self.dim:
                raise SearchIndexError(f"qdrant at {self.where}: collection {name!r} holds vectors of size {size}, "
                                       f"but the index's dimension is {self.dim}; rebuild the index")
            have, want = self._count(name), len(data.records(target))
            if have < want:
                raise SearchIndexError(
                    f"qdrant at {self.where}: collection {name!r} holds {have} points, but the index records "
                    f"{want} {target}: it was changed outside this index; rebuild the index")
        self._bind(data)

    def _row_map(self, target: str) -> dict[str, int]:
        rows = self._rows.get(target)
        if rows is None:
            rows = self._rows[target] = {r["id"]: i for i, r in enumerate(self._bound().records(target))}
        return rows

    def _query(self, name: str, queries: Sequence[np.ndarray], limit: int) -> list[list[Any]]:
        """The scored points of each query: one batch request to a server; one call per query in local mode,
        with the float32 query itself (a list would make it score the whole collection in float64)."""
        if self.local:
            return self._call(f"search {name}", lambda: [self.client.query_points(
                name, query=q, limit=limit, with_payload=["id"]).points for q in queries])
        models = qdrant_module().models
        params = models.SearchParams(exact=self.kind == "exact", hnsw_ef=max(self.params.ef_search, limit))
        requests = [models.QueryRequest(query=q.tolist(), limit=limit, with_payload=["id"], params=params)
                    for q in queries]
        answers = self._call(f"search {name}", lambda: self.client.query_batch_points(name, requests=requests))
        return [a.points for a in answers]

    def search(self, target: str, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.atleast_2d(np.ascontiguousarray(queries, dtype=np.float32))
        rows_of, name = self._row_map(target), self.collections[target]
        k = max(1, min(int(k), len(rows_of)))
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        rows = np.full((len(queries), k), -1, dtype=np.int64)
        for i, points in enumerate(self._query(name, list(queries), k)):
            limit, hits = k, self._known(points, rows_of)
            while len(hits) < k and len(points) == limit and limit < MAX_FETCH:  # unknown ids took places
                limit = min(limit * 4, MAX_FETCH)
                points = self._query(name, [queries[i]], limit)[0]
                hits = self._known(points, rows_of)
            hits.sort(key=lambda h: (-h[0], h[1]))  # ties among the hits by row, as the local backends
            for j, (s, r) in enumerate(hits[:k]):
                scores[i, j], rows[i, j] = s, r
        return scores, rows

    @staticmethod
    def _known(points, rows_of: dict[str, int]) -> list[tuple[float, int]]:
        out = []
        for p in points:
            row = rows_of.get((p.payload or {}).get("id"))
            if row is not None:
                out.append((float(p.score), row))
        return out


# -- choosing and opening ------------------------------------------------------------------------------------
BACKENDS: dict[tuple[str, str], type[Backend]] = {
    ("local", "exact"): NumpyExact,
    ("local", "ivf"): FaissAnn,
    ("local", "hnsw"): FaissAnn,
    ("qdrant", "exact"): QdrantBackend,
    ("qdrant", "hnsw"): QdrantBackend,
}


def backend_class(backend: str, kind: str) -> type[Backend]:
    cls = BACKENDS.get((backend, kind))
    if cls is None:
        kinds = [k for b, k in BACKENDS if b == backend]
        if not kinds:
            raise SearchIndexError(f"unknown backend {backend!r}; known: {', '.join(sorted({b for b, _ in BACKENDS}))}")
        raise SearchIndexError(f"the {backend} backend has no {kind!r} index; its kinds: {', '.join(kinds)}")
    return cls


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
    cls = backend_class(manifest.get("backend", "local"), manifest["kind"])
    backend = cls.from_manifest(manifest, params or manifest_params(manifest))
    try:
        backend.attach(data)
    except BaseException:
        backend.close()
        raise
    return backend


__all__ = ["ANN_KINDS", "BACKENDS", "Backend", "BackendConfig", "FaissAnn", "LocalConfig", "NumpyExact",
           "QdrantBackend", "QdrantConfig", "backend_class", "create_backend", "open_backend", "point_id"]
