"""The generations of an index folder: each write is a new generation folder, checked on reading against the
manifest that names it.

Layout of an index folder::

    manifest.json            the current generation's folder and checksums (vsekit.index.manifest)
    g000002/images.npy       (N, D) float32 image embeddings; row i belongs to line i of images.jsonl
    g000002/images.jsonl     one {"id", "path", "captions"} record per image
    g000002/captions.*       the same for captions ({"id", "text", "image"}), when captions are indexed
    g000002/images.<ext>     a backend's own files (vsekit.index.backends), e.g. an approximate structure
    g000002/{t}.sets.npy     models with a similarity network: the local vectors (regions, words) of every
    g000002/{t}.offsets.npy  item, packed (vsekit.models.local_sets), which the search reranks with
    g000002/images.thumbs    the index's own JPEG thumbnails of the images, and where each one is
    g000002/images.thumbs.npy   (vsekit.index.thumbnails): the only image bytes the server sends

An index whose vectors live in a vector database holds no ``.npy``, only the records.

Why generations: an index is several files that must change together. Every write goes to a fresh
temporary folder, which is renamed to a new generation name; only then is ``manifest.json`` (one file,
replaced atomically) pointed at it. A crash at any point leaves the old manifest naming the old, untouched
generation; the leftovers are removed by the next successful write.

Why checksums: a truncated or overwritten file must not be served, nor reach a C++ reader (which answers
with an assertion). Opening an index checks every file of the generation against the size and sha256 the
manifest records, and refuses a mismatch (or a manifest without checksums) in one line naming the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vsekit.errors import one_line
from vsekit.index import thumbnails as thumbs
from vsekit.index.backends import backend_files, manifest_backend
from vsekit.index.data import BEFORE_RELEASE, TARGETS, IndexData, SearchIndexError, read_file
from vsekit.index.manifest import GENERATION, MANIFEST, generation_manifest, vectors_in_folder, write_manifest
from vsekit.models.local_sets import LocalSets
from vsekit.utils.fs import file_lock, fsync_dir, fsync_file, make_work_dir, remove_stale_work

# Work folders of writes are ".generation.building-<pid>-<hex>" (vsekit.utils.fs)
_WORK_NAME = "generation"


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
        if (rec := files.get(name)) is None:
            raise SearchIndexError(f"{path}: corrupt index: the manifest records no checksum for this file")
        try:
            thumbs.check_record(path, path.stat().st_size, lambda p=path: file_record(p)["sha256"], rec,
                                SearchIndexError)
        except FileNotFoundError:
            raise SearchIndexError(f"{path}: missing: the index's manifest lists it") from None
        except OSError as e:
            raise SearchIndexError(f"{path}: unreadable ({one_line(e)})") from None


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


def load_data(index_dir: str | Path, manifest: dict[str, Any], *, mmap: bool = True,
              with_ann: bool = True, verify: bool = True) -> IndexData:
    """Read the generation ``manifest`` names. Vectors are memory-mapped unless ``mmap=False``; the backend's
    own structures are read unless ``with_ann=False``. With ``verify`` (the default) every file is first
    checked against the size and sha256 the manifest records."""
    gen = Path(index_dir) / manifest["generation"]
    if not gen.is_dir():
        raise SearchIndexError(f"{gen}: missing: the index's manifest names this generation folder")
    targets = TARGETS if manifest.get("has_captions") else ("images",)
    local = vectors_in_folder(manifest)
    names = [f"{t}.{ext}" for t in targets for ext in (("npy", "jsonl") if local else ("jsonl",))]
    owner = manifest_backend(manifest)
    own = _own_files(gen, manifest, targets, owner.files)
    if verify:
        verify_files(gen, manifest, names + own)
    mode = "r" if mmap else None

    def vectors(target: str) -> np.ndarray:
        path = gen / f"{target}.npy"
        return read_file(path, "vectors", lambda: np.load(path, mmap_mode=mode, allow_pickle=False))

    def records(target: str) -> list[dict[str, Any]]:
        path = gen / f"{target}.jsonl"
        return read_file(path, "records", lambda: _read_jsonl(path, target))

    data = IndexData(vectors("images") if local else None, records("images"))
    if manifest.get("has_captions"):
        data.caption_vectors, data.captions = vectors("captions") if local else None, records("captions")
    if with_ann:
        data.ann = owner.load_files(gen, own, manifest)
    data.sets = _load_sets(gen, manifest, targets, mmap, verify)
    data.thumbnails = _load_thumbnails(Path(index_dir), manifest, len(data.images), verify)
    _check_consistent(gen, manifest, data)
    return data


def _own_files(gen: Path, manifest: dict[str, Any], targets: Sequence[str], exts: dict[str, str]) -> list[str]:
    """The files of the index's backend (``exts``) that the manifest records; a file of another backend is
    refused (an exact index of a vsekit before 0.1.0 held a flat structure beside its vectors)."""
    recorded = [f"{t}.{ext}" for t in targets for ext in backend_files() if f"{t}.{ext}" in manifest["files"]]
    for name in recorded:
        ext = name.split(".", 1)[1]
        if ext not in exts:
            raise SearchIndexError(f"{gen / name}: an {manifest['kind']} index with a {backend_files()[ext]} "
                                   f"file, {BEFORE_RELEASE}")
    return recorded


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


# -- writing ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def write_lock(index_dir: str | Path) -> Iterator[None]:
    """Serialises writers of one index folder (readers need no lock: they follow the manifest)."""
    index_dir = Path(index_dir)
    index_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(index_dir / ".lock"):
        yield


def _save_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def _write_files(folder: Path, data: IndexData) -> None:
    """The generation's files; vectors only when they are here (not in a vector database). The backend's own
    structures (``data.ann``) are its to write."""
    for target in TARGETS if data.has_captions else ("images",):
        vectors = data.image_vectors if target == "images" else data.caption_vectors
        if vectors is not None:
            np.save(folder / f"{target}.npy", np.ascontiguousarray(vectors, dtype=np.float32))
        _save_jsonl(folder / f"{target}.jsonl", data.records(target))
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
        out[target] = read_file(gen / names[0], "local sets",
                                lambda t=target: LocalSets.load(gen, t, mmap=mmap))
    return out


def _load_thumbnails(index_dir: Path, manifest: dict[str, Any], n: int, verify: bool) -> thumbs.Thumbnails | None:
    """The thumbnails of the current generation (with ``verify``, checked against their checksums), or None."""
    section = manifest.get("thumbnails")
    if section is None:
        return None
    if section["generation"] != manifest["generation"]:
        raise SearchIndexError(f"{index_dir / MANIFEST}: thumbnails of generation {section['generation']}, not the "
                               f"current one: an index {BEFORE_RELEASE}")
    try:  # checked through the descriptors they are read from: no file can be swapped in between
        return thumbs.load(index_dir, manifest["generation"], n, section["max_side"],
                           section["files"] if verify else None)
    except thumbs.ThumbnailError as e:
        raise SearchIndexError(str(e)) from None


def _next_generation(index_dir: Path, manifest: dict[str, Any] | None) -> str:
    n = 1
    if manifest and (m := GENERATION.match(manifest.get("generation", ""))):
        n = int(m.group(1)) + 1
    while (index_dir / f"g{n:06d}").exists():  # a crashed write may have left this name behind
        n += 1
    return f"g{n:06d}"


def write_index(index_dir: str | Path, data: IndexData, manifest: dict[str, Any],
                previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``data`` as a new generation and point the manifest at it; returns the manifest written. Call
    under :func:`write_lock`. ``previous`` is the manifest being replaced, if any."""
    index_dir = Path(index_dir)
    index_dir.mkdir(parents=True, exist_ok=True)
    # The generation's name is picked once its files are written, so the work folder is named after a
    # placeholder; it is made with the umask's permissions (a server may run as another user).
    tmp = make_work_dir(index_dir / _WORK_NAME)
    gen = None
    try:
        try:
            _write_files(tmp, data)
            if data.ann:
                manifest_backend(manifest).save_files(tmp, data)
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
        manifest = generation_manifest(manifest, gen, data, files, thumb_files)
        write_manifest(index_dir, manifest)  # the commit point
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
        if p.name != keep and p.is_dir() and GENERATION.match(p.name):
            shutil.rmtree(p, ignore_errors=True)
    remove_stale_work(index_dir / _WORK_NAME, any_pid=True)
    remove_stale_work(index_dir / thumbs.STAGING)  # a build stages thumbnails without the lock: dead ones only
