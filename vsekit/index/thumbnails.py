"""The index's own thumbnails: the only image bytes the server sends.

Every image is decoded once more (:func:`load_rgb`), scaled down to at most ``max_side`` pixels on its long
side and **re-encoded as a baseline JPEG from its RGB pixels** (why: docs/search.md, "Thumbnails").

Layout, in each generation folder (committed, checksummed and replaced with the rest of it)::

    images.thumbs       the JPEG files of the images, one after the other
    images.thumbs.npy   (N, 2) int64: offset and size in ``images.thumbs`` of row i's JPEG (size 0: none)

Opening an index treats its folder as hostile: no link is followed, only a regular file checked against its
size and sha256 through the descriptor then held open is read (:class:`Pack`), and only bytes inside it that
start and end like the JPEGs written here are sent (:meth:`Pack.read`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import shutil
import stat
import threading
import weakref
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vsekit.errors import VsekitError

log = logging.getLogger(__name__)

PACK = "images.thumbs"
TABLE = "images.thumbs.npy"
FILE_NAMES = (PACK, TABLE)
STAGING = "thumbnails"  # work folders ".thumbnails.building-<pid>-<hex>" in the index folder
FORMAT = "jpeg"
MEDIA_TYPE = "image/jpeg"
DEFAULT_MAX_SIDE = 256
MAX_SIDE_LIMIT = 1024  # a thumbnail, not a copy of the photo
MAX_THUMBNAIL_BYTES = 4 << 20  # a 1024 x 1024 JPEG of noise at quality 85 is well under this
JPEG_QUALITY = 85
# What every JPEG written here starts with (SOI, then a 16-byte JFIF APP0 segment) and ends with (EOI)
_JPEG_START, _JPEG_END = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", b"\xff\xd9"
_CHUNK = 256  # images handed to the worker threads at a time
_COPY_BLOCK = 8 << 20


class ThumbnailError(VsekitError, ValueError):
    """A thumbnail that cannot be made or must not be sent; the message names the file (for the log, not
    for HTTP clients)."""


def check_max_side(max_side: Any, error: type[Exception] = ThumbnailError) -> int:
    """``max_side`` as an int in 1..:data:`MAX_SIDE_LIMIT`, else an ``error`` saying so."""
    if isinstance(max_side, bool) or not isinstance(max_side, (int, np.integer)) or not 1 <= max_side <= MAX_SIDE_LIMIT:
        raise error(f"thumbnail size must be 1..{MAX_SIDE_LIMIT} pixels (0 or none: no thumbnails), "
                    f"got {max_side!r}")
    return int(max_side)


def is_jpeg(data: bytes) -> bool:
    """Whether ``data`` starts and ends like the JPEG files this module writes (a JFIF JPEG)."""
    return len(data) > len(_JPEG_START) + len(_JPEG_END) and data.startswith(_JPEG_START) and data.endswith(_JPEG_END)


def make_thumbnail(path: Any, max_side: int) -> bytes:
    """A JPEG of the image at ``path`` (a file or a shard member) no larger than ``max_side`` on its long
    side, encoded from its decoded RGB pixels (EXIF orientation applied, as a viewer shows it). Raises
    :class:`~vsekit.data.images.ImageLoadError` for an image that cannot be decoded."""
    from PIL import Image

    from vsekit.data.images import load_rgb

    im = load_rgb(path, exif_transpose=True)
    try:
        im.thumbnail((max_side, max_side), Image.Resampling.BICUBIC, reducing_gap=2.0)  # never enlarges
        im.info = {}  # nothing of the source (comment, ICC profile, EXIF) is written back out
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=JPEG_QUALITY, optimize=False, progressive=False)
    finally:
        im.close()
    data = buf.getvalue()
    if len(data) > MAX_THUMBNAIL_BYTES:  # cannot happen at MAX_SIDE_LIMIT; the reader refuses it anyway
        raise ThumbnailError(f"{path}: thumbnail of {len(data)} bytes (at most {MAX_THUMBNAIL_BYTES})")
    return data


# -- opening files without following links ------------------------------------------------------------------
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_READ_FLAGS = os.O_RDONLY | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(
    os, "O_BINARY", 0)  # O_NONBLOCK: opening a FIFO put in a file's place must not hang the reader


def open_regular(base: Path, *parts: str) -> int:
    """A read-only descriptor of the regular file ``base/parts...``, refusing a symlink at any of ``parts``
    (``base`` is the index folder, which may itself be a link the operator made) and anything that is not a
    regular file (a FIFO, a device, a folder). Raises OSError."""
    if os.open in os.supports_dir_fd and _NOFOLLOW:
        fd = os.open(base, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
        try:
            for part in parts[:-1]:
                sub = os.open(part, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _NOFOLLOW
                              | getattr(os, "O_CLOEXEC", 0), dir_fd=fd)
                os.close(fd)
                fd = sub
            out = os.open(parts[-1], _READ_FLAGS, dir_fd=fd)
        finally:
            os.close(fd)
    else:  # pragma: no cover - no dir_fd / O_NOFOLLOW (Windows): refuse links by lstat, then open
        path = Path(base, *parts)
        for i in range(1, len(parts) + 1):
            if Path(base, *parts[:i]).is_symlink():
                raise OSError(f"{Path(base, *parts[:i])}: a symbolic link")
        out = os.open(path, _READ_FLAGS)
    try:
        if not stat.S_ISREG(os.fstat(out).st_mode):
            raise OSError(f"{Path(base, *parts)}: not a regular file")
    except BaseException:
        os.close(out)
        raise
    return out


def _pread_all(fd: int, size: int, offset: int) -> bytes:
    parts, got = [], 0
    while got < size:
        chunk = os.pread(fd, size - got, offset + got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


# -- a set of thumbnails ------------------------------------------------------------------------------------
class Pack:
    """One file of thumbnails, held open: a descriptor of a regular file opened without following links
    (:func:`open_regular`), read with ``pread`` from any thread. Holding it open is what makes the bytes
    read later those that were checked when the index was opened, whatever is renamed into the folder since
    (a symlink, another file), and keeps a running server's thumbnails readable after a writer deletes the
    generation they belong to (as the memory maps of its vectors are)."""

    def __init__(self, base: Path, *parts: str) -> None:
        self.path = Path(base, *parts)
        try:
            self.fd = open_regular(base, *parts)
        except OSError as e:
            raise ThumbnailError(f"{self.path}: cannot open the thumbnails ({e.strerror or e}); a link or "
                                 "anything but a regular file is refused") from None
        self._close = weakref.finalize(self, os.close, self.fd)

    def close(self) -> None:
        self._close()

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def sha256(self) -> str:
        digest, pos = hashlib.sha256(), 0
        while chunk := os.pread(self.fd, _COPY_BLOCK, pos):
            digest.update(chunk)
            pos += len(chunk)
        return digest.hexdigest()

    def read(self, offset: int, size: int, row: int) -> bytes:
        """The JPEG of ``row`` at ``offset``: at most :data:`MAX_THUMBNAIL_BYTES`, inside the file as it is
        now, and starting and ending like a JPEG, else a ThumbnailError naming the file (for the log)."""
        if not (0 <= offset and 0 < size <= MAX_THUMBNAIL_BYTES):
            raise ThumbnailError(f"{self.path}: row {row}: a thumbnail of {size} bytes at {offset} is out of bounds")
        try:
            if self.size() < offset + size:
                raise ThumbnailError(f"{self.path}: shorter than its table says (truncated since it was opened)")
            data = _pread_all(self.fd, size, offset)
        except OSError as e:
            raise ThumbnailError(f"{self.path}: cannot read the thumbnails ({e.strerror or e})") from None
        if len(data) != size or not is_jpeg(data):
            raise ThumbnailError(f"{self.path}: row {row}: the bytes are not a JPEG thumbnail (altered since the "
                                 "index was opened)")
        return data


@dataclass
class Thumbnails:
    """The thumbnails of N images: row i's JPEG is ``table[i, 1]`` bytes at ``table[i, 0]`` of the open pack
    ``packs[source[i]]`` (size 0: that image has none). ``subset`` and ``concat`` only move rows; :meth:`write`
    copies the bytes into one new pack."""

    packs: list[Pack]
    source: np.ndarray  # (N,) int64
    table: np.ndarray  # (N, 2) int64 offset, size
    max_side: int

    def __len__(self) -> int:
        return len(self.table)

    @property
    def count(self) -> int:
        """Rows that have a thumbnail."""
        return int((self.table[:, 1] > 0).sum()) if len(self.table) else 0

    def has(self, row: int) -> bool:
        return 0 <= row < len(self.table) and int(self.table[row, 1]) > 0

    @classmethod
    def empty(cls, n: int, max_side: int) -> Thumbnails:
        """N rows without a thumbnail (the images of an index that had none, or that could not be decoded)."""
        return cls([], np.zeros(n, np.int64), np.zeros((n, 2), np.int64), max_side)

    def subset(self, rows: Sequence[int] | np.ndarray) -> Thumbnails:
        rows = np.asarray(rows, dtype=np.int64)
        return Thumbnails(self.packs, self.source[rows], self.table[rows], self.max_side)

    @staticmethod
    def concat(parts: Sequence[Thumbnails]) -> Thumbnails:
        """The rows of ``parts`` (at least one) in order."""
        packs: list[Pack] = []
        sources = []
        for p in parts:
            sources.append(p.source + len(packs))
            packs.extend(p.packs)
        return Thumbnails(packs, np.concatenate(sources), np.concatenate([p.table for p in parts]),
                          parts[0].max_side)

    def read(self, row: int) -> bytes | None:
        """Row ``row``'s JPEG, or None when it has none. Raises :class:`ThumbnailError` (naming the file, for
        the log) when the pack is shorter than the table says or the bytes there are not a JPEG: a folder
        someone tampered with leaks nothing."""
        if not self.has(row):
            return None
        offset, size = (int(v) for v in self.table[row])
        return self.packs[int(self.source[row])].read(offset, size, row)

    def write(self, folder: Path) -> None:
        """Write the rows as ``folder/images.thumbs`` and ``folder/images.thumbs.npy``, one new pack; every
        thumbnail copied is checked as :meth:`read` checks it."""
        table = _write_pack(folder / PACK, len(self), ((row, self.read(row)) for row in range(len(self))))
        with open(folder / TABLE, "wb") as f:
            np.save(f, table, allow_pickle=False)


def _write_pack(path: Path, n: int, thumbnails: Iterable[tuple[int, bytes | None]]) -> np.ndarray:
    """Write the JPEGs of ``(row, bytes or None)`` one after the other into ``path``; returns the (n, 2) table
    of their offsets and sizes (size 0: a row that has none)."""
    table, pos = np.zeros((n, 2), np.int64), 0
    with open(path, "wb") as out:
        for row, data in thumbnails:
            if data:
                out.write(data)
                table[row] = (pos, len(data))
                pos += len(data)
    return table


def _read_small(base: Path, parts: tuple[str, ...], limit: int) -> bytes:
    """All of a small regular file (opened as :func:`open_regular` does), refused past ``limit`` bytes."""
    fd = open_regular(base, *parts)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise OSError(f"{size} bytes, more than a table of this index can have")
        return _pread_all(fd, size, 0)
    finally:
        os.close(fd)


def load(index_dir: Path, generation: str, n: int, max_side: int,
         files: dict[str, dict[str, Any]] | None) -> Thumbnails:
    """The thumbnails of a committed generation of ``n`` images: the pack held open (:class:`Pack`) and the
    table read, both checked against the sizes and sha256 in ``files`` (when given) through the very
    descriptors they are read from, then the table checked: (n, 2) integers inside the pack, none too large."""
    path = Path(index_dir) / generation / TABLE
    try:
        raw = _read_small(Path(index_dir), (generation, TABLE), 1024 + 16 * n)
    except OSError as e:
        raise ThumbnailError(f"{path}: cannot read the thumbnail table ({e.strerror or e})") from None
    pack = Pack(Path(index_dir), generation, PACK)
    if files is not None:
        check_record(path, len(raw), lambda: hashlib.sha256(raw).hexdigest(), files[TABLE])
        check_record(pack.path, pack.size(), pack.sha256, files[PACK])
    try:
        table = np.load(io.BytesIO(raw), allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ThumbnailError(f"{path}: unreadable thumbnail table ({e})") from None
    if table.shape != (n, 2) or not np.issubdtype(table.dtype, np.integer):
        raise ThumbnailError(f"{path}: corrupt index file: a {table.dtype} array of shape {table.shape}, not "
                             f"({n}, 2) offsets and sizes")
    table = np.asarray(table, dtype=np.int64)
    off, size, pack_size = table[:, 0], table[:, 1], pack.size()
    if n and ((off < 0).any() or (size < 0).any() or (size > MAX_THUMBNAIL_BYTES).any()
              or (off + size > pack_size).any()):
        raise ThumbnailError(f"{path}: corrupt index file: offsets or sizes outside {PACK} ({pack_size} bytes)")
    return Thumbnails([pack], np.zeros(n, np.int64), table, max_side)


def check_record(path: Path, size: int, digest, rec: dict[str, Any],
                 error: type[Exception] = ThumbnailError) -> None:
    """Size, then sha256 (``digest()``, computed only when the size matches), as the manifest records them;
    a mismatch is an ``error`` naming ``path``."""
    if size != rec["bytes"]:
        raise error(f"{path}: corrupt index file: {size} bytes, but the manifest records {rec['bytes']} "
                             "(truncated or altered)")
    if (got := digest()) != rec["sha256"]:
        raise error(f"{path}: corrupt index file: its sha256 is {got[:16]}..., but the manifest records "
                             f"{rec['sha256'][:16]}... (the file was altered)")


# -- making them --------------------------------------------------------------------------------------------
def _thumbnail_or_none(path: Any, max_side: int) -> bytes | None:
    from vsekit.data.images import ImageLoadError

    try:
        return make_thumbnail(path, max_side)
    except (ImageLoadError, ThumbnailError) as e:
        log.warning("no thumbnail: %s", e)
        return None


def make_all(paths: Sequence[Any], max_side: int, folder: Path,
             stop: threading.Event | None = None) -> Thumbnails:
    """Thumbnails of the images at ``paths``, written into a pack in ``folder`` (a work folder the caller
    owns), by a few threads (decoding and encoding release the GIL). An image that cannot be decoded
    gets none (with a warning naming it). ``stop`` set: give up between chunks (returns what is done)."""
    max_side = check_max_side(max_side)
    workers = max(1, min(4, (os.cpu_count() or 1) // 2))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="thumbnails") as pool:

        def made() -> Iterator[tuple[int, bytes | None]]:
            for a in range(0, len(paths), _CHUNK):
                if stop is not None and stop.is_set():
                    return
                block = paths[a: a + _CHUNK]
                yield from enumerate(pool.map(lambda p: _thumbnail_or_none(p, max_side), block), a)

        table = _write_pack(folder / PACK, len(paths), made())
    return Thumbnails([Pack(folder, PACK)], np.zeros(len(paths), np.int64), table, max_side)


@contextlib.contextmanager
def background(paths: Sequence[Any], max_side: int, folder: Path) -> Iterator[Future[Thumbnails]]:
    """:func:`make_all` in a thread, while the caller encodes the same images: ``with background(...) as bg:
    ...; thumbs = bg.result()``. Leaving the block early (an error) stops it and waits for it."""
    stop = threading.Event()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="vsekit-thumbnails") as pool:
        try:
            yield pool.submit(make_all, paths, max_side, folder, stop)
        finally:
            stop.set()


@contextlib.contextmanager
def staging(index_dir: Path) -> Iterator[Path]:
    """A work folder in ``index_dir`` for thumbnails made before the generation that holds them is written
    (removed afterwards; leftovers of killed writers go with the next write's clean-up)."""
    from vsekit.utils.fs import make_work_dir, remove_stale_work

    remove_stale_work(Path(index_dir) / STAGING)
    work = make_work_dir(Path(index_dir) / STAGING)
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)
