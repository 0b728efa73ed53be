"""Crash-safe folder publishing and cross-process file locks.

Several vsekit outputs are folders of files that only make sense together (a demo set, a fitted LSA cache
entry, an index generation). They are written into a temporary *work folder* next to their final place
and then moved there with renames only, so that a reader sees the old complete folder or the new complete
one, never a half-written one, and a killed writer leaves at most a work or trash folder behind. Work
folders are named ``.{target}.building-{pid}-{hex}`` (trash, i.e. a replaced target on its way out, is
``.{target}.old-{pid}-{hex}``): the pid lets a later writer tell a dead writer's leftovers from a live
writer's folder, and the leading dot keeps them out of the way.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import stat
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

WORK_TAG = "building"
TRASH_TAG = "old"


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the ``with`` block.

    Serialises writers across processes (e.g. data-parallel ranks fitting the same cache entry). Without
    ``fcntl`` (not POSIX) there is no such lock and this is a no-op. The lock belongs to the open file, so
    two threads of one process that each enter ``file_lock`` are serialised too.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def fsync_file(path: str | os.PathLike) -> None:
    """Flush ``path``'s data to disk, so a rename that publishes it cannot outlive its contents."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (creations, renames) to disk; a no-op where folders cannot be opened."""
    if os.name != "posix":  # Windows cannot open a folder for fsync
        return
    fsync_file(path)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists. Errs on the side of "alive" where it cannot tell."""
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _sibling(target: Path, tag: str) -> Path:
    return target.parent / f".{target.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def make_work_dir(target: str | os.PathLike) -> Path:
    """Create and return an empty work folder next to ``target`` (same file system, so it can be renamed
    into place), named after ``target`` and this process's pid."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = _sibling(target, WORK_TAG)
    work.mkdir()
    return work


def _work_pid(name: str, target_name: str | None = None) -> int | None:
    """The pid in ``name`` when it is a work or trash folder's name (:func:`_sibling`) made for the target
    named ``target_name`` (None: any target); else None."""
    stem = ".+" if target_name is None else re.escape(target_name)
    m = re.fullmatch(rf"\.{stem}\.(?:{WORK_TAG}|{TRASH_TAG})-(\d+)-[0-9a-f]+", name)
    return int(m.group(1)) if m else None


def is_stale_work(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a work or trash folder (of any target) that a writer no longer running left: what
    a killed ``index build`` leaves in its new folder, which must not make that folder look taken."""
    path = Path(path)
    pid = _work_pid(path.name)
    if pid is None or not path.is_dir() or path.is_symlink():
        return False
    return pid != os.getpid() and not pid_alive(pid)


def remove_stale_work(target: str | os.PathLike, *, any_pid: bool = False) -> list[Path]:
    """Delete the work and trash folders that killed writers left next to ``target``; returns them.

    By default only folders of dead processes go: a live pid may be a concurrent writer still busy, and
    this process's own folders belong to its other threads. Pass ``any_pid=True`` when the caller holds
    the lock that every writer of ``target`` takes, so that no leftover can belong to a running write
    (this also covers a dead writer whose pid was reused).

    A writer killed between the two renames of :func:`publish_dir` leaves no ``target`` and the old one
    as trash; that trash is deleted like the rest (it may be half deleted already), and the caller
    rebuilds the target.
    """
    target = Path(target)
    if not target.parent.is_dir():
        return []
    removed = []
    for path in target.parent.glob(f".{glob.escape(target.name)}.*-*-*"):
        pid = _work_pid(path.name, target.name)
        if pid is not None and path.is_dir() and (any_pid or (pid != os.getpid() and not pid_alive(pid))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _check_replaceable_dir(target: Path) -> None:
    """Refuse (one line) to publish over anything but a missing path or a real folder: a symlink (to a cache on
    another disk, say), a file or a device would be destroyed by the renames."""
    from vsekit.utils.io import OutputPathError

    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a folder"
        raise OutputPathError(f"{target}: is {kind}; vsekit replaces only a folder of its own there: remove it "
                              "or choose another path")


def publish_dir(work: str | os.PathLike, target: str | os.PathLike, *, keep: Callable[[Path], bool] | None = None,
                force: bool = False, attempts: int = 5) -> bool:
    """Move the fully written folder ``work`` to ``target`` with renames only; True if ``work`` went in.

    A missing (or empty) ``target`` is replaced by one rename. An existing one is first renamed aside to a
    trash name and deleted after the new folder is in, so a reader sees the old complete folder or the new
    complete one (or, for the instant between the two renames, none), never a mix. A crash leaves the old
    folder or the new one in place (or, between the two renames, none), plus leftovers that
    :func:`remove_stale_work` deletes. ``work`` should be written in full (and its files fsynced, where
    that matters) before the call; the folder entries are fsynced here.

    ``keep(target)`` lets concurrent writers of the same content cooperate: when a target is in the way and
    ``keep`` says it already holds what ``work`` holds (another writer got there first), it is kept,
    ``work`` is deleted and the result is False. ``force`` skips that check for the target found in the
    way first (the one the caller asked to rebuild); a target that appears after that one has been moved
    aside is a concurrent writer's fresh one, and ``keep`` applies to it.

    Safe against concurrent publishers of the same ``target``; a rename race is retried ``attempts`` times.
    """
    work, target = Path(work), Path(target)
    _check_replaceable_dir(target)
    fsync_dir(work)
    for _ in range(attempts):
        try:
            os.rename(work, target)  # succeeds when target is missing or an empty folder
        except OSError:
            if not target.exists() and not work.exists():
                raise
            if not target.exists():
                continue  # target vanished in between (another writer is replacing it); try again
        else:
            fsync_dir(target.parent)
            return True
        if keep is not None and not force and keep(target):
            shutil.rmtree(work, ignore_errors=True)
            return False
        trash = _sibling(target, TRASH_TAG)
        try:
            os.rename(target, trash)
        except FileNotFoundError:
            continue  # someone else moved it; try again
        force = False  # the old folder is out of the way; a target that appears now is a fresh one
        try:
            os.rename(work, target)
        except OSError:
            continue  # another writer's folder went in between our two renames; judge it on the next round
        else:
            fsync_dir(target.parent)
            return True
        finally:
            shutil.rmtree(trash, ignore_errors=True)
    raise RuntimeError(f"could not move {work} into {target}: other processes keep replacing it")
