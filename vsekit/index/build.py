"""Building and updating an index: encode a collection once, then add or remove images incrementally.

Only images whose files are not in the index yet are encoded on ``add``; ``remove`` needs no model at all.
An index remembers the fingerprint of the weights that made it, and every operation that embeds new
inputs refuses a model with another fingerprint: embeddings of two models do not share a space.

Where the vectors go is the backend's business (:mod:`vsekit.index.backends`); this module encodes, keeps
the records and commits each generation. Besides, the index keeps the local sets of a model whose similarity
is a network (the search reranks through it: :mod:`vsekit.index.search`), and the JPEG thumbnails of image
files (:mod:`vsekit.index.thumbnails`), made by a few threads while the model encodes the same images.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import itertools
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vsekit.data.corpus import Corpus, DataError
from vsekit.index import thumbnails as thumbs
from vsekit.index.backends import Backend, BackendConfig, create_backend, manifest_backend, open_backend
from vsekit.index.backends.numpy import LocalConfig
from vsekit.index.data import KINDS, TARGETS, AnnParams, IndexData, IndexMismatchError, SearchIndexError
from vsekit.index.generations import load_data, write_index, write_lock
from vsekit.index.manifest import MANIFEST, read_manifest
from vsekit.models.local_sets import DTYPES, LocalSets
from vsekit.utils import distributed
from vsekit.utils.fs import is_stale_work

DEFAULT_RERANK = 100  # similarity networks: shortlisted items reranked through the network per query

log = logging.getLogger(__name__)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def corpus_from_folder(folder: str | Path) -> Corpus:
    """Every image file under ``folder`` (recursively), with its path relative to ``folder`` as its id and
    the lines of a same-named ``.txt`` as its captions (the ``folder`` data source). Unreadable files are
    skipped with a warning naming them: one bad photo should not stop an index build."""
    from vsekit.data.sources import FolderData, load_split

    if not Path(folder).is_dir():
        raise DataError(f"--images {folder}: not a folder")
    return load_split(FolderData(path=str(folder), skip_missing_images=True), "all")


def check_model(manifest: dict[str, Any], embedder, index_dir: str | Path) -> None:
    """Refuse a model whose weights (or similarity) differ from the ones the index was built with."""
    if embedder.fingerprint == manifest["fingerprint"] and embedder.similarity != manifest["similarity"]:
        raise IndexMismatchError(
            f"{index_dir} was built for {manifest['similarity']!r} similarity, but the model given scores with "
            f"{embedder.similarity!r} (same weights, fingerprint {embedder.fingerprint}, another config)")
    if embedder.fingerprint != manifest["fingerprint"]:
        raise IndexMismatchError(
            f"{index_dir} was built with checkpoint {manifest.get('checkpoint')} (fingerprint "
            f"{manifest['fingerprint']}), but the model given is {embedder.checkpoint_path} "
            f"(fingerprint {embedder.fingerprint}); their embeddings are not comparable. Use the index's own "
            "checkpoint, or build a new index with this one."
        )


def _check_can_encode(embedder, corpus: Corpus) -> None:
    if embedder.reads_features and not corpus.is_precomputed:
        raise SearchIndexError("this model reads precomputed features; it cannot embed image files. "
                               "Index a precomputed-feature data set (--data FOLDER) instead")
    if not embedder.reads_features and corpus.is_precomputed:
        raise SearchIndexError(f"{corpus.name} holds precomputed features, but this model embeds raw images")


def _image_records(corpus: Corpus, rows: Sequence[int], ids: Sequence[str]) -> list[dict[str, Any]]:
    caps: dict[int, list[str]] = {}
    for j, i in enumerate(corpus.caption_to_image.tolist()):
        caps.setdefault(i, []).append(corpus.captions[j])
    return [{"id": ids[k],
             "path": None if corpus.image_paths is None else str(Path(corpus.image_paths[r]).resolve()),
             "captions": caps.get(r, [])} for k, r in enumerate(rows)]


def _caption_rows(corpus: Corpus, rows: Sequence[int], ids: Sequence[str],
                  embedder: Any) -> tuple[list[int], list[dict]]:
    """Caption indices of the given image rows (corpus order) and their records; a caption's id is
    ``<image id>#<k>``, unique because image ids are (``k`` counts every caption of the image).

    A caption with no word the ``embedder`` knows is not indexed, with one warning (why: docs/search.md)."""
    known = None if embedder.reads_text_features else embedder.known_words  # text features have no words
    id_of_row = dict(zip(rows, ids))
    seen: dict[int, int] = {}
    index, records, unknown = [], [], []
    for j, i in enumerate(corpus.caption_to_image.tolist()):
        if i in id_of_row:
            k = seen[i] = seen.get(i, -1) + 1
            if known is not None and known(corpus.captions[j]) == 0:
                unknown.append(f"{id_of_row[i]}#{k}")
                continue
            index.append(j)
            records.append({"id": f"{id_of_row[i]}#{k}", "text": corpus.captions[j], "image": id_of_row[i]})
    if unknown:
        log.warning("%d caption(s) with no word the model knows were not indexed (their embedding would match any "
                    "query): %s%s", len(unknown), ", ".join(unknown[:5]), ", ..." if len(unknown) > 5 else "")
    return index, records


def _encode_any(embedder, corpus: Corpus, rows: Sequence[int], caption_index: Sequence[int] | None,
                batch_size: int, progress: bool, dtype: str) -> tuple[np.ndarray | None, np.ndarray | None,
                                                                      dict[str, LocalSets]]:
    """Embeddings of the given images and captions, and for a model with a similarity network their local sets.

    Under torchrun each process encodes a contiguous block of the images and one of the captions
    (:func:`~vsekit.utils.distributed.map_blocks`); rank 0 gets them all, in order, the others (None, None, {})."""
    learned = embedder.learned_similarity
    opts = {"batch_size": batch_size, "progress": progress, "parts": learned, "dtype": dtype}

    def encoded(encode: Callable[[Sequence[int]], Any], items: Sequence[int]) -> tuple[Any, LocalSets | None]:
        block = encode if learned else lambda b: (encode(b), None)  # (embeddings, local sets) either way
        return distributed.map_blocks(block, items, _join_blocks) or (None, None)

    img, img_sets = encoded(lambda b: embedder.encode_images(corpus, rows=b, **opts), rows)
    cap, cap_sets = (None, None) if caption_index is None else encoded(
        lambda b: embedder.encode_texts([corpus.captions[j] for j in b], **opts), caption_index)
    sets = {t: v for t, v in (("images", img_sets), ("captions", cap_sets)) if v is not None}
    return img, cap, sets


def _join_blocks(parts: list[tuple[np.ndarray, LocalSets | None]]) -> tuple[np.ndarray, LocalSets | None]:
    """The embeddings (and local sets) of consecutive blocks of items, as those of all the items."""
    return (np.concatenate([v for v, _ in parts]),
            None if parts[0][1] is None else LocalSets.concat([s for _, s in parts]))


@contextlib.contextmanager
def _thumbnails_made(index_dir: Path, corpus: Corpus, rows: Sequence[int],
                     max_side: int | None) -> Iterator[Future[thumbs.Thumbnails] | None]:
    """Thumbnails of the given rows made in the background (on rank 0, which writes the index) while the
    ``with`` block encodes them; None when there are to be none (``max_side`` 0 or None, precomputed
    features, another rank). Their work folder in ``index_dir`` lives until the block is left."""
    if not max_side or corpus.image_paths is None or not distributed.world().is_main:
        yield None
        return
    paths = [corpus.image_paths[r] for r in rows]
    with thumbs.staging(index_dir) as work, thumbs.background(paths, max_side, work) as made:
        yield made


def _commit(index_dir: Path, vector_store: Backend, data: IndexData, manifest: dict[str, Any],
            previous: dict[str, Any] | None) -> dict[str, Any]:
    """Write ``data`` as the next generation with the backend's manifest fields, then tell the backend."""
    written = write_index(index_dir, data, {**manifest, **vector_store.manifest_fields()}, previous)
    vector_store.committed()
    return written


def build_index(embedder, corpus: Corpus, out: str | Path, *, kind: str = "exact",
                captions: bool | None = None, params: AnnParams | None = None, batch_size: int = 128,
                progress: bool = True, overwrite: bool = False, source: str | None = None,
                backend: BackendConfig | None = None, rerank: int = DEFAULT_RERANK,
                context_dtype: str = "float32", thumbnail_size: int | None = thumbs.DEFAULT_MAX_SIDE) -> dict[str, Any]:
    """Encode ``corpus`` and write a new index to ``out``; returns its manifest.

    ``captions``: also index the corpus's captions (image -> text search); ``None`` = when it has any.
    Approximate kinds (``ivf``, ``hnsw``) report their recall@10 against exact search in the manifest.
    ``backend``: where the vectors go, :class:`~vsekit.index.backends.LocalConfig` (the default: the index
    folder) or :class:`~vsekit.index.backends.QdrantConfig`. A model with a similarity network: ``rerank``
    (recorded in the manifest, the default of every search) is how many shortlisted items each query reranks
    through the network; ``context_dtype`` how the local sets are stored (``float16`` halves their size; the
    scores then move in the third or fourth decimal). ``thumbnail_size``: the long side, in pixels, of the
    index's JPEG thumbnails; 0 or None: none (an index of precomputed features has none either).

    Under torchrun every process encodes a block of the collection, and rank 0 alone opens the backend and
    writes the index (the others do not touch ``out``); every process returns the manifest."""
    from vsekit.utils.io import check_writable_dir

    out = Path(out)
    # a folder that cannot be written is said now, not after encoding the whole collection
    distributed.run_on_main(lambda: check_writable_dir(out, "index folder", create=False), share=lambda _: None)
    with_captions = _check_build(embedder, corpus, kind, captions, rerank, context_dtype)  # alike on every process
    if thumbnail_size:
        thumbnail_size = thumbs.check_max_side(thumbnail_size, SearchIndexError)
    learned = embedder.learned_similarity
    targets = TARGETS if with_captions else ("images",)
    # the backend first: a refusal (a similarity it cannot rank by, a collection in the way, a server that
    # does not answer) comes before the encoding, not after it; a similarity network's shortlist ranks by the
    # inner product of the pooled embeddings
    vector_store = distributed.run_on_main(
        lambda: _open_output(out, overwrite, backend or LocalConfig(), kind=kind, params=params or AnnParams(),
                             similarity="cosine" if learned else embedder.similarity, targets=targets,
                             config=embedder.config if learned else None),
        share=lambda _: None)
    try:
        rows, ids = list(range(corpus.num_images)), list(corpus.image_ids)
        cap_index, cap_records = _caption_rows(corpus, rows, ids, embedder) if with_captions else (None, None)
        with _thumbnails_made(out, corpus, rows, thumbnail_size) as made:
            img, cap, sets = _encode_any(embedder, corpus, rows, cap_index, batch_size, progress, context_dtype)

            def commit() -> dict[str, Any]:
                manifest = _new_manifest(embedder, int(img.shape[1]), source or corpus.name)
                if learned:
                    manifest.update(rerank=int(rerank), context_dtype=context_dtype)
                data = IndexData(img, _image_records(corpus, rows, ids), cap, cap_records, sets=sets,
                                 thumbnails=made.result() if made is not None else None)
                return _build_and_commit(out, vector_store, data, manifest)

            return distributed.run_on_main(commit)
    finally:
        if vector_store is not None:
            vector_store.close()


def _check_build(embedder, corpus: Corpus, kind: str, captions: bool | None, rerank: Any,
                 context_dtype: str) -> bool:
    """Refuse what a build cannot do, from the arguments alone; returns whether captions are indexed."""
    if kind not in KINDS:
        raise SearchIndexError(f"unknown index kind {kind!r}; known kinds: {', '.join(KINDS)}")
    if captions and not corpus.num_captions:
        raise SearchIndexError(f"{corpus.name} has no captions to index")
    _check_can_encode(embedder, corpus)
    if embedder.learned_similarity:
        check_rerank(rerank)
        if context_dtype not in DTYPES:
            raise SearchIndexError(f"context dtype must be {' or '.join(DTYPES)}, got {context_dtype!r}")
    return bool(corpus.num_captions) if captions is None else captions


def _open_output(out: Path, overwrite: bool, backend: BackendConfig, *, config=None, **options) -> Backend:
    """The backend a new index at ``out`` writes to, after checking that ``out`` may be written (rank 0's
    part of a build); ``config``: a similarity network's run config, to warn of an untrained shortlist."""
    if config is not None:
        _warn_if_shortlist_untrained(config)
    if (out / MANIFEST).exists() and not overwrite:
        raise SearchIndexError(f"{out} already holds an index; pass --overwrite to replace it, or use "
                               "`vsekit index add` to add images to it")
    if out.exists() and not out.is_dir():
        raise SearchIndexError(f"{out}: exists and is not a folder")
    # what a killed build of this folder left (a lock, dead writers' work folders) does not make it taken
    if out.is_dir() and not (out / MANIFEST).exists() and any(p.name != ".lock" and not is_stale_work(p)
                                                               for p in out.iterdir()):
        raise SearchIndexError(f"{out}: folder is not empty and holds no index; choose a new --out")
    return create_backend(backend, index_dir=out, overwrite=overwrite, **options)


def _new_manifest(embedder, dim: int, source: str) -> dict[str, Any]:
    ckpt = embedder.checkpoint_path
    return {"fingerprint": embedder.fingerprint, "checkpoint": str(Path(ckpt).resolve()) if ckpt else None,
            "similarity": embedder.similarity, "dim": dim, "sources": [source], "created": _now(),
            "updated": _now()}


def _build_and_commit(out: Path, vector_store: Backend, data: IndexData,
                      manifest: dict[str, Any]) -> dict[str, Any]:
    """The backend's build of ``data``, written as the first generation (or replacing the index at ``out``);
    what the backend made outside the folder is undone when the commit does not happen."""
    try:
        data = vector_store.build(data)
        with write_lock(out):
            previous = None
            with contextlib.suppress(SearchIndexError):  # none, or --overwrite replaces a broken one too
                previous = read_manifest(out)
            written = write_index(out, data, {**manifest, **vector_store.manifest_fields()}, previous)
    except BaseException:
        vector_store.discard()
        raise
    vector_store.committed()
    if previous is not None:  # its backend may have left things outside the folder that are no longer used
        manifest_backend(previous).replaced(out, previous, written)
    return written


def check_rerank(rerank: Any) -> int:
    """``rerank`` (a shortlist size) as an int, refused unless it is a positive integer."""
    if isinstance(rerank, bool) or not isinstance(rerank, (int, np.integer)) or rerank < 1:
        raise SearchIndexError(f"rerank must be a positive integer, got {rerank!r}")
    return int(rerank)


def _warn_if_shortlist_untrained(config) -> None:
    """The shortlist ranks by the pooled embeddings; only objective.embedding trains them."""
    stages = [st.objective.get("embedding", {}).get("weight", 0) for st in config.train.stages]
    if not (config.objective.embedding.weight or any(stages)):
        log.warning("this model was trained without objective.embedding, so the pooled embeddings the index "
                    "shortlists with are untrained and the shortlist is close to random: search with a --rerank "
                    "near the collection size, or train with objective.embedding.weight > 0")


def check_local_sets(manifest: dict[str, Any], embedder, index_dir: Path) -> None:
    """An index of a similarity network's model must hold local sets, and only such an index may."""
    if embedder.learned_similarity != ("rerank" in manifest):
        what = "has no local sets for" if embedder.learned_similarity else "holds local sets, not made by"
        raise IndexMismatchError(f"{index_dir} {what} a model with a similarity network; rebuild it with this model")


def _unique(candidate: str, taken: set[str]) -> str:
    names = itertools.chain([candidate], (f"{candidate}~{n}" for n in itertools.count(2)))
    return next(name for name in names if name not in taken)


@dataclass
class _Addition:
    """What ``add`` does, as rank 0 found it under the write lock: the manifest, the corpus rows to add and
    their ids; on rank 0 also the index's data and its backend (not sent to the other processes)."""

    manifest: dict[str, Any]
    rows: list[int]
    ids: list[str]
    old: IndexData | None = None
    vector_store: Backend | None = None

    def shared(self) -> _Addition:
        return _Addition(self.manifest, self.rows, self.ids)


def add_to_index(index_dir: str | Path, embedder, corpus: Corpus, *, batch_size: int = 128,
                 progress: bool = True, source: str | None = None) -> tuple[dict[str, Any], int, int]:
    """Add the images of ``corpus`` that the index does not hold yet (same file, or for precomputed
    features the same id); only those are encoded. Returns (manifest, added, skipped).

    Under torchrun rank 0 alone reads and writes the index (holding its write lock throughout) and every
    process encodes a block of the new images."""
    from vsekit.utils.io import check_writable_dir

    index_dir = Path(index_dir)
    if index_dir.is_dir():  # a folder that cannot be written is said now, not after encoding the new images
        distributed.run_on_main(lambda: check_writable_dir(index_dir, "index folder", create=False),
                                share=lambda _: None)
    with contextlib.ExitStack() as held:  # rank 0's write lock and backend, until the commit
        plan = distributed.run_on_main(lambda: _plan_addition(index_dir, embedder, corpus, held),
                                       share=_Addition.shared)
        skipped = corpus.num_images - len(plan.rows)
        if not plan.rows:
            return plan.manifest, 0, skipped
        with_captions = bool(plan.manifest.get("has_captions"))
        cap_index, cap_records = (_caption_rows(corpus, plan.rows, plan.ids, embedder) if with_captions
                                   else (None, None))
        section = plan.manifest.get("thumbnails")  # an index with thumbnails gets them for the new images
        with _thumbnails_made(index_dir, corpus, plan.rows, section and section["max_side"]) as made:
            img, cap, sets = _encode_any(embedder, corpus, plan.rows, cap_index, batch_size, progress,
                                         plan.manifest.get("context_dtype", "float32"))

            def commit() -> dict[str, Any]:
                new = IndexData(img, _image_records(corpus, plan.rows, plan.ids), cap, cap_records, sets=sets,
                                thumbnails=made.result() if made is not None else None)
                data = plan.vector_store.add(plan.old, new)
                manifest = {**plan.manifest, "updated": _now(),
                            "sources": [*plan.manifest.get("sources", []), source or corpus.name]}
                return _commit(index_dir, plan.vector_store, data, manifest, manifest)

            return distributed.run_on_main(commit), len(plan.rows), skipped


def _plan_addition(index_dir: Path, embedder, corpus: Corpus, held: contextlib.ExitStack) -> _Addition:
    """Take the index's write lock (into ``held``), check the model and find the new images; opens the
    backend (into ``held``) when there are some: a backend that cannot serve says so before encoding."""
    held.enter_context(write_lock(index_dir))
    manifest = read_manifest(index_dir)
    check_model(manifest, embedder, index_dir)
    check_local_sets(manifest, embedder, index_dir)
    _check_can_encode(embedder, corpus)
    old = load_data(index_dir, manifest, mmap=True)
    rows, ids = _new_images(old, corpus)
    plan = _Addition(manifest, rows, ids, old)
    if rows:
        plan.vector_store = open_backend(manifest, old)
        held.callback(plan.vector_store.close)
    return plan


def _new_images(old: IndexData, corpus: Corpus) -> tuple[list[int], list[str]]:
    """Rows of ``corpus`` that the index does not hold yet (same file, or for precomputed features the same
    id), and the ids they get (made unique against the index's)."""
    known_paths = {r["path"] for r in old.images if r.get("path")}
    taken = {r["id"] for r in old.images}
    rows, ids = [], []
    for r in range(corpus.num_images):
        if (str(Path(corpus.image_paths[r]).resolve()) in known_paths if corpus.image_paths is not None
                else corpus.image_ids[r] in taken):
            continue
        new_id = _unique(corpus.image_ids[r], taken)
        taken.add(new_id)
        rows.append(r)
        ids.append(new_id)
    return rows, ids


def remove_from_index(index_dir: str | Path, ids: Iterable[str] = (),
                      paths: Iterable[str | Path] = ()) -> tuple[dict[str, Any], int]:
    """Remove images (and their captions) by id or by file path. Unknown ids or paths are an error and
    nothing is removed. Returns (manifest, number removed); under torchrun rank 0 alone writes."""
    index_dir = Path(index_dir)
    ids, paths = list(ids), [str(Path(p).resolve()) for p in paths]
    if not ids and not paths:
        raise SearchIndexError("nothing to remove: give --ids or --paths")
    return distributed.run_on_main(lambda: _remove(index_dir, ids, paths))


def _remove(index_dir: Path, ids: list[str], paths: list[str]) -> tuple[dict[str, Any], int]:
    with write_lock(index_dir):
        manifest = read_manifest(index_dir)
        old = load_data(index_dir, manifest, mmap=True)
        row_of_id = {r["id"]: i for i, r in enumerate(old.images)}
        row_of_path = {r["path"]: i for i, r in enumerate(old.images) if r.get("path")}
        unknown = [i for i in ids if i not in row_of_id] + [p for p in paths if p not in row_of_path]
        if unknown:
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            raise SearchIndexError(f"{index_dir}: not in the index: {', '.join(unknown[:5])}{more}; nothing removed")
        drop = {row_of_id[i] for i in ids} | {row_of_path[p] for p in paths}
        keep = {"images": np.array([i not in drop for i in range(len(old.images))], dtype=bool)}
        gone = {old.images[i]["id"] for i in drop}
        if old.has_captions:
            keep["captions"] = np.array([c["image"] not in gone for c in old.captions or []], dtype=bool)
        vector_store = open_backend(manifest, old)
        try:
            data = vector_store.remove(old, keep)
            return _commit(index_dir, vector_store, data, {**manifest, "updated": _now()}, manifest), len(drop)
        finally:
            vector_store.close()
