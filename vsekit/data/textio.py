"""Reading the text files of a data set: UTF-8 with errors that name the file and the line."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from vsekit.data.corpus import DataError
from vsekit.text.tokenizer import clean_text

_LONE_CR = re.compile(rb"(?<=\r)(?!\n)")
# The longest line a record of a pairs file (CSV/TSV, JSON lines) may have, in characters: a caption is cut to
# text.max_tokens tokens anyway, and a line is refused before it is parsed: a CSV line of 85 MB of short fields
# became a list that held 2.9 GB before its field count was checked.
MAX_LINE_CHARS = 1 << 22


def open_text(path: Path, newline: str | None = None):
    """``path`` opened as UTF-8 text (a byte-order mark dropped); a file that cannot be opened is a
    :class:`DataError`. A ``UnicodeDecodeError`` met while reading only has an offset into some read buffer:
    turn it into a message naming the line with :func:`utf8_error`."""
    try:
        return open(path, encoding="utf-8-sig", newline=newline)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None


PAIRS_LINE_TOO_LONG = ("line longer than {limit:,} characters; a record holds one caption and its image "
                       "(is this a pairs file?)")


def bounded_lines(f, path: Path, limit: int = MAX_LINE_CHARS, too_long: str = PAIRS_LINE_TOO_LONG):
    """The lines of the text file ``f``, each read with at most ``limit`` characters held (``readline(limit +
    1)``): a longer one is a :class:`DataError` ``"{path}:{line}: " + too_long`` (``{limit}`` filled in), raised
    before it is held whole or parsed. Lines are counted as ``f`` splits them (``newline=""``: ``\n``, ``\r\n``
    or a lone ``\r``, as ``csv``)."""
    number = 0
    while line := f.readline(limit + 1):
        number += 1
        if len(line) > limit:
            raise DataError(f"{path}:{number}: " + too_long.format(limit=limit))
        yield line


def utf8_error(path: Path) -> DataError:
    """The error for the first byte of ``path`` that is not UTF-8, naming ``file:line`` (lines counted as
    text files count them: ``\\n``, ``\\r\\n`` or a lone ``\\r``), the byte's place in the line and its offset
    in the file.

    Called only after decoding failed, so the happy path reads the file once at full speed; this reads it
    again, a line at a time, up to the bad byte. UTF-8 never uses the bytes of ``\\n`` and ``\\r`` inside a
    character, so decoding line by line finds exactly the error that decoding the whole file met.
    """
    line, offset = 0, 0
    try:
        with open(path, "rb") as f:
            for raw in f:
                cr = raw.find(b"\r")
                pieces = [raw] if cr == -1 or (cr == len(raw) - 2 and raw.endswith(b"\r\n")) else \
                    [piece for piece in _LONE_CR.split(raw) if piece]
                for piece in pieces:
                    line += 1
                    if line == 1 and piece.startswith(b"\xef\xbb\xbf"):
                        piece, offset = piece[3:], 3
                    try:
                        piece.decode("utf-8")
                    except UnicodeDecodeError as exc:
                        return DataError(f"{path}:{line}: not valid UTF-8 ({exc.reason} 0x{piece[exc.start]:02x} at "
                                         f"byte {exc.start + 1} of the line, file offset {offset + exc.start}); "
                                         "save the file as UTF-8")
                    offset += len(piece)
    except OSError as exc:
        return DataError(f"{path}: cannot read ({exc.strerror or exc})")
    return DataError(f"{path}: not valid UTF-8")


def read_utf8(path: Path) -> str:
    """The whole of ``path`` as text (a byte-order mark dropped); a byte that is not UTF-8 is a
    :class:`DataError` naming ``file:line`` and the byte's offset."""
    try:
        with open_text(path) as f:
            return f.read()
    except UnicodeDecodeError:
        raise utf8_error(path) from None


def parse_json(text: str, where: str, *, whole_file: bool = False) -> Any:
    """``json.loads`` with every failure a :class:`DataError` at ``where``: ``file:line`` of one JSON line,
    or (``whole_file``) the file, to which the line and column of the error are added."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        if whole_file:
            raise DataError(f"{where}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg})") from None
        raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise DataError(f"{where}: not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # an integer of more than 4300 digits (sys.get_int_max_str_digits)
        reason = "a number too long to read" if "digits" in str(exc) else short_repr(str(exc))
        raise DataError(f"{where}: not valid JSON ({reason})") from None


def json_type(value: Any) -> str:
    kinds = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return kinds.get(type(value), "a number")


def short_repr(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for messages about values read from a file."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_caption_lines(path: Path, *, allow_empty_file: bool = False) -> list[str]:
    """One caption per line. Split on ``\\n`` only: ``str.splitlines`` would also break captions at
    form feeds or Unicode line separators and shift every later caption onto the wrong image. A byte that is
    not UTF-8 is an error naming the line and its offset. Invisible format characters (zero-width spaces,
    direction overrides) are dropped and control characters read as spaces; a line of nothing else is an
    empty caption."""
    text = read_utf8(path)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    # invisible format characters dropped, control characters as spaces (vsekit.text.tokenizer.clean_text)
    captions = [clean_text(line).strip() for line in lines]
    for number, caption in enumerate(captions, start=1):
        if not caption:
            invisible = " (only invisible or control characters)" if lines[number - 1].strip() else ""
            raise DataError(f"{path}:{number}: empty caption line{invisible}")
    if not captions and not allow_empty_file:
        raise DataError(f"{path}: holds no captions")
    return captions


def first_char(path: Path) -> str:
    """The first non-blank character of a file (``{`` for a Karpathy JSON object, ``[`` for a pairs array)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    except OSError:
        return ""
    return head[:1].decode("ascii", "replace")
