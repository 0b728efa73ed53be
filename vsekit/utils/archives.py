"""Size checks of weight archives before a loader inflates them: a torch ``.pt`` zip and a ``.safetensors``
file are refused from their directory or header alone when they announce more than the file can hold.

Used by checkpoints (:mod:`vsekit.checkpoint`) and by initial weights files (:mod:`vsekit.models.weights`).
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

from vsekit.errors import VsekitError

# torch.save stores its records uncompressed: what torch.load inflates is about the file's size. A zip whose
# central directory announces much more (deflated records: a "zip bomb") is refused before it is read.
MAX_INFLATION = 2.0  # the records' total size over the file's
_INFLATION_SLACK = 1 << 20  # bytes: headers and padding of a small file
MAX_RECORDS = 1_000_000
_SAFETENSORS_MAX_HEADER = 100 << 20  # the safetensors library's own limit


class UnsafeArchiveError(VsekitError, ValueError):
    """A weights file whose directory or header announces more than the file holds (refused unread)."""


def check_zip_sizes(path: str | Path, *, error: type[Exception] = UnsafeArchiveError) -> None:
    """Refuse (``error``) a torch zip archive whose records would inflate to more than
    :data:`MAX_INFLATION` times the file's size, or that has more than :data:`MAX_RECORDS` records, from its
    central directory alone, before ``torch.load`` allocates anything. A file that is not a zip passes: the
    reader that follows refuses it."""
    path = Path(path)
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError):
        return
    if len(infos) > MAX_RECORDS:
        raise error(f"{path}: holds {len(infos)} records (at most {MAX_RECORDS}): not a checkpoint vsekit will open")
    inflated = sum(max(0, int(i.file_size)) for i in infos)
    if inflated > MAX_INFLATION * size + _INFLATION_SLACK:
        raise error(f"{path}: its records would inflate to {inflated} bytes from a {size}-byte file (more than "
                    f"{MAX_INFLATION:g}x; torch.save stores them uncompressed): a damaged or hostile file, refused "
                    "before reading")


def check_safetensors_sizes(path: str | Path, *, error: type[Exception] = UnsafeArchiveError) -> None:
    """Refuse a ``.safetensors`` file whose header is larger than the file or the library's limit, or whose
    tensors end beyond the file, before the library reads it (it reads nothing compressed)."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if n < 2 or n > min(size - 8, _SAFETENSORS_MAX_HEADER):
            raise error(f"{path}: not a safetensors file (header of {n} bytes in a {size}-byte file)")
        try:
            header = json.loads(f.read(n))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise error(f"{path}: not a safetensors file (unreadable header)") from None
    if end > size - 8 - n:
        raise error(f"{path}: its tensors end at byte {end} of a {size - 8 - n}-byte data section (truncated or "
                    "hostile), refused before reading")
