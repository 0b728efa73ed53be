"""Fit LSA caption vectors once per caption set and reuse them across runs.

A fitted folder holds::

    vectors.npy        (M, K) float32, row j <-> caption j
    caption_ids.json   the M caption ids (or null), so rows can be matched back to captions
    model/             the LSAModel (vocabulary.json, idf.npy, components.npy, config.json)
    meta.json          key, parameters, row count; written last, so a folder without it is incomplete

The cache keys a folder by a hash of the captions' text (in order), the parameters and
:data:`~vsekit.semantics.lsa.PIPELINE_VERSION`; a folder whose ``meta.json`` does not match the key and the
row count is refitted. Caption ids are not part of the key: vectors depend on the text only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vsekit.semantics.lsa import (
    DEFAULT_N_COMPONENTS,
    DEFAULT_N_ITER,
    DEFAULT_RANDOM_STATE,
    PIPELINE_VERSION,
    LSAModel,
)
from vsekit.utils.fs import file_lock, make_work_dir, publish_dir, remove_stale_work
from vsekit.utils.io import OutputPathError, atomic_write, atomic_write_json, check_folder_path

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1


class StaleCacheError(ValueError):
    """A cached LSA folder that is incomplete or does not belong to the given captions/parameters."""


def _params(n_components: int, n_iter: int, random_state: int) -> dict[str, int]:
    return {"n_components": int(n_components), "n_iter": int(n_iter), "random_state": int(random_state)}


def caption_set_key(captions: Sequence[str], params: dict[str, Any]) -> str:
    """sha256 (hex) of the pipeline version, the parameters and every caption's text, in order."""
    h = hashlib.sha256()
    h.update(json.dumps({"pipeline": PIPELINE_VERSION, "params": params, "num_captions": len(captions)},
                        sort_keys=True).encode())
    for c in captions:
        b = c.encode("utf-8", "surrogatepass")
        h.update(len(b).to_bytes(8, "little"))  # length prefix: ["ab", "c"] and ["a", "bc"] differ
        h.update(b)
    return h.hexdigest()


def _ids_hash(caption_ids: Sequence[str] | None) -> str | None:
    return None if caption_ids is None else hashlib.sha256(json.dumps(list(caption_ids)).encode()).hexdigest()


def _check_ids(captions: Sequence[str], caption_ids: Sequence[str] | None) -> list[str] | None:
    if caption_ids is None:
        return None
    ids = [str(i) for i in caption_ids]
    if len(ids) != len(captions):
        raise ValueError(f"{len(ids)} caption ids for {len(captions)} captions")
    return ids


def fit_to_folder(captions: Sequence[str], caption_ids: Sequence[str] | None, out_folder: str | Path, *,
                  n_components: int = DEFAULT_N_COMPONENTS, n_iter: int = DEFAULT_N_ITER,
                  random_state: int = DEFAULT_RANDOM_STATE) -> Path:
    """Fit LSA vectors of the TRAINING ``captions`` and write them, the ids and the model to ``out_folder``.

    The entry point of ``vsekit semantics fit``. Every file is written atomically and ``meta.json`` last.
    """
    out = Path(out_folder)
    ids = _check_ids(captions, caption_ids)
    params = _params(n_components, n_iter, random_state)
    t0 = time.perf_counter()
    model, vectors = LSAModel.fit(captions, **params)
    fit_s = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "vectors.npy", lambda f: np.save(f, vectors))
    atomic_write_json(out / "caption_ids.json", ids)
    model.save(out / "model")
    atomic_write_json(out / "meta.json", {
        "format": CACHE_FORMAT, "key": caption_set_key(captions, params),
        "pipeline_version": PIPELINE_VERSION, "params": params, "num_captions": len(captions),
        "n_components": model.n_components, "dtype": "float32", "caption_ids_sha256": _ids_hash(ids),
        "fit_seconds": model.config["fit_seconds"],
    })
    logger.info("LSA caption vectors: %s float32 (%d terms) fitted in %.1fs (%s) -> %s", vectors.shape,
                len(model.vocabulary), fit_s, model.config["fit_seconds"], out)
    return out


def load_caption_vectors(folder: str | Path, *, key: str | None = None, num_captions: int | None = None,
                         mmap: bool = True) -> np.ndarray:
    """The (M, K) float32 vectors of a fitted folder, checked against ``key`` and ``num_captions`` if given.

    Memory-mapped by default: for COCO the array is ~1 GB and LSEH reads only the rows of each batch.
    """
    folder = Path(folder)
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise StaleCacheError(f"{folder}: no readable meta.json ({e})") from e
    if meta.get("format") != CACHE_FORMAT:
        raise StaleCacheError(f"{folder}: cache format {meta.get('format')!r}, expected {CACHE_FORMAT}")
    if key is not None and meta.get("key") != key:
        raise StaleCacheError(f"{folder}: fitted for other captions or parameters")
    rows = meta.get("num_captions")
    if num_captions is not None and rows != num_captions:
        raise StaleCacheError(f"{folder}: {rows} rows for {num_captions} captions")
    try:
        vectors = np.load(folder / "vectors.npy", mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise StaleCacheError(f"{folder}: unreadable vectors.npy ({e})") from e
    if vectors.dtype != np.float32 or vectors.shape != (rows, meta.get("n_components")):
        raise StaleCacheError(f"{folder}: vectors.npy is {vectors.dtype} {vectors.shape}, meta.json says "
                              f"float32 ({rows}, {meta.get('n_components')})")
    return vectors


def fit_or_load_caption_vectors(captions: Sequence[str], caption_ids: Sequence[str] | None,
                                cache_dir: str | Path, *, n_components: int = DEFAULT_N_COMPONENTS,
                                n_iter: int = DEFAULT_N_ITER, random_state: int = DEFAULT_RANDOM_STATE,
                                mmap: bool = True) -> np.ndarray:
    """(M, K) float32 LSA vectors of the training captions, row j <-> caption j, fitted at most once.

    Stored in ``<cache_dir>/lsa-<key>/``; a missing, incomplete or mismatching folder is refitted and
    replaced atomically.
    """
    ids = _check_ids(captions, caption_ids)
    params = _params(n_components, n_iter, random_state)
    key = caption_set_key(captions, params)
    cache_dir = Path(cache_dir)
    check_folder_path(cache_dir, "the LSA cache folder (semantics.cache_dir, or VSEKIT_CACHE/semantics)")
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputPathError(f"the LSA cache folder {cache_dir}: cannot be made ({e.strerror}): point "
                              "semantics.cache_dir or VSEKIT_CACHE at a writable folder") from None
    folder = _cache_folder(cache_dir, key)
    # The lock serialises fits of one key across processes (e.g. data-parallel ranks): one fits, the
    # others wait and then load its folder.
    with file_lock(cache_dir / f".{folder.name}.lock"):
        try:
            vectors = load_caption_vectors(folder, key=key, num_captions=len(captions), mmap=mmap)
        except StaleCacheError as e:
            if folder.exists():
                logger.warning("refitting LSA caption vectors: %s", e)
            remove_stale_work(folder, any_pid=True)  # under the lock: leftovers are of killed fits
            tmp = make_work_dir(folder)
            try:
                fit_to_folder(captions, ids, tmp, **params)
                publish_dir(tmp, folder)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            return load_caption_vectors(folder, key=key, num_captions=len(captions), mmap=mmap)
        meta_path = folder / "meta.json"
        meta = json.loads(meta_path.read_text())
        if ids is not None and meta.get("caption_ids_sha256") != _ids_hash(ids):
            # Same texts in the same order, so the vectors stand; only the row -> id table is refreshed.
            logger.warning("%s: caption ids changed (texts did not); updating caption_ids.json", folder)
            atomic_write_json(folder / "caption_ids.json", ids)
            atomic_write_json(meta_path, {**meta, "caption_ids_sha256": _ids_hash(ids)})
        return vectors


def _cache_folder(cache_dir: Path, key: str) -> Path:
    return cache_dir / f"lsa-{key[:16]}"


def fit_or_load_lsa_model(captions: Sequence[str], cache_dir: str | Path, *,
                          n_components: int = DEFAULT_N_COMPONENTS, n_iter: int = DEFAULT_N_ITER,
                          random_state: int = DEFAULT_RANDOM_STATE) -> LSAModel:
    """The LSA model fitted on ``captions`` (the training captions), from the same cache as
    :func:`fit_or_load_caption_vectors` (fitted at most once per caption set and parameters): to transform
    other captions (evaluation) with the training vocabulary, idf and components."""
    params = _params(n_components, n_iter, random_state)
    fit_or_load_caption_vectors(captions, None, cache_dir, **params)
    return LSAModel.load(_cache_folder(Path(cache_dir), caption_set_key(captions, params)) / "model")
