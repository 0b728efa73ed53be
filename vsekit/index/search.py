"""Querying an index: text -> image, image -> text and image -> image search.

Scores are the model's own similarity. Inner-product (``cosine``) models are searched by the index's
backend (:mod:`vsekit.index.backends`: NumPy exact, FAISS approximate, or Qdrant). ``order`` models are
scored exactly with the order-violation similarity, chunked over the collection, since FAISS and vector
databases only know inner products and distances. The order similarity relates an image to a
caption; between two items of the same side (image -> image, text -> caption) the inner product of the
embeddings is used.

Models with a similarity network (SGRAF's SGR, SAF) are searched in two stages: an inner-product shortlist
over the pooled embeddings (FAISS, as for cosine models), then the best ``rerank`` of the shortlist are
scored through the network against the query's local sets (its words, or its regions) and returned by that
score. With ``rerank`` >= the collection size the result is the network's exact ranking; below it, what the
shortlist missed is never seen. The cost per query is ``rerank`` network evaluations.

Image queries are checked before they are decoded in full: their header's size must fit a pixel limit and an
aspect-ratio limit, and so must the size the model's resize step would make of them (a 100000 x 1 PNG of a
few hundred bytes would otherwise be resized to gigabytes). Decoding and the transform run outside the model
lock; only the forward pass is serialised, so a slow upload never stalls the other queries.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vsekit.data.images import MAX_QUERY_ASPECT_RATIO, MAX_QUERY_IMAGE_PIXELS
from vsekit.index.backends import Backend, open_backend
from vsekit.index.build import check_local_sets, check_model
from vsekit.index.store import (
    TARGETS,
    AnnParams,
    IndexData,
    SearchIndexError,
    exact_top_k,
    inner_product_top_k,
    load_data,
    manifest_params,
    read_manifest,
)
from vsekit.models.local_sets import LocalSets

_ORDER_CHUNK = 4096  # order scoring holds (queries x chunk x D) floats
# Default limits of an image query: pixels before and after the model's resize, and long side / short side
DEFAULT_MAX_IMAGE_PIXELS = MAX_QUERY_IMAGE_PIXELS
DEFAULT_MAX_ASPECT_RATIO = MAX_QUERY_ASPECT_RATIO


class ImageSizeError(SearchIndexError):
    """An image query refused for its size or shape, from its header, before it is decoded in full.
    ``status`` is the HTTP status the server answers with (413: too many pixels, 422: too elongated)."""

    def __init__(self, message: str, status: int = 413) -> None:
        super().__init__(message)
        self.status = status


def image_header_size(path: str | Path) -> tuple[int, int] | None:
    """(width, height) from an image file's header without decoding its pixels; None when PIL cannot even
    read the header (:func:`vsekit.data.images.load_rgb` then says why)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
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


class SearchIndex:
    """An opened index plus the model that embeds queries. Safe to share between threads."""

    def __init__(self, index_dir: str | Path, manifest: dict[str, Any], data: IndexData, embedder,
                 backend: Backend | None = None, rerank: int | None = None) -> None:
        self.index_dir, self.manifest, self.data, self.embedder = Path(index_dir), manifest, data, embedder
        self.backend = backend or open_backend(manifest, data)
        self._row_of_id = {r["id"]: i for i, r in enumerate(data.images)}
        self._model_lock = threading.Lock()
        if rerank is not None and "rerank" not in manifest:
            raise SearchIndexError(f"{index_dir}: rerank applies to models with a similarity network; this index's "
                                   f"model scores by {manifest['similarity']!r}")
        # None: not a similarity network's index (no second stage)
        self.rerank = _check_rerank(rerank if rerank is not None else manifest.get("rerank"))

    @classmethod
    def open(cls, index_dir: str | Path, embedder=None, *, checkpoint: str | Path | None = None,
             device: str = "auto", nprobe: int | None = None, ef_search: int | None = None,
             verify: bool = True, allow_legacy_checkpoint: bool = False, rerank: int | None = None) -> SearchIndex:
        """Open ``index_dir`` with ``embedder``, or with the model at ``checkpoint`` (default: the
        checkpoint recorded in the manifest). A model other than the index's own is refused. With
        ``verify`` (the default) every index file is checked against the sha256 the manifest records.
        ``allow_legacy_checkpoint``: load a checkpoint saved by an older vsekit with full pickle -- only for
        files you trust. ``rerank``: for a similarity network's model, how many shortlisted items each query
        reranks through the network (default: the manifest's)."""
        manifest = read_manifest(index_dir)
        if embedder is None:
            from vsekit.inference import Embedder

            path = checkpoint or manifest.get("checkpoint")
            if not path:
                raise SearchIndexError(f"{index_dir}: the manifest names no checkpoint; pass one")
            # the flag is passed only when set, so this works with an Embedder that does not know it
            legacy = {"allow_legacy": True} if allow_legacy_checkpoint else {}
            embedder = Embedder.from_checkpoint(path, device=device, **legacy)
        check_model(manifest, embedder, index_dir)
        check_local_sets(manifest, embedder, Path(index_dir))
        data = load_data(index_dir, manifest, verify=verify)
        params = AnnParams(**{**asdict(manifest_params(manifest)), **({"nprobe": nprobe} if nprobe else {}),
                              **({"ef_search": ef_search} if ef_search else {})})
        return cls(index_dir, manifest, data, embedder, open_backend(manifest, data, params), rerank=rerank)

    def close(self) -> None:
        """Release the backend's connection (a Qdrant local-mode folder stays locked until then)."""
        self.backend.close()

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
        row = self._row_of_id.get(image_id)
        return None if row is None else self.data.images[row]

    def has_thumbnail(self, image_id: str) -> bool:
        """Whether the index holds a thumbnail of image ``image_id`` (the server links only those)."""
        thumbnails, row = self.data.thumbnails, self._row_of_id.get(image_id)
        return thumbnails is not None and row is not None and thumbnails.has(row)

    def thumbnail(self, image_id: str) -> bytes | None:
        """The index's own JPEG thumbnail of image ``image_id`` (:mod:`vsekit.index.thumbnails`), None when
        there is no such image or it has none; a thumbnail file that must not be sent (a link, not a JPEG,
        truncated) raises :class:`~vsekit.index.thumbnails.ThumbnailError`. Never reads a record's ``path``."""
        thumbnails, row = self.data.thumbnails, self._row_of_id.get(image_id)
        return None if thumbnails is None or row is None else thumbnails.read(row)

    # -- queries ----------------------------------------------------------------------------------------
    def search_text(self, query: str, k: int = 10, target: str = "images") -> list[SearchResult]:
        """Text -> image (or, with ``target="captions"``, text -> caption) search."""
        if not isinstance(query, str) or not query.strip():
            raise SearchIndexError("the query is empty")
        self._check(k, target)
        sets = None
        with self._model_lock:
            if self.learned:
                q, sets = self.embedder.encode_caption_parts([query])
            else:
                q = self.embedder.encode_captions([query])
        return self.search_vectors(q, "captions", target, k, query_sets=sets)[0]

    def search_image(self, image, k: int = 10, target: str = "captions", *,
                     max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                     max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO) -> list[SearchResult]:
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
        if self.learned:
            q, sets = self._embed_image_parts(image)
            return self.search_vectors(q, "images", target, k, query_sets=sets)[0]
        return self.search_vectors(self.embed_image(image), "images", target, k)[0]

    def embed_image(self, image) -> np.ndarray:
        """(1, D) embedding of a PIL image (already checked with :meth:`check_image_size`). The transform runs
        outside the model lock, which guards only the forward pass."""
        self._check_can_embed()
        if getattr(image, "mode", "RGB") != "RGB":
            image = image.convert("RGB")
        batch = self.embedder.eval_transform()(image).unsqueeze(0)
        with self._model_lock, torch.no_grad():
            out = self.embedder.model.encode_images(batch.to(self.embedder.device))
        return out.float().cpu().numpy()

    def _embed_image_parts(self, image):
        """(1, D) embedding and local set of a PIL image, for the rerank of a similarity network."""
        from vsekit.models.local_sets import LocalSetsWriter

        if getattr(image, "mode", "RGB") != "RGB":
            image = image.convert("RGB")
        batch = self.embedder.eval_transform()(image).unsqueeze(0)
        with self._model_lock, torch.no_grad():
            emb, ctx = self.embedder.model.encode_image_parts(batch.to(self.embedder.device))
        writer = LocalSetsWriter()
        writer.append(ctx, torch.full((1,), ctx.shape[1], dtype=torch.long))
        return emb.float().cpu().numpy(), writer.finish()

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

    def check_image_size(self, width: int, height: int, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                         max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO) -> None:
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
        wanted = _check_rerank(rerank) if rerank is not None else self.rerank
        depth = min(max(wanted, k), len(self.data.vectors(target)))  # never fewer than the k asked for
        _, short = self._top_k(queries, query_side, target, depth)  # inner product, FAISS when there is one
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
        if target == "images":  # caption queries: sim(images, captions).T

            def block(a: int, b: int) -> np.ndarray:
                return sim(torch.from_numpy(np.array(vectors[a:b])), q).T.numpy()
        else:  # image queries against captions

            def block(a: int, b: int) -> np.ndarray:
                return sim(q, torch.from_numpy(np.array(vectors[a:b]))).numpy()

        return exact_top_k(block, len(vectors), k, chunk=_ORDER_CHUNK)

    def _results(self, scores: np.ndarray, rows: np.ndarray, target: str) -> list[SearchResult]:
        out = []
        for s, r in zip(scores.tolist(), rows.tolist()):
            if r < 0:  # a backend pads with -1 when an approximate search finds fewer than k
                continue
            if target == "images":
                rec = self.data.images[r]
                caps = rec.get("captions") or []
                out.append(SearchResult(len(out) + 1, float(s), target, rec["id"], rec["id"], rec.get("path"),
                                        caps[0] if caps else None))
            else:
                rec = self.data.captions[r]
                img = self.image_record(rec["image"]) or {}
                out.append(SearchResult(len(out) + 1, float(s), target, rec["id"], rec["image"],
                                        img.get("path"), rec["text"]))
        return out


def _check_rerank(rerank: Any) -> int | None:
    if rerank is None:
        return None
    if isinstance(rerank, bool) or not isinstance(rerank, (int, np.integer)) or rerank < 1:
        raise SearchIndexError(f"rerank must be a positive integer, got {rerank!r}")
    return int(rerank)


def _stack(rows: list[np.ndarray], k: int, dtype: Any, fill: Any) -> np.ndarray:
    """Rows of up to ``k`` entries as one (Q, k) array, short rows padded with ``fill`` (FAISS's -1 rows)."""
    out = np.full((len(rows), k), fill, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out
