"""Random access to the members of uncompressed tar archives (webdataset shards), by byte offset.

A member of a plain ``.tar`` file is stored contiguously: once an index records where its data starts, one
``os.pread`` reads it, from any process (data-loader workers included), in any order. That is what lets a
corpus whose images or features live in shards be read row by row like image files or a memory map:
:class:`MemberPath` is an image inside a shard, :class:`ShardFeatures` the (N, ...) feature rows stored as
one ``.npy`` member per image. Before the data, each read checks the member's own tar header (its size and
the ``ustar`` magic), so a shard rewritten after it was indexed is an error, not wrong bytes.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from vsekit.data.corpus import DataError

BLOCK = 512  # a tar header
MAX_MEMBER_BYTES = 1 << 30  # one image or feature row
_BAD_NAME_CHARS = re.compile(r"[\x00-\x1f\x7f\\]")


def check_member_name(shard: str | Path, name: Any) -> str:
    """``name`` if it is a relative member name that stays inside the shard, else a DataError naming both."""
    if not isinstance(name, str) or not name:
        raise DataError(f"{shard}: a member with no name ({name!r})")
    parts = name.split("/")
    why = ("is an absolute path" if name.startswith("/") else
           "climbs out of the shard with '..'" if ".." in parts else
           "holds a backslash or a control character" if _BAD_NAME_CHARS.search(name) else None)
    if why:
        raise DataError(f"{shard}: member {name[:200]!r} {why}; shards hold plain relative names only")
    return name


def _open_checked(archive: str | Path, offset: int, size: int, what: str, read: int) -> tuple[int, bytes]:
    """A descriptor of ``archive`` and the first ``read`` bytes of the member at ``offset``, after checking the
    member's tar header (the ``ustar`` magic and its size) and that the shard still holds all of it."""
    if not 0 <= size <= MAX_MEMBER_BYTES:
        raise DataError(f"{archive}: {what}: member of {size} bytes (at most {MAX_MEMBER_BYTES})")
    if offset < BLOCK:
        raise DataError(f"{archive}: {what}: no tar header before byte {offset}")
    try:  # a descriptor per read: safe in threads and forked workers, and cheap beside decoding an image
        fd = os.open(archive, os.O_RDONLY)
    except OSError as e:
        raise DataError(f"{archive}: cannot open shard ({e.strerror or e})") from None
    try:
        buf = os.pread(fd, BLOCK + read, offset - BLOCK)
        header = buf[:BLOCK]
        try:
            recorded = tarfile.nti(header[124:136])
        except tarfile.InvalidHeaderError:
            recorded = -1
        if (len(buf) != BLOCK + read or header[257:262] != b"ustar" or recorded != size
                or os.fstat(fd).st_size < offset + size):
            raise DataError(f"{archive}: {what} is not where its index says (byte {offset}, {size} bytes): the "
                            "shard was changed or truncated after it was indexed")
    except BaseException:
        os.close(fd)
        raise
    return fd, buf[BLOCK:]


def read_member(archive: str | Path, offset: int, size: int, what: str) -> bytes:
    """The ``size`` bytes of data at ``offset`` of a tar file, after checking the member header before it."""
    fd, data = _open_checked(archive, offset, size, what, size)
    os.close(fd)
    return data


class _MemberReader(io.RawIOBase):
    """A read-only, seekable file of one member's bytes, read on demand (an image header without the rest)."""

    def __init__(self, archive: str, offset: int, size: int, what: str) -> None:
        super().__init__()
        self._fd, _ = _open_checked(archive, offset, size, what, 0)
        self._offset, self._size, self._pos = offset, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = max(0, min(len(b), self._size - self._pos))
        data = os.pread(self._fd, n, self._offset + self._pos) if n else b""
        b[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


@dataclass(frozen=True)
class MemberPath:
    """An image file stored as a member of a tar shard (what ``Corpus.image_paths`` holds for shards)."""

    archive: str
    member: str
    offset: int  # of the member's data
    size: int

    def __post_init__(self) -> None:  # its name becomes part of a path an index records: it stays inside
        check_member_name(self.archive, self.member)

    @property
    def name(self) -> str:
        return PurePosixPath(self.member).name

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.member).suffix

    def read_bytes(self) -> bytes:
        return read_member(self.archive, self.offset, self.size, self.member)

    def open(self) -> io.BufferedReader:
        """The member as a binary file read on demand (close it, or use ``with``)."""
        return io.BufferedReader(_MemberReader(self.archive, self.offset, self.size, self.member), 1 << 16)

    def __str__(self) -> str:  # zipfile.Path's convention: archive/member
        return f"{self.archive}/{self.member}"

    def __fspath__(self) -> str:
        """A path that names the image (an index records it) but is no file: open it with ``load_rgb``."""
        return str(self)


class ShardFeatures:
    """(N, D) or (N, R, D) feature rows, row i one ``.npy`` member of a shard, read on access.

    Enough of the ndarray interface for a :class:`~vsekit.data.corpus.Corpus`: ``shape``, ``dtype``,
    ``ndim``, ``len``, ``x[i]`` (an ndarray), ``x[a:b]`` / ``x[rows]`` (another lazy view) and
    ``np.asarray(x)`` (every row read).
    """

    def __init__(self, files: Sequence[str], shard: np.ndarray, offset: np.ndarray, header: np.ndarray,
                 row_shape: tuple[int, ...], dtype: np.dtype, names: Sequence[str]) -> None:
        self.files, self.names = list(files), names
        self._shard, self._offset, self._header = shard, offset, header  # (N,) each
        self.row_shape, self.dtype = tuple(row_shape), np.dtype(dtype)
        self._nbytes = int(np.prod(self.row_shape)) * self.dtype.itemsize

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self._shard), *self.row_shape)

    @property
    def ndim(self) -> int:
        return 1 + len(self.row_shape)

    def __len__(self) -> int:
        return len(self._shard)

    def _row(self, i: int) -> np.ndarray:
        h = int(self._header[i])
        data = read_member(self.files[self._shard[i]], int(self._offset[i]), h + self._nbytes, self.names[i])
        return np.frombuffer(data, dtype=self.dtype, offset=h).reshape(self.row_shape)

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            i = int(index)
            if not -len(self) <= i < len(self):
                raise IndexError(f"row {i} of {len(self)}")
            return self._row(i % len(self))
        rows = np.arange(len(self))[index]
        if rows.ndim != 1:
            raise IndexError("feature rows are selected by an int, a slice or a 1-D index array")
        return ShardFeatures(self.files, self._shard[rows], self._offset[rows], self._header[rows], self.row_shape,
                             self.dtype, [self.names[int(r)] for r in rows])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = np.empty(self.shape, dtype=self.dtype)
        for i in range(len(self)):
            out[i] = self._row(i)
        return out if dtype is None else out.astype(dtype)


def npy_header(head: bytes, where: str) -> tuple[int, tuple[int, ...], np.dtype]:
    """(header length, shape, dtype) of a ``.npy`` member from its first bytes (no object arrays)."""
    f = io.BytesIO(head)
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    except Exception as e:  # noqa: BLE001 - numpy raises ValueError, SyntaxError, EOFError for bad headers
        raise DataError(f"{where}: not a .npy array ({e})") from None
    if fortran or dtype.hasobject or not (np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer)):
        raise DataError(f"{where}: expected a C-ordered float (or integer) array, got {dtype}"
                        f"{' in Fortran order' if fortran else ''}")
    return f.tell(), tuple(int(s) for s in shape), dtype
