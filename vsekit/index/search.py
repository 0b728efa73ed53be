"""Querying an index: text -> image, image -> text and image -> image search.

Scores are the model's own similarity. Inner-product (``cosine``) models are searched by the index's
backend (:mod:`vsekit.index.backends`). ``order`` models are scored exactly with the order-violation
similarity, chunked over the collection, since approximate indexes and vector databases only know inner
products and distances. The order similarity relates an image to a caption; between two items of the same
side (image -> image, text -> caption) the inner product of the embeddings is used.

Models with a similarity network (SGRAF's SGR, SAF) are searched in two stages: an inner-product shortlist
over the pooled embeddings (by the backend), then the best ``rerank`` of it scored through the network
(docs/methods/sgraf.md, section 5).

Image queries are checked before they are decoded in full: their header's size must fit a pixel limit and an
aspect-ratio limit, and so must the size the model's resize step would make of them (a 100000 x 1 PNG of a
few hundred bytes would otherwise be resized to gigabytes). Only the forward pass holds the model lock
(:meth:`SearchIndex.embed_image`), so a slow upload never stalls the other queries.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vsekit.data.images import MAX_QUERY_ASPECT_RATIO, MAX_QUERY_IMAGE_PIXELS
from vsekit.index.backends import Backend, open_backend
from vsekit.index.backends.numpy import exact_top_k, inner_product_top_k
from vsekit.index.build import check_local_sets, check_model, check_rerank
from vsekit.index.data import TARGETS, AnnParams, IndexData, SearchIndexError
from vsekit.index.generations import load_data
from vsekit.index.manifest import MANIFEST, read_manifest
from vsekit.models.local_sets import LocalSets

logger = logging.getLogger(__name__)

_ORDER_CHUNK = 4096  # order scoring holds (queries x chunk x D) floats


class ImageSizeError(SearchIndexError):
    """An image query refused for its size or shape, from its header, before it is decoded in full.
    ``status`` is the HTTP status the server answers with (413: too many pixels, 422: too elongated)."""

    def __init__(self, message: str, status: int = 413) -> None:
        super().__init__(message)
        self.status = status


class NoKnownWordsError(SearchIndexError):
    """A text query with no word the model knows (only punctuation, unknown words, or characters that are
    invisible or control codes): its embedding would be the model's answer to nothing, ranked with confidence.
    ``status``: the HTTP status the server answers with (422)."""

    status = 422


def image_header_size(path: str | Path) -> tuple[int, int] | None:
    """(width, height) from an image file's header without decoding its pixels; None when PIL cannot even
    read the header or its format is not accepted (:func:`vsekit.data.images.load_rgb` then says why)."""
    from vsekit.data.images import open_image

    try:
        with open_image(Path(path)) as im:
            return im.size
    except Exception:  # noqa: BLE001 - any failure is reported by the full decode that follows
        return None


@dataclass(frozen=True)
class SearchResult:
    """One hit. ``image_id``/``path`` are the image to show: the hit itself, or a caption's image."""

    rank: int
    score: float
    target: str  # "images" or "captions"
    id: str
    image_id: str
    path: str | None
    text: str | None  # the caption, or an image's first caption

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(eq=False)
class _Generation:
    """One opened generation of the index: what a query reads, replaced whole by :meth:`SearchIndex.refresh`."""

    manifest: dict[str, Any]
    data: IndexData
    backend: Backend
    users: int = 0  # queries reading it now
    retired: bool = False  # replaced: its backend is closed when its last query ends

    def __post_init__(self) -> None:
        self.row_of_id = {r["id"]: i for i, r in enumerate(self.data.images)}


def _stamp(path: Path) -> tuple[int, int, int]:
    """What changes when ``manifest.json`` is replaced (a commit renames a new file over it)."""
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, st.st_size


class SearchIndex:
    """An opened index plus the model that embeds queries. Safe to share between threads.

    A long-lived searcher (``vsekit serve``) calls :meth:`refresh` to pick up the generations that ``index
    add``/``remove`` commit meanwhile. Each query reads one generation from start to end (the one current
    when it began), so a switch never mixes the rows of one with the records of another."""

    def __init__(self, index_dir: str | Path, manifest: dict[str, Any], data: IndexData, embedder,
                 backend: Backend | None = None, rerank: int | None = None) -> None:
        self.index_dir, self.embedder = Path(index_dir), embedder
        self._current = _Generation(manifest, data, backend or open_backend(manifest, data))
        self._pin = threading.local()  # the generation this thread's query reads
        self._swap_lock = threading.Lock()  # guards _current and the generations' users/retired
        self._reload_lock = threading.Lock()  # one refresh at a time
        self._stamp: tuple[int, int, int] | None = None  # manifest.json as of the generation opened
        self._next_check = 0.0  # time.monotonic() before which refresh() does not look
        self._open_options: dict[str, Any] = {"verify": True, "params": {}}
        self._model_lock = threading.Lock()
        if rerank is not None and "rerank" not in manifest:
            raise SearchIndexError(f"{index_dir}: rerank applies to models with a similarity network; this index's "
                                   f"model scores by {manifest['similarity']!r}")
        # None: not a similarity network's index (no second stage)
        rerank = rerank if rerank is not None else manifest.get("rerank")
        self.rerank = None if rerank is None else check_rerank(rerank)

    @classmethod
    def open(cls, index_dir: str | Path, embedder=None, *, checkpoint: str | Path | None = None,
             device: str = "auto", nprobe: int | None = None, ef_search: int | None = None,
             verify: bool = True, rerank: int | None = None) -> SearchIndex:
        """Open ``index_dir`` with ``embedder``, or with the model at ``checkpoint`` (default: the checkpoint
        recorded in the manifest). A model other than the index's own is refused. With ``verify`` (the
        default) every index file is checked against the sha256 the manifest records. ``rerank``: the
        shortlist a similarity network's model reranks per query (default: the manifest's)."""
        try:  # before the manifest is read: a commit in between then shows as a change to refresh()
            stamp = _stamp(Path(index_dir) / MANIFEST)
        except OSError:
            stamp = None  # read_manifest says what is wrong
        manifest = read_manifest(index_dir)
        if embedder is None:
            from vsekit.inference import Embedder

            path = checkpoint or manifest.get("checkpoint")
            if not path:
                raise SearchIndexError(f"{index_dir}: the manifest names no checkpoint; pass one")
            embedder = Embedder.from_checkpoint(path, device=device)
        options = {"verify": verify, "params": {**({"nprobe": nprobe} if nprobe else {}),
                                                **({"ef_search": ef_search} if ef_search else {})}}
        manifest, data, backend = _open_generation(index_dir, manifest, embedder, **options)
        sx = cls(index_dir, manifest, data, embedder, backend, rerank=rerank)
        sx._stamp, sx._open_options = stamp, options
        return sx

    def close(self) -> None:
        """Release the backend's connection (a Qdrant local-mode folder stays locked until then)."""
        self.backend.close()

    # -- the current generation, and picking up a newer one -------------------------------------------
    def _read(self) -> _Generation:
        """The generation this thread's query reads (:meth:`_pinned`), else the current one."""
        return getattr(self._pin, "gen", None) or self._current

    @property
    def manifest(self) -> dict[str, Any]:
        return self._read().manifest

    @property
    def data(self) -> IndexData:
        return self._read().data

    @property
    def backend(self) -> Backend:
        return self._read().backend

    @contextlib.contextmanager
    def _pinned(self) -> Iterator[_Generation]:
        """Hold this thread's query to the current generation until it ends (re-entrant)."""
        held = getattr(self._pin, "gen", None)
        if held is not None:
            yield held
            return
        with self._swap_lock:
            gen = self._current
            gen.users += 1
        self._pin.gen = gen
        try:
            yield gen
        finally:
            self._pin.gen = None
            with self._swap_lock:
                gen.users -= 1
                done = gen.retired and gen.users == 0
            if done:
                _close_quietly(gen.backend)

    def refresh_due(self) -> bool:
        """Whether :meth:`refresh` would look at the manifest now (cheap: no file is touched)."""
        return time.monotonic() >= self._next_check

    def refresh(self, min_interval: float = 0.0) -> bool:
        """Switch to the generation the manifest names now, if one was committed since this index was opened;
        True when it switched. Looks at most once every ``min_interval`` seconds, by one ``stat`` of
        ``manifest.json``; the new generation is opened and checked while queries go on with the old one (a
        failure: docs/search.md, "Serving"). While another thread refreshes, returns False at once."""
        if not self.refresh_due() or not self._reload_lock.acquire(blocking=False):
            return False
        try:
            self._next_check = time.monotonic() + min_interval
            return self._reload()
        finally:
            self._reload_lock.release()

    def _reload(self) -> bool:
        try:
            stamp = _stamp(self.index_dir / MANIFEST)
        except OSError as e:
            if self._stamp is not None:
                logger.warning("%s: cannot read the manifest (%s); still serving generation %s", self.index_dir,
                               e.strerror or e, self.manifest.get("generation"))
            self._stamp = None
            return False
        if stamp == self._stamp:
            return False
        self._stamp = stamp  # one look per commit, whether its generation opens or not
        old = self._current
        try:
            manifest = read_manifest(self.index_dir)
            if manifest == old.manifest:  # rewritten as it was (an --overwrite build may reuse a name)
                return False
            gen = _Generation(*_open_generation(self.index_dir, manifest, self.embedder,
                                                **self._open_options))
        except Exception as e:  # noqa: BLE001 - whatever is wrong with it, the old generation goes on serving
            logger.warning("%s: a new generation was committed but cannot be opened; still serving generation "
                           "%s: %s", self.index_dir, old.manifest.get("generation"), e)
            return False
        with self._swap_lock:
            self._current = gen
            old.retired = True
            done = old.users == 0
        if done:
            _close_quietly(old.backend)
        logger.info("%s: now serving generation %s (%d images, %d captions)", self.index_dir,
                    manifest["generation"], len(gen.data.images), len(gen.data.captions or []))
        return True

    # -- facts ------------------------------------------------------------------------------------------
    @property
    def num_images(self) -> int:
        return len(self.data.images)

    @property
    def num_captions(self) -> int:
        return len(self.data.captions or [])

    @property
    def has_captions(self) -> bool:
        return self.data.has_captions and self.num_captions > 0

    @property
    def can_embed_images(self) -> bool:
        return not self.embedder.reads_features

    @property
    def similarity(self) -> str:
        return self.manifest["similarity"]

    @property
    def learned(self) -> bool:
        """True when results are reranked through the model's similarity network."""
        return self.rerank is not None

    def image_record(self, image_id: str) -> dict[str, Any] | None:
        gen = self._read()  # the row and the record from one generation
        row = gen.row_of_id.get(image_id)
        return None if row is None else gen.data.images[row]

    def has_thumbnail(self, image_id: str) -> bool:
        """Whether the index holds a thumbnail of image ``image_id`` (the server links only those)."""
        gen = self._read()  # the row and the thumbnails from one generation
        thumbnails, row = gen.data.thumbnails, gen.row_of_id.get(image_id)
        return thumbnails is not None and row is not None and thumbnails.has(row)

    def thumbnail(self, image_id: str) -> bytes | None:
        """The index's own JPEG thumbnail of image ``image_id`` (:mod:`vsekit.index.thumbnails`), None when
        there is no such image or it has none; a thumbnail file that must not be sent (a link, not a JPEG,
        truncated) raises :class:`~vsekit.index.thumbnails.ThumbnailError`. Never reads a record's ``path``."""
        gen = self._read()
        thumbnails, row = gen.data.thumbnails, gen.row_of_id.get(image_id)
        return None if thumbnails is None or row is None else thumbnails.read(row)

    # -- queries ----------------------------------------------------------------------------------------
    def search_text(self, query: str, k: int = 10, target: str = "images") -> list[SearchResult]:
        """Text -> image (or, with ``target="captions"``, text -> caption) search."""
        if not isinstance(query, str) or not query.strip():
            raise SearchIndexError("the query is empty")
        self._check(k, target)
        known = getattr(self.embedder, "known_words", None)
        if known is not None and not self.embedder.reads_text_features and known(query) == 0:
            raise NoKnownWordsError("the query has no known words (only punctuation, unknown words or invisible "
                                    "characters); search with words of the captions the model was trained on")
        with self._model_lock:
            q = self.embedder.encode_texts([query], parts=self.learned)
        q, sets = q if self.learned else (q, None)
        return self.search_vectors(q, "captions", target, k, query_sets=sets)[0]

    def search_image(self, image, k: int = 10, target: str = "captions", *,
                     max_pixels: int = MAX_QUERY_IMAGE_PIXELS,
                     max_aspect_ratio: float = MAX_QUERY_ASPECT_RATIO) -> list[SearchResult]:
        """Image -> text (``target="captions"``) or image -> image search. ``image`` is a PIL image or a path;
        a file is checked against the limits (:meth:`check_image_size`) from its header, before decoding."""
        self._check(k, target)
        self._check_can_embed()
        if isinstance(image, (str, Path)):
            from vsekit.data.images import load_rgb

            size = image_header_size(image)
            if size is not None:
                self.check_image_size(*size, max_pixels=max_pixels, max_aspect_ratio=max_aspect_ratio)
            image = load_rgb(image, exif_transpose=True)
        self.check_image_size(*image.size, max_pixels=max_pixels, max_aspect_ratio=max_aspect_ratio)
        out = self.embed_image(image, parts=self.learned)
        q, sets = out if self.learned else (out, None)
        return self.search_vectors(q, "images", target, k, query_sets=sets)[0]

    def embed_image(self, image, *, parts: bool = False):
        """(1, D) embedding of a PIL image (already checked with :meth:`check_image_size`); with ``parts``,
        also its local set (the rerank of a similarity network). The transform runs outside the model lock,
        which guards only the forward pass."""
        self._check_can_embed()
        return self.embedder.encode_images([image], parts=parts, lock=self._model_lock)

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """The (width, height) the model's eval transform resizes a ``width`` x ``height`` image to, before
        its crop: the short side to ``transform.resize`` (``short_side``), or the crop size (``square``)."""
        tf = self.embedder.config.transform
        if tf.resize_policy == "square":
            return tf.image_size, tf.image_size
        short = tf.resize if tf.resize is not None else round(tf.image_size * 256 / 224)
        if width <= height:  # as torchvision's Resize(int): the long side is truncated
            return short, int(short * height / width)
        return int(short * width / height), short

    def check_image_size(self, width: int, height: int, *, max_pixels: int = MAX_QUERY_IMAGE_PIXELS,
                         max_aspect_ratio: float = MAX_QUERY_ASPECT_RATIO) -> None:
        """Refuse (:class:`ImageSizeError`) an image of ``width`` x ``height`` pixels with more than
        ``max_pixels`` pixels, a long side more than ``max_aspect_ratio`` times its short side, or a resize
        (:meth:`resized_size`) that would make more than ``max_pixels`` pixels of it."""
        if width < 1 or height < 1:
            raise ImageSizeError(f"the image is {width}x{height} pixels: it has no pixels", status=422)
        if width * height > max_pixels:
            raise ImageSizeError(f"the image has {width}x{height} pixels; the limit is {max_pixels} pixels")
        ratio = max(width, height) / min(width, height)
        if ratio > max_aspect_ratio:
            raise ImageSizeError(f"the image is {width}x{height} pixels, an aspect ratio of {ratio:.0f}:1; "
                                 f"the limit is {max_aspect_ratio:g}:1", status=422)
        rw, rh = self.resized_size(width, height)
        if rw * rh > max_pixels:
            raise ImageSizeError(f"the image is {width}x{height} pixels, which the model's resize would make "
                                 f"{rw}x{rh}; the limit is {max_pixels} pixels")

    def _check_can_embed(self) -> None:
        if not self.can_embed_images:
            raise SearchIndexError("this index's model reads precomputed features; it cannot embed an image file")

    def _check(self, k: int, target: str) -> None:
        if target not in TARGETS:
            raise SearchIndexError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise SearchIndexError(f"k must be a positive integer, got {k!r}")
        if target == "captions" and not self.has_captions:
            raise SearchIndexError("this index holds no captions to return; rebuild it from a data set with "
                                   "--captions, or search images (--target images)")

    def search_vectors(self, queries: np.ndarray, query_side: str, target: str, k: int, *,
                       query_sets: LocalSets | None = None, rerank: int | None = None) -> list[list[SearchResult]]:
        """Top-``k`` hits for each row of ``queries`` (embeddings of ``query_side``: "images"/"captions").
        For a similarity network's index, a query of the other side than ``target`` needs its local sets
        (``query_sets``, one per row) and is reranked (``rerank``: default, the index's)."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        with self._pinned():  # one generation from the first row to the last record
            n = self.data.count(target)
            if n == 0:
                return [[] for _ in queries]
            k = min(int(k), n)
            if self.learned and query_side != target:
                scores, rows = self._reranked_top_k(queries, query_sets, query_side, target, k, rerank)
            else:
                scores, rows = self._top_k(queries, query_side, target, k)
            return [self._results(s, r, target) for s, r in zip(scores, rows)]

    def _reranked_top_k(self, queries: np.ndarray, query_sets: LocalSets | None, query_side: str, target: str,
                        k: int, rerank: int | None) -> tuple[np.ndarray, np.ndarray]:
        """Stage 1: the ``rerank`` best by inner product of the embeddings; stage 2: those scored through the
        similarity network, best first (ties to the lower row, as an exact ranking orders them)."""
        if query_sets is None or len(query_sets) != len(queries):
            raise SearchIndexError("this index reranks through the model's similarity network: a query needs its "
                                   "local sets beside its embedding (use search_text or search_image)")
        wanted = check_rerank(rerank) if rerank is not None else self.rerank
        depth = min(max(wanted, k), len(self.data.vectors(target)))  # never fewer than the k asked for
        _, short = self._top_k(queries, query_side, target, depth)  # inner product, by the backend
        stored = self.data.sets[target]
        out_s, out_r = [], []
        for q in range(len(queries)):
            rows = np.sort(short[q][short[q] >= 0])  # row order: rerank >= N is the very call of an exact ranking
            one = query_sets.subset([q])
            with self._model_lock:
                if target == "images":
                    s = self.embedder.score_sets(stored, one, image_rows=rows)[:, 0]
                else:
                    s = self.embedder.score_sets(one, stored, caption_rows=rows)[0]
            order = np.lexsort((rows, -s))[:k]
            out_s.append(s[order])
            out_r.append(rows[order])
        return _stack(out_s, k, np.float32, np.nan), _stack(out_r, k, np.int64, -1)

    def _top_k(self, queries: np.ndarray, query_side: str, target: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.similarity == "cosine" or self.learned:  # a similarity network's shortlist: inner product
            return self.backend.search(target, queries, k)
        vectors = self.data.vectors(target)
        if query_side == target:
            return inner_product_top_k(vectors, queries, k)
        from vsekit.models.similarity import get_similarity

        sim = get_similarity(self.similarity)
        q = torch.from_numpy(queries)

        def block(a: int, b: int) -> np.ndarray:
            rows = torch.from_numpy(np.array(vectors[a:b]))
            # caption queries: sim(images, captions).T; image queries against captions: sim(images, captions)
            return (sim(rows, q).T if target == "images" else sim(q, rows)).numpy()

        return exact_top_k(block, len(vectors), k, chunk=_ORDER_CHUNK)

    def _results(self, scores: np.ndarray, rows: np.ndarray, target: str) -> list[SearchResult]:
        out = []
        for s, r in zip(scores.tolist(), rows.tolist()):
            if r < 0:  # a backend pads with -1 when an approximate search finds fewer than k
                continue
            rec = self.data.records(target)[r]
            if target == "images":  # an image's text: its first caption
                image_id, path, text = rec["id"], rec.get("path"), (rec.get("captions") or [None])[0]
            else:
                image_id, text = rec["image"], rec["text"]
                path = (self.image_record(image_id) or {}).get("path")
            out.append(SearchResult(len(out) + 1, float(s), target, rec["id"], image_id, path, text))
        return out


def _stack(rows: list[np.ndarray], k: int, dtype: Any, fill: Any) -> np.ndarray:
    """Rows of up to ``k`` entries as one (Q, k) array, short rows padded with ``fill`` (a backend's -1 rows)."""
    out = np.full((len(rows), k), fill, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def _open_generation(index_dir: str | Path, manifest: dict[str, Any], embedder, *, verify: bool,
                     params: dict[str, Any]) -> tuple[dict[str, Any], IndexData, Backend]:
    """The data and backend of the generation ``manifest`` names, after checking that ``embedder`` is the
    index's model; ``params``: search parameters that override the manifest's (nprobe, ef_search)."""
    check_model(manifest, embedder, index_dir)
    check_local_sets(manifest, embedder, Path(index_dir))
    data = load_data(index_dir, manifest, verify=verify)
    merged = AnnParams(**{**asdict(AnnParams.of_manifest(manifest)), **params})
    return manifest, data, open_backend(manifest, data, merged)


def _close_quietly(backend: Backend) -> None:
    """Close a replaced generation's backend; a failure there must not fail the query that happened to end last."""
    try:
        backend.close()
    except Exception as e:  # noqa: BLE001
        logger.warning("closing the backend of a replaced index generation failed: %s", e)
