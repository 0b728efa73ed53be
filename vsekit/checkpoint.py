"""Checkpoints: plain-data dicts with a format version and a sha256, written atomically.

A checkpoint holds the model, the optimizer, the LR scheduler, the RNG states, the epoch/step counters,
the vocabulary and the resolved config, so that a run can be resumed exactly and a model can be used for
search without the training code.

**Opening a checkpoint never runs code.** A checkpoint is plain data: tensors, numbers, strings, ``None``,
and lists, tuples and dicts of them (:func:`save_checkpoint` refuses anything else, naming the key), and
:func:`load_checkpoint` reads it with ``torch.load(weights_only=True)``, whose unpickler builds nothing
else. A file that holds pickled Python objects (a checkpoint of a vsekit before 0.1.0, whose RNG state held
a numpy array, or a hostile file named by an index manifest) is refused with a one-line
:class:`CheckpointError`, and so is any other version than :data:`CHECKPOINT_VERSION`.

**Integrity: a sha256 in the zip comment.** ``torch.save`` writes a zip archive; its CRC32s are not checked
when torch reads it, so flipped bytes load silently. vsekit stores a digest in the archive's own comment
field (the standard place for free text at the end of a zip): the file ends with ``vsekit-sha256:<64 hex>``
(78 bytes) and the digest covers every byte before that comment. Why there rather than in a sidecar
``last.pt.sha256``:

- one file is written by one atomic rename, so a kill can never leave a checkpoint beside the digest of
  another (a sidecar needs a second rename, and a kill between the two would make ``--resume`` refuse a
  good checkpoint);
- the digest travels with the file when it is copied (``cp runs/x/best.pt model.pt``, an index manifest
  pointing at it), where a sidecar is easily left behind;
- the file stays a valid zip and a valid torch file: ``torch.load`` reads it unchanged (mmap too), ``unzip
  -z`` prints the digest, and ``head -c -78 last.pt | sha256sum`` recomputes it;
- the digest is computed while the file is written (no second pass) and checked by one streaming read.

A checkpoint without that comment (re-saved by hand with ``torch.save``) still loads, with a logged warning. Every
way a file can be wrong is a one-line :class:`CheckpointError` naming it: a digest mismatch, a truncated
file, a file that is not a torch zip archive, pickled objects, a missing key, another version.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import pickle
import re
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

import torch

from vsekit.errors import VsekitError, first_line
from vsekit.utils.archives import check_zip_sizes
from vsekit.utils.io import atomic_write

log = logging.getLogger("vsekit.checkpoint")

CHECKPOINT_FORMAT = "vsekit-checkpoint"
# plain data only (weights_only) and a sha256 in the zip comment; 1 was a vsekit before 0.1.0 (pickled numpy)
CHECKPOINT_VERSION = 2
_BEFORE_RELEASE = "written by a vsekit before 0.1.0, which this one does not read: retrain with this vsekit"
# what every consumer of a checkpoint needs: search and evaluation, ``train.init_from`` and ``--resume``
REQUIRED_KEYS = ("model", "vocab", "config")

_ZIP_LOCAL = b"PK\x03\x04"
_ZIP_EOCD = b"PK\x05\x06"  # end of central directory record: 22 bytes + comment, the last thing in a zip
_EOCD_SIZE = 22
_DIGEST_PREFIX = b"vsekit-sha256:"
_COMMENT_SIZE = len(_DIGEST_PREFIX) + 64
_COMMENT = re.compile(rb"vsekit-sha256:([0-9a-f]{64})\Z")
_CHUNK = 1 << 20
_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.Size, torch.dtype, torch.device)
_CONTAINERS = (dict, collections.OrderedDict, collections.Counter, list, tuple, set)


class CheckpointError(VsekitError, ValueError):
    pass


# -- writing -------------------------------------------------------------------------------------------------
def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` (plain data only) atomically to ``path``, with its sha256 in the zip comment."""
    state = {**state, "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION}
    state.pop("path", None)  # added by load_checkpoint; where a file lies is not part of it
    _check_plain(state, "state")
    return atomic_write(path, lambda f: _save_with_digest(state, f))


def _check_plain(obj: Any, where: str) -> None:
    """Refuse what ``torch.load(weights_only=True)`` would refuse, at save time, naming the key."""
    t = type(obj)
    if t in _PLAIN or t is torch.Tensor or t is torch.nn.Parameter:
        return
    if t in _CONTAINERS:
        if isinstance(obj, dict):
            for k, v in obj.items():
                _check_plain(k, f"{where} key {k!r}")
                _check_plain(v, f"{where}[{k!r}]")
        else:
            for i, v in enumerate(obj):
                _check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(f"checkpoint {where} is a {t.__module__}.{t.__qualname__}: a checkpoint holds plain data "
                    "only (tensors, numbers, strings, None, and lists, tuples and dicts of them)")


class _DigestWriter:
    """A file for ``torch.save`` that hashes what it writes and holds back the last 22 bytes (the zip's
    end-of-central-directory record) so that :meth:`finish` can give the archive its digest comment.

    It keeps the first :class:`OSError` of the real file (a full disk, a file-size limit): torch turns a
    failed write into an ``[enforce fail at inline_container.cc]`` RuntimeError, or goes on past it, and
    :func:`_save_with_digest` raises the OSError instead, so the caller can name the file."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f, self.h, self.tail = f, hashlib.sha256(), b""
        self.error: OSError | None = None

    def write(self, data) -> int:
        data = memoryview(data).cast("B")  # a tensor's storage: not copied, only its last bytes
        n = len(data)
        if n >= _EOCD_SIZE:
            self._out(self.tail)
            self._out(data[:-_EOCD_SIZE])
            self.tail = bytes(data[-_EOCD_SIZE:])
        else:
            buf = self.tail + bytes(data)
            self._out(buf[:-_EOCD_SIZE])
            self.tail = buf[-_EOCD_SIZE:]
        return n

    def _out(self, chunk) -> None:
        if self.error is not None:
            raise self.error
        if len(chunk):
            self.h.update(chunk)
            try:
                self.f.write(chunk)
            except OSError as e:
                self.error = e
                raise

    def flush(self) -> None:
        pass

    def finish(self) -> None:
        eocd = self.tail
        if len(eocd) != _EOCD_SIZE or not eocd.startswith(_ZIP_EOCD) or eocd[-2:] != b"\0\0":
            raise RuntimeError("torch.save did not end its archive with a plain end-of-central-directory record")
        eocd = eocd[:-2] + struct.pack("<H", _COMMENT_SIZE)
        self.h.update(eocd)
        self.f.write(eocd + _DIGEST_PREFIX + self.h.hexdigest().encode())


def _save_with_digest(state: dict[str, Any], f: IO[bytes]) -> None:
    w = _DigestWriter(f)
    try:
        torch.save(state, w)
    except Exception:
        if w.error is None:
            raise
    if w.error is not None:  # torch turned a failed write into an error of its own, or went on past it
        raise w.error
    w.finish()


# -- reading -------------------------------------------------------------------------------------------------
def checkpoint_digest(path: str | Path) -> str | None:
    """The sha256 a checkpoint file records (after checking that its bytes still have it), or None for a
    checkpoint that records none. A :class:`CheckpointError` for a truncated, corrupt or non-torch file."""
    path = Path(path)
    with path.open("rb") as f:
        size = f.seek(0, 2)
        f.seek(0)
        if f.read(4) != _ZIP_LOCAL:
            raise CheckpointError(f"{path}: not a checkpoint file (not the zip archive torch.save writes)")
        f.seek(max(0, size - _EOCD_SIZE - _COMMENT_SIZE))
        end = f.read()
        m = _COMMENT.search(end)
        comment = _COMMENT_SIZE if m else 0  # the EOCD record ends with the comment's size
        eocd = end[len(end) - comment - _EOCD_SIZE: len(end) - comment]
        if len(eocd) != _EOCD_SIZE or eocd[:4] != _ZIP_EOCD or struct.unpack("<H", eocd[-2:])[0] != comment:
            raise CheckpointError(f"{path}: truncated or damaged: the end of the archive is missing "
                                  f"({size} bytes)")
        if m is None:
            return None
        expected = m.group(1).decode()
        h, left = hashlib.sha256(), size - _COMMENT_SIZE
        f.seek(0)
        while left > 0:
            chunk = f.read(min(_CHUNK, left))
            if not chunk:
                raise CheckpointError(f"{path}: truncated while reading")
            h.update(chunk)
            left -= len(chunk)
    actual = h.hexdigest()
    if actual != expected:
        raise CheckpointError(f"{path}: corrupt: its sha256 is {actual[:16]}..., the checkpoint recorded "
                              f"{expected[:16]}... (the file was changed or damaged after it was written)")
    return expected


def _resolve(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():  # a run folder: take its best checkpoint, else its last
        path = next((path / name for name in ("best.pt", "last.pt") if (path / name).is_file()), path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    return path


def _torch_load(path: Path, map_location) -> Any:
    check_zip_sizes(path, error=CheckpointError)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only load failed" not in str(e).lower():  # a damaged pickle, not a refused one
            raise CheckpointError(f"{path}: not a readable checkpoint (UnpicklingError: {first_line(e, limit=None)})") from None
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(
            f"{path}: holds pickled Python objects{what}, not plain data: loading it could run code, so it is not "
            f"opened (a hostile file, or a checkpoint {_BEFORE_RELEASE})") from None
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {first_line(e, limit=None)})") from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", *,
                    require: Iterable[str] = ()) -> dict[str, Any]:
    """Open a checkpoint (a ``.pt`` file, or a run folder: its ``best.pt``, else its ``last.pt``) without
    running code: its digest is checked, then it is read with ``torch.load(weights_only=True)``.

    ``require``: keys the caller needs beyond :data:`REQUIRED_KEYS`. Any problem is a
    one-line :class:`CheckpointError` naming the file."""
    path = _resolve(path)
    digest = checkpoint_digest(path)
    state = _torch_load(path, map_location)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a vsekit checkpoint")
    version = state.get("version", 0)
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {version} is newer than this vsekit understands "
                              f"({CHECKPOINT_VERSION}); upgrade vsekit")
    if version != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {version}, {_BEFORE_RELEASE}")
    for key in (*REQUIRED_KEYS, *require):
        if key not in state:
            raise CheckpointError(f"{path}: not a complete vsekit checkpoint: the key {key!r} is missing")
    for key in REQUIRED_KEYS:
        if not isinstance(state[key], dict):
            raise CheckpointError(f"{path}: not a valid vsekit checkpoint: {key!r} is a "
                                  f"{type(state[key]).__name__}, not a dict")
    if digest is None:  # said once the file is usable (a refusal is the one line the user sees)
        log.warning("%s has no sha256 (saved by hand with torch.save?): its integrity cannot be checked", path)
    state["path"] = str(path)
    return state


def model_fingerprint(model_state: dict[str, torch.Tensor]) -> str:
    """A short hash of the model weights: identifies which model produced an embedding collection."""
    h = hashlib.sha256()
    for k in sorted(model_state):
        t = model_state[k]
        h.update(k.encode())
        if isinstance(t, torch.Tensor):
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                     if t.numel() else b"")
    return h.hexdigest()[:16]
