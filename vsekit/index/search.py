"""Querying an index: text -> image, image -> text and image -> image search.

Scores are the model's own similarity. Inner-product (``cosine``) models are searched with the index's
FAISS structure. ``order`` models are scored exactly with the order-violation similarity, chunked over the
collection, since FAISS only knows inner products and L2. The order similarity relates an image to a
caption; between two items of the same side (image -> image, text -> caption) the inner product of the
embeddings is used.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vsekit.index.build import check_model
from vsekit.index.store import (
    TARGETS,
    AnnParams,
    IndexData,
    SearchIndexError,
    exact_top_k,
    inner_product_top_k,
    load_data,
    read_manifest,
    set_search_params,
)

_ORDER_CHUNK = 4096  # order scoring holds (queries x chunk x D) floats


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

    def __init__(self, index_dir: str | Path, manifest: dict[str, Any], data: IndexData, embedder) -> None:
        self.index_dir, self.manifest, self.data, self.embedder = Path(index_dir), manifest, data, embedder
        self._row_of_id = {r["id"]: i for i, r in enumerate(data.images)}
        self._model_lock = threading.Lock()

    @classmethod
    def open(cls, index_dir: str | Path, embedder=None, *, checkpoint: str | Path | None = None,
             device: str = "auto", nprobe: int | None = None, ef_search: int | None = None) -> SearchIndex:
        """Open ``index_dir`` with ``embedder``, or with the model at ``checkpoint`` (default: the
        checkpoint recorded in the manifest). A model other than the index's own is refused."""
        manifest = read_manifest(index_dir)
        if embedder is None:
            from vsekit.inference import Embedder

            path = checkpoint or manifest.get("checkpoint")
            if not path:
                raise SearchIndexError(f"{index_dir}: the manifest names no checkpoint; pass one")
            embedder = Embedder.from_checkpoint(path, device=device)
        check_model(manifest, embedder, index_dir)
        data = load_data(index_dir, manifest)
        if nprobe is not None or ef_search is not None:
            base = AnnParams(**manifest.get("params", {}))
            params = AnnParams(**{**asdict(base), **({"nprobe": nprobe} if nprobe else {}),
                                  **({"ef_search": ef_search} if ef_search else {})})
            for index in data.faiss.values():
                set_search_params(index, params)
        return cls(index_dir, manifest, data, embedder)

    # -- facts ------------------------------------------------------------------------------------------
    @property
    def num_images(self) -> int:
        return len(self.data.images)

    @property
    def num_captions(self) -> int:
        return len(self.data.captions or [])

    @property
    def has_captions(self) -> bool:
        return self.data.caption_vectors is not None and self.num_captions > 0

    @property
    def can_embed_images(self) -> bool:
        return not self.embedder.reads_features

    @property
    def similarity(self) -> str:
        return self.manifest["similarity"]

    def image_record(self, image_id: str) -> dict[str, Any] | None:
        row = self._row_of_id.get(image_id)
        return None if row is None else self.data.images[row]

    # -- queries ----------------------------------------------------------------------------------------
    def search_text(self, query: str, k: int = 10, target: str = "images") -> list[SearchResult]:
        """Text -> image (or, with ``target="captions"``, text -> caption) search."""
        if not isinstance(query, str) or not query.strip():
            raise SearchIndexError("the query is empty")
        self._check(k, target)
        with self._model_lock:
            q = self.embedder.encode_captions([query])
        return self.search_vectors(q, "captions", target, k)[0]

    def search_image(self, image, k: int = 10, target: str = "captions") -> list[SearchResult]:
        """Image -> text (``target="captions"``) or image -> image search. ``image`` is a PIL image or a path."""
        self._check(k, target)
        if not self.can_embed_images:
            raise SearchIndexError("this index's model reads precomputed features; it cannot embed an image file")
        if isinstance(image, (str, Path)):
            from vsekit.data.images import load_rgb

            image = load_rgb(image, exif_transpose=True)
        elif getattr(image, "mode", "RGB") != "RGB":
            image = image.convert("RGB")
        with self._model_lock:
            q = self.embedder.encode_pil_images([image])
        return self.search_vectors(q, "images", target, k)[0]

    def _check(self, k: int, target: str) -> None:
        if target not in TARGETS:
            raise SearchIndexError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise SearchIndexError(f"k must be a positive integer, got {k!r}")
        if target == "captions" and not self.has_captions:
            raise SearchIndexError("this index holds no captions to return; rebuild it from a data set with "
                                   "--captions, or search images (--target images)")

    def search_vectors(self, queries: np.ndarray, query_side: str, target: str, k: int) -> list[list[SearchResult]]:
        """Top-``k`` hits for each row of ``queries`` (embeddings of ``query_side``: "images"/"captions")."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        vectors = self.data.vectors(target)
        n = len(vectors)
        if n == 0:
            return [[] for _ in queries]
        k = min(int(k), n)
        scores, rows = self._top_k(queries, query_side, target, k)
        return [self._results(s, r, target) for s, r in zip(scores, rows)]

    def _top_k(self, queries: np.ndarray, query_side: str, target: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        vectors = self.data.vectors(target)
        if self.similarity == "cosine":
            index = self.data.faiss.get(target)
            if index is not None:
                return index.search(queries, k)
            return inner_product_top_k(vectors, queries, k)
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
            if r < 0:  # FAISS pads with -1 when an approximate search finds fewer than k
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
