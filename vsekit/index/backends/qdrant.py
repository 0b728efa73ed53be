"""Vectors in Qdrant: one collection per target, on a server (a cluster, ``url``) or in the Python client's
local mode (a folder, ``path``); the index folder keeps the records, and the manifest's ``qdrant`` section
(:class:`QdrantManifest`) says where the collections are."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator, model_validator

from vsekit.errors import one_line
from vsekit.index.backends.base import Backend
from vsekit.index.data import AnnParams, IndexData, SearchIndexError

log = logging.getLogger(__name__)
# A Qdrant collection name (the same characters a folder name may safely hold), bounded
COLLECTION_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}$")


@dataclass(frozen=True)
class QdrantConfig:
    """Vectors in Qdrant: a server or cluster at ``url`` (its API key, if any, from ``QDRANT_API_KEY``), or
    the Python client's local mode in the folder ``path``. The collections are ``<collection>-images`` and
    ``<collection>-captions`` (``None``: named after the index folder); ``shards`` and ``replicas`` on a
    cluster (``None``: the server's defaults; local mode ignores them)."""

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
        if self.url is not None and not re.match(r"^https?://[^\s/]+", self.url):
            raise SearchIndexError(f"--url {self.url[:100]!r}: not an http(s) URL, e.g. http://localhost:6333")
        if self.url is not None and len(self.url) > 2048:
            raise SearchIndexError("--url: longer than 2048 characters")
        if self.collection is not None and not COLLECTION_NAME.match(self.collection):
            raise SearchIndexError(f"--collection {self.collection[:100]!r}: use letters, digits, '_', '-' and "
                                   "'.', at most 200, not starting with '-' or '.'")
        for field, v in (("shards", self.shards), ("replicas", self.replicas)):
            if v is not None and not 1 <= v <= 1024:
                raise SearchIndexError(f"--qdrant-{field} must be 1..1024, got {v}")


class QdrantManifest(BaseModel):
    """Where the vectors of a ``"backend": "qdrant"`` index are: a server's URL or a local-mode folder,
    and one collection per target."""

    model_config = ConfigDict(extra="forbid")

    url: StrictStr | None = Field(None, min_length=1, max_length=2048)
    path: StrictStr | None = Field(None, min_length=1, max_length=4096)
    collections: dict[Literal["images", "captions"], StrictStr]
    distance: Literal["dot"] = "dot"
    shards: StrictInt | None = Field(None, ge=1, le=1024)
    replicas: StrictInt | None = Field(None, ge=1, le=1024)

    @field_validator("collections")
    @classmethod
    def _names(cls, v: dict[str, str]) -> dict[str, str]:
        if "images" not in v:
            raise ValueError("names no images collection")
        for target, name in v.items():
            if not COLLECTION_NAME.match(name):
                raise ValueError(f"{target}: {name[:60]!r} is not a collection name (letters, digits, '_', "
                                 "'-', '.', at most 200)")
        return v

    @model_validator(mode="after")
    def _one_location(self) -> QdrantManifest:
        if (self.url is None) == (self.path is None):
            raise ValueError("needs exactly one of url (a server) and path (local mode)")
        return self


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

    Rows are not stored in the database (removing items renumbers the rows of the records): search maps the
    hits' ids (:func:`point_id`) to the rows of the records it was opened with and drops ids it does not know.
    ``kind="exact"`` asks the server for exact search; ``hnsw`` uses its HNSW graph (``hnsw_m``,
    ``ef_construction``, ``ef_search``). The client's local mode: docs/search.md, "Qdrant's local mode"."""

    name = "qdrant"
    manifest_section = QdrantManifest
    inner_product_only = ("a vector database", "Index it with the local backend (--backend local --kind exact: "
                          "exact, chunked scoring by the model's own similarity)")

    def __init__(self, kind: str, params: AnnParams, *, url: str | None, path: str | None,
                 collections: dict[str, str], dim: int | None, shards: int | None = None,
                 replicas: int | None = None, client: Any = None) -> None:
        """``client``: an already connected ``QdrantClient`` (e.g. ``QdrantClient(":memory:")`` in a
        benchmark), used instead of connecting to ``url`` or ``path``, and not closed here."""
        super().__init__(kind, params)
        self.url, self.path, self.collections, self.dim = url, path, dict(collections), dim
        self.shards, self.replicas = shards, replicas
        self._owns_client = client is None
        self.client = client if client is not None else (
            _acquire_local(path) if path is not None else self._remote_client(url))
        self.local = path is not None or _is_local(self.client)
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
    def check_manifest(cls, manifest: Any) -> None:
        if manifest.qdrant is None:
            raise ValueError("qdrant: missing (a qdrant index names its server or folder and collections)")
        if ("captions" in manifest.qdrant.collections) != manifest.has_captions:
            raise ValueError("qdrant.collections: a captions collection is named if and only if has_captions is "
                             "true")

    @classmethod
    def replaced(cls, index_dir: Path, previous: dict[str, Any], written: dict[str, Any]) -> None:
        """The replaced index's collections that the new one does not use are not deleted (they may be on
        another server, or shared), only named."""
        old, new = previous["qdrant"], (written.get("qdrant") or {})
        same_place = (old.get("url"), old.get("path")) == (new.get("url"), new.get("path"))
        left = [c for c in old["collections"].values()
                if not same_place or c not in (new.get("collections") or {}).values()]
        if left:
            log.warning("%s: the replaced index's Qdrant collections %s (at %s) are no longer used; delete them "
                        "there if nothing else does", index_dir, ", ".join(left), old.get("url") or old.get("path"))

    @classmethod
    def create(cls, config: QdrantConfig, *, index_dir: str | Path, kind: str, params: AnnParams,
               targets: Sequence[str], overwrite: bool) -> QdrantBackend:
        """Connect and check that the collections may be written (they do not exist, or ``overwrite``);
        nothing is created before :meth:`build`."""
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
        client, self.client = self.client, None
        if client is None or not self._owns_client:
            return
        if self.path is not None:
            _release_local(self.path)
        else:
            with contextlib.suppress(Exception):  # closing a dead connection is not worth an error
                client.close()

    # -- calls -------------------------------------------------------------------------------------------
    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        """``fn()``, with a failure a one-line SearchIndexError saying where and what failed."""
        if self.client is None:
            raise SearchIndexError(f"qdrant at {self.where}: the connection is closed")
        try:
            with self._lock or contextlib.nullcontext():
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
        return self._bind(replace(data, image_vectors=None, caption_vectors=None))  # the rest stays here

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
        return self._bind(old.appended(new, vectors=False))

    def remove(self, old: IndexData, keep: dict[str, np.ndarray]) -> IndexData:
        self._pending_deletes = {}
        for target in self.collections:
            recs = old.records(target)
            self._drop_unknown(target, recs)
            self._pending_deletes[target] = [point_id(r["id"]) for r, k in zip(recs, keep[target]) if not k]
        return self._bind(old.subset(keep))

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
        """(score, row) of the points whose ids the records know."""
        return [(float(p.score), row) for p in points
                if (row := rows_of.get((p.payload or {}).get("id"))) is not None]
