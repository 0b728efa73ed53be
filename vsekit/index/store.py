"""On-disk search indexes: the embeddings, metadata and FAISS indexes of one collection.

Layout of an index folder::

    manifest.json            format, version, checkpoint fingerprint and path, similarity, dim, counts,
                             backend, kind, ANN parameters, measured recall, the current generation's
                             folder, and the size and sha256 of each of its files
    g000002/images.npy       (N, D) float32 image embeddings; row i belongs to line i of images.jsonl
    g000002/images.jsonl     one {"id", "path", "captions"} record per image
    g000002/images.faiss     FAISS index over images.npy (approximate kinds, ivf and hnsw, only)
    g000002/captions.*       the same for captions ({"id", "text", "image"}), when captions are indexed
    g000002/{t}.sets.npy     models with a similarity network: the local vectors (regions, words) of every
    g000002/{t}.offsets.npy  item, packed (vsekit.models.local_sets), which the search reranks with
    g000002/images.thumbs    the index's own JPEG thumbnails of the images, and where each one is
    g000002/images.thumbs.npy   (vsekit.index.thumbnails): the only image bytes the server sends

Exact indexes hold no FAISS file: they are searched by chunked matmul over the memory-mapped ``.npy``, so
the vectors are in RAM once. An exact index that holds an ``images.faiss`` (a vsekit before 0.1.0 wrote it)
is refused in one line: rebuild it. An index whose vectors live in a vector database (``"backend": "qdrant"``, see
:mod:`vsekit.index.backends`) holds no ``.npy`` or ``.faiss`` files, only the records; its manifest
says where the collections are, and has format version 2, so that a vsekit that predates backends
refuses it with "upgrade vsekit" instead of looking for files that are not there.

Why generations: an index is several files that must change together. Every write goes to a fresh
temporary folder, which is renamed to a new generation name; only then is ``manifest.json`` (one file,
replaced atomically) pointed at it. A crash at any point leaves the old manifest naming the old, untouched
generation; the leftovers are removed by the next successful write.

Why checksums: a truncated or overwritten file must not be served, nor reach FAISS's reader (which answers
with a C++ assertion). Opening an index checks every file of the generation against the size and sha256
the manifest records, and refuses a mismatch in one line naming the file; a manifest without checksums
(a vsekit before 0.1.0) is refused. The manifest itself is validated field by field on reading (:func:`read_manifest`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from vsekit.errors import VsekitError, one_line
from vsekit.index import thumbnails as thumbs
from vsekit.models.local_sets import LocalSets
from vsekit.utils.fs import file_lock, fsync_dir, fsync_file, make_work_dir, remove_stale_work
from vsekit.utils.io import atomic_write_json

INDEX_FORMAT = "vsekit-index"
INDEX_VERSION = 2  # the newest format this vsekit reads; version 1 = vectors in the folder (still written)
MANIFEST = "manifest.json"
KINDS = ("exact", "ivf", "hnsw")
ANN_KINDS = ("ivf", "hnsw")  # kinds with a FAISS file beside the vectors
BACKEND_NAMES = ("local", "qdrant")
TARGETS = ("images", "captions")
RECALL_K = 10
RECALL_QUERIES = 500
_GENERATION = re.compile(r"^g(\d{6,})$")
# The only file names a generation holds; the manifest's "files" may name no other (no paths).
SET_EXTS = ("sets.npy", "offsets.npy")  # the local sets of a similarity-network model
FILE_NAMES = tuple(f"{t}.{ext}" for t in TARGETS for ext in ("npy", "jsonl", "faiss", *SET_EXTS))
_HASH_CHUNK = 1 << 20
log = logging.getLogger(__name__)
# Work folders of writes are ".generation.building-<pid>-<hex>" (vsekit.utils.fs)
_WORK_NAME = "generation"
# what a user is told of an index of a vsekit before 0.1.0
_BEFORE_RELEASE = "written by a vsekit before 0.1.0, which this one does not read: rebuild it with `vsekit index build`"
_ADD_CHUNK = 65536
# Exact search scores the collection in blocks of at most this many (query, row) pairs (16 MiB of float32),
# whatever the number of queries
_EXACT_BLOCK_SCORES = 1 << 22
# A Qdrant collection name (the same characters a folder name may safely hold), bounded
COLLECTION_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}$")
# k-means training points per IVF list: FAISS wants 39 to 256; 64 keeps training of 1M x 1024 near a minute
# on two cores
_IVF_TRAIN_PER_LIST = 64


class SearchIndexError(VsekitError, ValueError):
    """A missing, corrupt or incompatible index, or a request the index cannot serve."""


class IndexMismatchError(SearchIndexError):
    """The model at hand is not the one the index was built with: its embeddings are not comparable."""


def faiss_module():
    """The ``faiss`` module, imported on first use so that order-similarity indexes work without it."""
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # it logs every CPU variant it tries
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - faiss-cpu is a declared dependency of search
        raise SearchIndexError("FAISS is not installed; install it with `pip install faiss-cpu`") from e
    return faiss


@dataclass
class AnnParams:
    """Parameters of the approximate indexes. ``nlist=None`` picks about sqrt(N) lists."""

    nlist: int | None = None
    nprobe: int = 16
    hnsw_m: int = 32
    ef_construction: int = 40
    ef_search: int = 64

    def __post_init__(self) -> None:
        for name in ("nprobe", "hnsw_m", "ef_construction", "ef_search"):
            if int(getattr(self, name)) < 1:
                raise SearchIndexError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.nlist is not None and self.nlist < 1:
            raise SearchIndexError(f"nlist must be >= 1, got {self.nlist}")


@dataclass
class IndexData:
    """The vectors and records of one generation. Vectors may be read-only memory maps; they are ``None``
    when they live in a vector database (the records are always here)."""

    image_vectors: np.ndarray | None
    images: list[dict[str, Any]]
    caption_vectors: np.ndarray | None = None
    captions: list[dict[str, Any]] | None = None
    faiss: dict[str, Any] = field(default_factory=dict)  # target -> FAISS index (approximate kinds only)
    sets: dict[str, LocalSets] = field(default_factory=dict)  # target -> local sets (similarity networks only)
    thumbnails: thumbs.Thumbnails | None = None  # one row per image; None: the index has none

    @property
    def has_captions(self) -> bool:
        return self.captions is not None

    def vectors(self, target: str) -> np.ndarray:
        if target == "captions" and not self.has_captions:
            raise SearchIndexError("this index holds no captions")
        v = self.image_vectors if target == "images" else self.caption_vectors
        if v is None:
            raise SearchIndexError("this index keeps its vectors in a vector database, not in its folder")
        return v

    def records(self, target: str) -> list[dict[str, Any]]:
        return self.images if target == "images" else (self.captions or [])

    def count(self, target: str) -> int:
        """Number of items of ``target``; an index without captions has none to search."""
        if target == "captions" and not self.has_captions:
            raise SearchIndexError("this index holds no captions")
        return len(self.records(target))


# -- approximate and exact nearest neighbours ------------------------------------------------------------
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
    faiss = faiss_module()
    if kind == "ivf":
        index = faiss.clone_index(index)
        index.reset()
        return index
    return faiss.IndexFlatIP(dim) if kind == "exact" else build_faiss(np.zeros((0, dim), np.float32), kind, params)


def exact_top_k(score_block: Callable[[int, int], np.ndarray], n: int, k: int,
                chunk: int = _ADD_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` (scores, rows), best first, ties by row, from ``score_block(a, b) -> (Q, b - a)``.

    The collection is scored ``chunk`` rows at a time, so memory is O(Q * (k + chunk)) whatever N is.
    """
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


def recall_at_k(index, vectors: np.ndarray, queries: np.ndarray, k: int = RECALL_K) -> float:
    """Mean fraction of the exact top-``k`` (inner product) that ``index`` also returns in its top ``k``."""
    n = len(vectors)
    if n == 0 or len(queries) == 0:
        return 1.0
    k = min(k, n)
    _, exact = inner_product_top_k(vectors, queries, k)
    _, approx = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    hits = [len(set(e.tolist()) & set(a.tolist())) for e, a in zip(exact, approx)]
    return float(np.sum(hits) / (k * len(queries)))


def sample_rows(n: int, size: int = RECALL_QUERIES, seed: int = 0) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).choice(n, min(n, size), replace=False)) if n else np.zeros(0, int)


def measure_recall(data: IndexData, kind: str) -> dict[str, float] | None:
    """recall@10 of each approximate index against exact search, on a sample of realistic queries:
    captions query the images (text -> image), images query the captions (image -> text)."""
    if kind not in ANN_KINDS or not data.faiss:
        return None
    out = {}
    for target, index in data.faiss.items():
        other = "captions" if target == "images" else "images"
        qv = data.caption_vectors if other == "captions" else data.image_vectors
        if qv is None or len(qv) == 0:  # no captions: images query themselves
            qv = data.vectors(target)
        queries = np.asarray(qv[sample_rows(len(qv))], dtype=np.float32)
        out[target] = round(recall_at_k(index, data.vectors(target), queries), 4)
    return out


# -- the manifest -----------------------------------------------------------------------------------------
class _FileRecord(BaseModel):
    """Size and sha256 of one file of the generation."""

    model_config = ConfigDict(extra="forbid")

    bytes: StrictInt = Field(ge=0)
    sha256: StrictStr = Field(pattern=r"^[0-9a-f]{64}$")


class _ManifestParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    nlist: StrictInt | None = Field(None, ge=1)
    nprobe: StrictInt = Field(16, ge=1)
    hnsw_m: StrictInt = Field(32, ge=1)
    ef_construction: StrictInt = Field(40, ge=1)
    ef_search: StrictInt = Field(64, ge=1)


class _QdrantManifest(BaseModel):
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
    def _one_location(self) -> _QdrantManifest:
        if (self.url is None) == (self.path is None):
            raise ValueError("needs exactly one of url (a server) and path (local mode)")
        return self


class _ThumbnailsManifest(BaseModel):
    """The ``thumbnails`` section: the generation whose folder holds them, their size and count, and the
    checksums of their two files."""

    model_config = ConfigDict(extra="forbid")

    generation: StrictStr = Field(pattern=_GENERATION.pattern)
    format: Literal["jpeg"] = "jpeg"
    max_side: StrictInt = Field(ge=1, le=thumbs.MAX_SIDE_LIMIT)
    count: StrictInt = Field(ge=0)
    files: dict[Literal["images.thumbs", "images.thumbs.npy"], _FileRecord]

    @field_validator("files")
    @classmethod
    def _both(cls, v: dict[str, _FileRecord]) -> dict[str, _FileRecord]:
        if set(v) != set(thumbs.FILE_NAMES):
            raise ValueError(f"must record {' and '.join(thumbs.FILE_NAMES)}")
        return v


class _Manifest(BaseModel):
    """The fields of ``manifest.json`` that vsekit reads; keys it does not know are kept as they are."""

    model_config = ConfigDict(extra="allow")

    format: Literal["vsekit-index"]
    version: StrictInt = Field(ge=1)
    generation: StrictStr
    fingerprint: StrictStr = Field(min_length=1)
    checkpoint: StrictStr | None = None
    similarity: StrictStr = Field(min_length=1)
    dim: StrictInt = Field(ge=1)
    kind: Literal["exact", "ivf", "hnsw"]
    backend: Literal["local", "qdrant"] = "local"
    qdrant: _QdrantManifest | None = None
    num_images: StrictInt = Field(ge=0)
    num_captions: StrictInt = Field(ge=0)
    has_captions: StrictBool
    params: _ManifestParams = Field(default_factory=_ManifestParams)
    nlist: dict[StrictStr, StrictInt] | None = None
    recall_at_10: dict[StrictStr, float] | None = None
    sources: list[StrictStr] = Field(default_factory=list)
    files: dict[StrictStr, _FileRecord]
    rerank: StrictInt | None = Field(None, ge=1)  # similarity networks: shortlist size reranked by the network
    thumbnails: _ThumbnailsManifest | None = None

    @field_validator("generation")
    @classmethod
    def _generation_name(cls, v: str) -> str:
        if not _GENERATION.match(v):
            raise ValueError(f"must name a generation folder like g000001, got {v[:60]!r}")
        return v

    @field_validator("files")
    @classmethod
    def _file_names(cls, v: dict[str, _FileRecord]) -> dict[str, _FileRecord]:
        for name in v:
            if name not in FILE_NAMES:
                raise ValueError(f"names {name[:60]!r}, which is not a file of an index "
                                 f"({', '.join(FILE_NAMES)})")
        return v

    @model_validator(mode="after")
    def _backend_section(self) -> _Manifest:
        if self.backend == "qdrant":
            if self.qdrant is None:
                raise ValueError("qdrant: missing (a qdrant index names its server or folder and collections)")
            if self.kind == "ivf":
                raise ValueError("kind: a qdrant index is exact or hnsw, not ivf")
            if ("captions" in self.qdrant.collections) != self.has_captions:
                raise ValueError("qdrant.collections: a captions collection is named if and only if "
                                 "has_captions is true")
        elif self.qdrant is not None:
            raise ValueError(f"qdrant: only a qdrant index has this section (backend is {self.backend!r})")
        return self


def _field_errors(e: ValidationError) -> str:
    """``field: problem; field: problem`` from a pydantic error, in one line."""
    out = []
    for err in e.errors()[:4]:
        field = ".".join(str(p) for p in err.get("loc", ())) or "(manifest)"
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        if err.get("type") == "missing":
            msg = "missing"
        elif "input" in err and err["type"] not in ("value_error",):
            msg += f" (got {_short_repr(err['input'])})"
        out.append(f"{field}: {msg}")
    more = len(e.errors()) - len(out)
    return "; ".join(out) + (f"; and {more} more" if more > 0 else "")


def _short_repr(value: Any, n: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= n else text[:n] + "..."


def read_manifest(index_dir: str | Path) -> dict[str, Any]:
    """The manifest of ``index_dir``, checked field by field: a missing, mistyped or out-of-range field,
    or a generation name that is not a plain folder name, is a :class:`SearchIndexError` naming it."""
    index_dir = Path(index_dir)
    path = index_dir / MANIFEST
    if not path.is_file():
        what = "no such folder" if not index_dir.exists() else f"no {MANIFEST} in it"
        raise SearchIndexError(f"{index_dir}: not a vsekit index ({what}); build one with `vsekit index build`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SearchIndexError(f"{path}: unreadable manifest ({one_line(e)})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != INDEX_FORMAT:
        raise SearchIndexError(f"{path}: not a vsekit index manifest (no \"format\": \"{INDEX_FORMAT}\")")
    version = manifest.get("version")
    if isinstance(version, int) and not isinstance(version, bool) and version > INDEX_VERSION:
        raise SearchIndexError(f"{path}: index format version {version} is newer than this vsekit "
                               f"reads ({INDEX_VERSION}); upgrade vsekit")
    if "files" not in manifest:
        raise SearchIndexError(f"{path}: an index without checksums, {_BEFORE_RELEASE}")
    try:
        _Manifest.model_validate(manifest)
    except ValidationError as e:
        raise SearchIndexError(f"{path}: invalid manifest: {_field_errors(e)}") from None
    return manifest


def vectors_in_folder(manifest: dict[str, Any]) -> bool:
    """Whether the index's generation folder holds its vectors (only the local backend's does)."""
    return manifest.get("backend", "local") == "local"


def manifest_version(manifest: dict[str, Any]) -> int:
    """The format version to write: 1 while the vectors are in the folder (readable by every vsekit), 2 when
    they are in a vector database."""
    return 1 if vectors_in_folder(manifest) else 2


def manifest_params(manifest: dict[str, Any]) -> AnnParams:
    """The ANN parameters a (validated) manifest records."""
    return AnnParams(**manifest.get("params", {}))


# -- checksums --------------------------------------------------------------------------------------------
def file_record(path: Path) -> dict[str, Any]:
    """``{"bytes", "sha256"}`` of one file, as the manifest records it."""
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"bytes": path.stat().st_size, "sha256": digest}


def verify_files(gen: Path, manifest: dict[str, Any], names: Sequence[str]) -> None:
    """Check the files ``names`` of generation ``gen`` against the sizes and sha256 the manifest records."""
    files = manifest["files"]
    for name in names:
        path = gen / name
        rec = files.get(name)
        if rec is None:
            raise SearchIndexError(f"{path}: corrupt index: the manifest records no checksum for this file")
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise SearchIndexError(f"{path}: missing: the index's manifest lists it") from None
        except OSError as e:
            raise SearchIndexError(f"{path}: unreadable ({one_line(e)})") from None
        if size != rec["bytes"]:
            raise SearchIndexError(f"{path}: corrupt index file: {size} bytes, but the manifest records "
                                   f"{rec['bytes']} (truncated or altered)")
        try:
            digest = file_record(path)["sha256"]
        except OSError as e:
            raise SearchIndexError(f"{path}: unreadable ({one_line(e)})") from None
        if digest != rec["sha256"]:
            raise SearchIndexError(f"{path}: corrupt index file: its sha256 is {digest[:16]}..., but the "
                                   f"manifest records {rec['sha256'][:16]}... (the file was altered)")


# -- reading ----------------------------------------------------------------------------------------------
_RECORD_KEYS = {"images": ("id",), "captions": ("id", "text", "image")}


def _read_jsonl(path: Path, target: str = "images") -> list[dict[str, Any]]:
    keys = _RECORD_KEYS[target]
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise SearchIndexError(f"{path}: line {n}: not a JSON record ({one_line(e)})") from None
            if not isinstance(rec, dict) or any(not isinstance(rec.get(k), str) for k in keys):
                raise SearchIndexError(f"{path}: line {n}: not a {target[:-1]} record (needs string "
                                       f"{', '.join(repr(k) for k in keys)})")
            out.append(rec)
    return out


def _read_file(path: Path, what: str, read: Callable[[], Any]) -> Any:
    """``read()``, with every failure a one-line SearchIndexError naming ``path``."""
    try:
        return read()
    except SearchIndexError:
        raise
    except FileNotFoundError:
        raise SearchIndexError(f"{path}: missing: the index's {what} file is not there") from None
    except UnicodeDecodeError as e:
        raise SearchIndexError(f"{path}: unreadable {what} file (not UTF-8 text at byte {e.start})") from None
    except (OSError, ValueError, EOFError, RuntimeError, MemoryError) as e:
        # FAISS reports a truncated file as a RuntimeError whose text is a C++ location and assertion
        raise SearchIndexError(f"{path}: unreadable {what} file, truncated or corrupt ({one_line(e)})") from None


def load_data(index_dir: str | Path, manifest: dict[str, Any], *, mmap: bool = True,
              with_faiss: bool = True, verify: bool = True) -> IndexData:
    """Read the generation ``manifest`` names. Vectors are memory-mapped unless ``mmap=False``. With
    ``verify`` (the default) every file is first checked against the size and sha256 the manifest records."""
    gen = Path(index_dir) / manifest["generation"]
    if not gen.is_dir():
        raise SearchIndexError(f"{gen}: missing: the index's manifest names this generation folder")
    targets = TARGETS if manifest.get("has_captions") else ("images",)
    local = vectors_in_folder(manifest)
    names = [f"{t}.{ext}" for t in targets for ext in (("npy", "jsonl") if local else ("jsonl",))]
    faiss_names = [f"{t}.faiss" for t in targets if f"{t}.faiss" in manifest["files"]]
    if faiss_names and not (local and manifest["kind"] in ANN_KINDS):
        raise SearchIndexError(f"{gen / faiss_names[0]}: an exact index with a FAISS file, {_BEFORE_RELEASE}")
    if verify:
        verify_files(gen, manifest, names + faiss_names)
    mode = "r" if mmap else None

    def vectors(target: str) -> np.ndarray:
        path = gen / f"{target}.npy"
        return _read_file(path, "vectors", lambda: np.load(path, mmap_mode=mode, allow_pickle=False))

    def records(target: str) -> list[dict[str, Any]]:
        path = gen / f"{target}.jsonl"
        return _read_file(path, "records", lambda: _read_jsonl(path, target))

    data = IndexData(vectors("images") if local else None, records("images"))
    if manifest.get("has_captions"):
        data.caption_vectors, data.captions = vectors("captions") if local else None, records("captions")
    if with_faiss:
        for name in faiss_names:
            path = gen / name
            data.faiss[name.removesuffix(".faiss")] = _read_file(
                path, "FAISS index", lambda p=path: faiss_module().read_index(str(p)))
    data.sets = _load_sets(gen, manifest, targets, mmap, verify)
    data.thumbnails = _load_thumbnails(Path(index_dir), manifest, len(data.images), verify)
    _check_consistent(gen, manifest, data)
    params = manifest_params(manifest)
    for index in data.faiss.values():
        set_search_params(index, params)
    return data


def _check_consistent(gen: Path, manifest: dict[str, Any], data: IndexData) -> None:
    dim = int(manifest["dim"])
    for target in TARGETS if manifest.get("has_captions") else ("images",):
        recs, want = data.records(target), int(manifest[f"num_{target}"])
        if not vectors_in_folder(manifest):
            if len(recs) != want:
                raise SearchIndexError(f"{gen / f'{target}.jsonl'}: corrupt index: {len(recs)} records; the "
                                       f"manifest says {want}")
            continue
        v = data.vectors(target)
        if v.ndim != 2 or v.dtype != np.float32:
            raise SearchIndexError(f"{gen / f'{target}.npy'}: corrupt index file: holds a {v.dtype} array of "
                                   f"shape {v.shape}, not (N, {dim}) float32 vectors")
        if v.shape[0] != len(recs) or v.shape[0] != want or (v.shape[0] and v.shape[1] != dim):
            raise SearchIndexError(f"{gen}: corrupt index: {target} has {v.shape} vectors and {len(recs)} "
                                   f"records; the manifest says {want} x {dim}")
        sets = data.sets.get(target)
        if sets is not None and len(sets) != want:
            raise SearchIndexError(f"{gen / f'{target}.sets.npy'}: corrupt index: local sets of {len(sets)} items, "
                                   f"not {want}")
        index = data.faiss.get(target)
        if index is not None and (index.ntotal != want or index.d != dim):
            raise SearchIndexError(f"{gen / f'{target}.faiss'}: corrupt index file: holds {index.ntotal} "
                                   f"vectors of dimension {index.d}, not {want} x {dim}")


# -- writing ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def write_lock(index_dir: str | Path) -> Iterator[None]:
    """Serialises writers of one index folder (readers need no lock: they follow the manifest)."""
    index_dir = Path(index_dir)
    index_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(index_dir / ".lock"):
        yield


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, np.ascontiguousarray(array, dtype=np.float32))


def _save_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def _write_files(folder: Path, data: IndexData) -> None:
    """The generation's files; vectors only when they are here (not in a vector database)."""
    if data.image_vectors is not None:
        _save_npy(folder / "images.npy", data.image_vectors)
    _save_jsonl(folder / "images.jsonl", data.images)
    if data.caption_vectors is not None:
        _save_npy(folder / "captions.npy", data.caption_vectors)
    if data.has_captions:
        _save_jsonl(folder / "captions.jsonl", data.captions or [])
    for target, index in data.faiss.items():
        faiss_module().write_index(index, str(folder / f"{target}.faiss"))
    for target, sets in data.sets.items():
        sets.save(folder, target)
    if data.thumbnails is not None:
        if len(data.thumbnails) != len(data.images):
            raise SearchIndexError(f"{len(data.thumbnails)} thumbnail rows for {len(data.images)} images")
        try:
            data.thumbnails.write(folder)
        except thumbs.ThumbnailError as e:
            raise SearchIndexError(str(e)) from None


def _load_sets(gen: Path, manifest: dict[str, Any], targets: Sequence[str], mmap: bool,
               verify: bool) -> dict[str, LocalSets]:
    """The local sets of the targets whose set files the manifest records (memory-mapped unless ``mmap=False``)."""
    files = manifest["files"]
    out = {}
    for target in targets:
        names = LocalSets.file_names(target)
        if not all(n in files for n in names):
            continue
        if verify:
            verify_files(gen, manifest, names)
        sets = _read_file(gen / names[0], "local sets", lambda t=target: LocalSets.load(gen, t, mmap=mmap))
        out[target] = sets
    return out


def thumbnails_section(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest's ``thumbnails`` section, or None when the index has none."""
    return manifest.get("thumbnails") or None


def _load_thumbnails(index_dir: Path, manifest: dict[str, Any], n: int, verify: bool) -> thumbs.Thumbnails | None:
    """The thumbnails of the current generation (with ``verify``, checked against their checksums), or None."""
    section = thumbnails_section(manifest)
    if section is None:
        return None
    if section["generation"] != manifest["generation"]:
        raise SearchIndexError(f"{index_dir / MANIFEST}: thumbnails of generation {section['generation']}, not the "
                               f"current one: an index {_BEFORE_RELEASE}")
    try:  # checked through the descriptors they are read from: no file can be swapped in between
        return thumbs.load(index_dir, manifest["generation"], n, section["max_side"],
                           section["files"] if verify else None)
    except thumbs.ThumbnailError as e:
        raise SearchIndexError(str(e)) from None


def _commit_manifest(index_dir: Path, manifest: dict[str, Any]) -> None:
    atomic_write_json(index_dir / MANIFEST, manifest)


def _next_generation(index_dir: Path, manifest: dict[str, Any] | None) -> str:
    n = 1
    if manifest and (m := _GENERATION.match(manifest.get("generation", ""))):
        n = int(m.group(1)) + 1
    while (index_dir / f"g{n:06d}").exists():  # a crashed write may have left this name behind
        n += 1
    return f"g{n:06d}"


def write_index(index_dir: str | Path, data: IndexData, manifest: dict[str, Any],
                previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``data`` as a new generation and point the manifest at it; returns the manifest written.

    Call under :func:`write_lock`. ``previous`` is the manifest being replaced, if any.
    """
    index_dir = Path(index_dir)
    index_dir.mkdir(parents=True, exist_ok=True)
    # The generation's name is picked once its files are written, so the work folder is named after a
    # placeholder; it is made with the umask's permissions (a server may run as another user).
    tmp = make_work_dir(index_dir / _WORK_NAME)
    gen = None
    try:
        try:
            _write_files(tmp, data)
        except OSError as e:  # a full disk, a file-size limit: a failed write names no file; name the index
            if e.filename is not None or e.errno is None:
                raise
            raise type(e)(e.errno, e.strerror, str(index_dir)) from e
        files, thumb_files = {}, {}
        for f in sorted(tmp.iterdir()):
            fsync_file(f)
            (thumb_files if f.name in thumbs.FILE_NAMES else files)[f.name] = file_record(f)
        fsync_dir(tmp)
        gen = _next_generation(index_dir, previous)
        # A plain rename, not publish_dir: a fresh generation name is never in the way, and must not be
        # replaced if it were.
        os.rename(tmp, index_dir / gen)
        fsync_dir(index_dir)
        manifest = {**manifest, "format": INDEX_FORMAT, "version": manifest_version(manifest),
                    "generation": gen, "num_images": len(data.images),
                    "num_captions": len(data.captions or []), "has_captions": data.has_captions,
                    "files": files}
        manifest.pop("thumbnails", None)
        if data.thumbnails is not None:
            manifest["thumbnails"] = {"generation": gen, "format": thumbs.FORMAT,
                                      "max_side": data.thumbnails.max_side, "count": data.thumbnails.count,
                                      "files": thumb_files}
        _commit_manifest(index_dir, manifest)  # the commit point
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if gen is not None and (previous or {}).get("generation") != gen:
            shutil.rmtree(index_dir / gen, ignore_errors=True)
        raise
    remove_stale(index_dir, keep=gen)
    return manifest


def remove_stale(index_dir: Path, keep: str) -> None:
    """Delete old generations and temporary folders left by earlier writes or crashes (call under
    :func:`write_lock`, so that no other write is under way)."""
    for p in index_dir.iterdir():
        if p.name != keep and p.is_dir() and _GENERATION.match(p.name):
            shutil.rmtree(p, ignore_errors=True)
    remove_stale_work(index_dir / _WORK_NAME, any_pid=True)
    remove_stale_work(index_dir / thumbs.STAGING)  # a build stages thumbnails without the lock: dead ones only


def params_dict(params: AnnParams) -> dict[str, Any]:
    return asdict(params)
