"""Small I/O helpers: atomic writes.

An atomic write goes to a temporary file next to its target, which is fsynced and renamed over it. It only
ever replaces a regular file (or creates a missing one): a symlink, a device node (``/dev/full``), a FIFO or a
folder at the target is refused, since a rename would destroy it and put a plain file in its place. The new
file gets the permissions of any other new file (``0o666`` less the umask), not ``mkstemp``'s private
``0o600``. A failed write (a full disk, a file-size limit) is an :class:`OSError` that names the target, and
leaves the old file as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vsekit.errors import VsekitError

_umask: int | None = None
_umask_lock = threading.Lock()


class OutputPathError(VsekitError):
    """An output path names something that is not a regular file (a symlink, a device, a folder)."""


def cache_root() -> Path:
    """vsekit's cache folder (demo sets, LSA vectors): ``$VSEKIT_CACHE``, else ``~/.cache/vsekit``. A path that
    is (or lies under) a file is refused in one line, before anything is built for the cache."""
    env = os.environ.get("VSEKIT_CACHE")
    root = Path(env or "~/.cache/vsekit").expanduser()
    check_folder_path(root, "VSEKIT_CACHE" if env else "the cache folder (set VSEKIT_CACHE to move it)")
    return root


def check_folder_path(folder: Path, what: str) -> None:
    """Refuse (one line naming ``what``) a folder path that is a file, or lies under one: nothing could be made
    there. A missing folder is fine (it is made when needed)."""
    for p in (folder, *folder.parents):
        try:
            st = os.stat(p)
        except FileNotFoundError:
            continue
        except OSError as e:  # a path under a file (ENOTDIR), no permission to look
            raise OutputPathError(f"{what} {folder}: {e.strerror}: point it at a folder") from None
        if not stat.S_ISDIR(st.st_mode):
            raise OutputPathError(f"{what} {folder}: {p} is a file, not a folder: point it at a folder "
                                  "(or move the file)")
        return


def new_file_mode() -> int:
    """The permission bits a new file gets from ``open()``: ``0o666`` less the umask (read once)."""
    global _umask
    with _umask_lock:
        if _umask is None:
            _umask = _read_umask()
    return 0o666 & ~_umask


def _read_umask() -> int:
    """The process's umask: from ``/proc/self/status`` where Linux shows it (reading it there changes nothing),
    else by setting and restoring it, under the caller's lock (``os.umask`` can only be read by changing it)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_replaceable(path: str | os.PathLike) -> None:
    """Refuse (one line) to write over ``path`` unless it is missing or a regular file: a symlink, a device
    node, a FIFO, a socket or a folder would be replaced by a plain file."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISREG(st.st_mode):
        return
    kind = ("a symbolic link" if stat.S_ISLNK(st.st_mode) else "a folder" if stat.S_ISDIR(st.st_mode)
            else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
            else "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
            else "not a regular file")
    raise OutputPathError(f"{path}: is {kind}; vsekit writes its outputs as regular files and will not replace "
                          "it: choose another output path")


def check_writable_dir(folder: str | os.PathLike, what: str = "output folder", *, create: bool = True) -> Path:
    """Check that files can be created in ``folder`` with a small probe file created and removed there: a
    read-only, immutable or full folder is said at once, in one line naming it, not after hours of encoding or
    training. ``create``: make ``folder`` (with its parents) first; else, when it is missing, probe the nearest
    folder above it that exists (where it will be made), making nothing. ``what`` names the setting that chose
    the folder."""
    folder = Path(folder)
    check_folder_path(folder, what)
    where = folder if create or folder.is_dir() else next((p for p in folder.parents if p.is_dir()), Path("."))
    probe = where / f".vsekit-write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"\0")
        finally:
            os.close(fd)
        os.unlink(probe)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(probe)
        reason = e.strerror or type(e).__name__
        at = "" if where == folder else f" (in {where}, where it would be made)"
        raise OutputPathError(f"{what} {folder}: cannot write there{at}: {reason}: make it writable (or free "
                              "space there), or choose another folder") from None
    return folder


def _naming(e: OSError, path: Path) -> OSError:
    """``e`` with ``path`` as its file name (a failed ``write`` names none, a failed ``mkstemp`` its temporary
    file), of the same kind; ``e`` itself when it cannot say more."""
    if e.errno is None or e.filename == str(path):
        return e
    return type(e)(e.errno, e.strerror or str(e), str(path))


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> Path:
    """Write ``path`` atomically: ``write(fileobj)`` goes to a temporary file in the same folder, which is
    fsynced and renamed over ``path``. A killed process leaves either the old file or the new one; a failed
    write an :class:`OSError` naming ``path`` (and the old file). Only a missing path or a regular file is
    replaced (:func:`check_replaceable`)."""
    path = Path(path)
    check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:  # a read-only or full folder: name it, not the temporary file's random name
        raise _naming(e, path.parent) from None
    try:
        with os.fdopen(fd, mode) as f:
            os.chmod(tmp, new_file_mode())  # mkstemp makes it 0o600; an output is as readable as any other file
            write(f)
            f.flush()
            os.fsync(f.fileno())
        check_replaceable(path)  # nothing put in its place meanwhile
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        named = _naming(e, path) if isinstance(e, OSError) else e
        if named is e:
            raise
        raise named from e
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text), mode="w")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
