"""The ``pairs`` data format: plain image-caption pair files, the easiest way to bring your own data.

One row per (image, caption) pair, as CSV/TSV with a header or as JSON lines, with columns ``image`` and
``caption`` and optionally ``split`` and ``label``. Rows are grouped by image in order of first appearance.

Split rule: ``split=None`` reads every row. Asking for a named split needs a ``split`` value on every row;
a file without a split column is an error then (:class:`NoSplitColumn`), not "every row is in every split",
which would silently evaluate on the training data. ``dev`` and ``val`` name the same split, as in the
Karpathy reader.

Captions are kept without invisible format characters (zero-width spaces, direction overrides) and with
control characters as spaces (:func:`~vsekit.text.tokenizer.clean_text`): they would otherwise split words,
reorder or hide text where a caption is shown, and a caption of nothing else is an empty caption.
"""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from vsekit.data.corpus import Corpus, DataError
from vsekit.data.sources.base import DataConfig, register_source
from vsekit.data.textio import (
    bounded_lines,
    first_char,
    json_type,
    open_text,
    parse_json,
    read_utf8,
    short_repr,
    utf8_error,
)
from vsekit.text.tokenizer import clean_text

logger = logging.getLogger("vsekit.data.pairs")


class NoSplitColumn(DataError):
    """A split was asked of a pairs file whose rows have no split: every row is one set (read it with
    ``split=None``: ``--split all`` on the command line, ``data.split: null`` in a recipe)."""

PAIRS_EXTENSIONS = (".csv", ".tsv", ".jsonl", ".json")
_SPLIT_ALIASES = {"dev": "val"}
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
REQUESTED = "requested"


@register_source("pairs", sniff_priority=30)
class PairsData(DataConfig):
    """a .csv/.tsv/.jsonl pairs file (or a .json array of rows)."""

    format: Literal["pairs"] = "pairs"
    path: str
    image_root: str | None = None  # relative image paths resolve here (default: the file's folder)
    # which rows a split reads: "requested" (the rows whose split column is the split asked for), a split
    # value (those rows, whatever split is asked for), or null (every row: a file per split, no split column)
    split: str | None = Field(REQUESTED, description="rows to read: 'requested', a split value, or null for all")

    def read(self, split: str, max_images: int | None) -> Corpus:
        file_split = split if self.split == REQUESTED else self.split
        return read_pairs(self.path, file_split, image_root=self.image_root)

    @classmethod
    def sniff(cls, path: Path) -> bool:
        suffix = path.suffix.lower()
        return path.is_file() and suffix in PAIRS_EXTENSIONS and (suffix != ".json" or first_char(path) == "[")

    @classmethod
    def from_path(cls, path: Path, image_root: str | None = None) -> dict[str, Any]:
        return {"path": str(path), "image_root": image_root}


def read_pairs(path: str | Path, split: str | None = None, image_root: str | Path | None = None) -> Corpus:
    """Read a pairs file; relative image paths resolve against ``image_root`` (default: the file's folder).

    Error messages name the file and the 1-based line (for a ``.json`` array: the 1-based entry); a byte that
    is not UTF-8 also gets its offset in the file. ``meta["image_lines"]`` maps each image as written to the
    ``file:line`` of the first row naming it, so :func:`~vsekit.data.checks.check_images` can say which row
    names a missing image.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: pairs file not found")
    root = path.parent if image_root is None else Path(image_root)
    wanted = None if split is None else _SPLIT_ALIASES.get(split, split)

    # image as written -> row; per row, its label and the line that set it
    rows: dict[str, int] = {}
    image_lines: dict[str, str] = {}  # image as written -> "file:line" of the first row naming it
    label_of: list[tuple[int, ...]] = []
    label_line: list[int | None] = []
    captions: list[str] = []
    caption_ids: list[str] = []
    caption_to_image: list[int] = []
    splits_seen: dict[str, int] = {}
    split_of_image: dict[str, tuple[str, int]] = {}
    cross_split: list[str] = []
    has_split_column = False
    no_split_where: str | None = None
    any_label = False

    if wanted is not None and _csv_header_lacks_split(path):
        raise _no_split_column(path, split)  # known from the header: no need to parse every row first
    for where, line, record in _records(path):
        image = _required(record, "image", where)
        raw_caption = _required(record, "caption", where)
        caption = clean_text(raw_caption).strip()
        if not caption:
            invisible = " (only invisible or control characters)" if raw_caption.strip() else ""
            raise DataError(f"{where}: empty caption{invisible}")
        row_split = record.get("split")
        if row_split is not None and not isinstance(row_split, str):
            raise DataError(f"{where}: 'split' must be a string, got {short_repr(row_split)}")
        row_split = (row_split or "").strip() or None
        if row_split is not None:
            has_split_column = True
            row_split = _SPLIT_ALIASES.get(row_split, row_split)
            splits_seen[row_split] = splits_seen.get(row_split, 0) + 1
            previous = split_of_image.setdefault(image, (row_split, line))
            if previous[0] != row_split and len(cross_split) < 5:
                cross_split.append(f"{image!r} ({previous[0]} at {previous[1]}, {row_split} at {line})")
        if wanted is not None:
            if row_split is None:
                # an error either way, but which one depends on whether any row has a split
                no_split_where = no_split_where or where
                continue
            if row_split != wanted:
                continue

        label = parse_labels(record.get("label"), where)
        row = rows.get(image)
        if row is None:
            row = rows[image] = len(rows)
            image_lines[image] = where
            label_of.append(())
            label_line.append(None)
        if label is not None:
            any_label = True
            if label_line[row] is None:
                label_of[row], label_line[row] = label, line
            elif label_of[row] != label:
                raise DataError(f"{path}: image {image!r} has label {_label_text(label_of[row])} at {_unit(path)} "
                                f"{label_line[row]} but label {_label_text(label)} at {_unit(path)} {line}")
        captions.append(caption)
        caption_ids.append(f"{path.name}:{line}")
        caption_to_image.append(row)

    if wanted is not None and not has_split_column:
        raise _no_split_column(path, split)
    if no_split_where is not None:
        raise DataError(f"{no_split_where}: no split value, but split {split!r} was requested")
    if not captions:
        if wanted is not None:
            present = ", ".join(sorted(splits_seen)) or "(none)"
            raise DataError(f"{path}: no rows with split {split!r}; splits present: {present}")
        raise DataError(f"{path}: holds no rows")
    if cross_split:
        logger.warning("%s: images listed under more than one split (train/test leakage?): %s", path,
                       "; ".join(cross_split))

    return Corpus(name=f"{path.stem}_{wanted or 'all'}", captions=captions, caption_to_image=caption_to_image,
                  image_ids=list(rows), image_paths=[_resolve(root, image) for image in rows], caption_ids=caption_ids,
                  labels=labels_array(label_of) if any_label else None,
                  meta={"format": "pairs", "source": str(path), "split": wanted, "image_lines": image_lines})


def _unit(path: Path) -> str:
    return "entry" if path.suffix.lower() == ".json" and _is_json_array(path) else "line"


def _resolve(root: Path, image: str) -> Path:
    p = Path(image)
    if image.startswith("~"):
        try:
            p = p.expanduser()
        except RuntimeError:  # "~user/..." for a user this machine does not know: a relative path then
            pass
    return p if p.is_absolute() else root / p


def _required(record: dict[str, Any], key: str, where: str) -> str:
    value = record.get(key)
    if value is None:
        raise DataError(f"{where}: missing '{key}'")
    if not isinstance(value, str):
        raise DataError(f"{where}: '{key}' must be a string, got {short_repr(value)}")
    if key == "image" and not value.strip():
        raise DataError(f"{where}: empty image path")
    return value.strip() if key == "image" else value


_LABEL_SEPARATORS = re.compile(r"[|;,\s]+")


def _label_text(labels: tuple[int, ...]) -> str:
    return str(labels[0]) if len(labels) == 1 else "|".join(map(str, labels))


def labels_array(labels: list[tuple[int, ...]]) -> np.ndarray:
    """(N,) class ids (-1: none) when no item has more than one label, else (N, C) multi-hot rows."""
    if all(len(t) <= 1 for t in labels):
        return np.asarray([t[0] if t else -1 for t in labels], dtype=np.int64)
    width = max(max(t) for t in labels if t) + 1
    out = np.zeros((len(labels), width), dtype=np.int64)
    for i, t in enumerate(labels):
        out[i, list(t)] = 1
    return out


def parse_labels(value: Any, where: str) -> tuple[int, ...] | None:
    """The label(s) of a row: one class id, or several (multi-label: a JSON list, or ids separated by ``|``,
    ``;``, ``,`` or spaces in a CSV cell); None when absent or blank."""
    if isinstance(value, list):
        found = tuple(sorted({_parse_label(v, where) for v in value} - {None}))
        return found or None
    if isinstance(value, str) and _LABEL_SEPARATORS.search(value.strip()):
        found = tuple(sorted({_parse_label(v, where) for v in _LABEL_SEPARATORS.split(value.strip()) if v}))
        return found or None
    one = _parse_label(value, where)
    return None if one is None else (one,)


def _parse_label(value: Any, where: str) -> int | None:
    """Integer label, or None when absent/blank. Accepts ints and integer strings (CSV cells)."""
    if value is None:
        return None
    label = None
    if isinstance(value, bool):
        pass
    elif isinstance(value, int):
        label = value
    elif isinstance(value, float) and value.is_integer():
        label = int(value)
    elif isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        if len(text) <= 100:
            try:
                label = int(text)
            except ValueError:
                pass
    if label is None:
        raise DataError(f"{where}: label must be an integer, got {short_repr(value)}")
    if not _INT64_MIN <= label <= _INT64_MAX:
        raise DataError(f"{where}: label {label} is out of range (a 64-bit integer)")
    return label


def _no_split_column(path: Path, split: str) -> NoSplitColumn:
    return NoSplitColumn(f"{path}: has no 'split' column, so split {split!r} cannot be selected; read every row "
                         "with --split all (vsekit index build / add) or data.split: null (a recipe's data section), "
                         "or add a 'split' column")


def _csv_header_lacks_split(path: Path) -> bool:
    """True when ``path`` is a CSV/TSV whose (well-formed) header has image and caption columns but no split
    column; anything else is left to the full read, which reports it."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".tsv"):
        return False
    try:
        with open_text(path, newline="") as f:
            header = next(csv.reader(bounded_lines(f, path), delimiter="\t" if suffix == ".tsv" else ","), None)
    except (UnicodeDecodeError, csv.Error, DataError):
        return False
    names = [h.strip() for h in header or ()]
    return "image" in names and "caption" in names and "split" not in names


def _records(path: Path) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """Yield ``(where, line, record)``; ``where`` is ``"file:line"`` for messages."""
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        records = _csv_records(path, delimiter="\t" if suffix == ".tsv" else ",")
    elif suffix == ".jsonl" or (suffix == ".json" and not _is_json_array(path)):
        records = _jsonl_records(path)
    elif suffix == ".json":
        records = _json_array_records(path)
    else:
        raise DataError(f"{path}: unknown pairs file type {suffix!r}; expected one of {', '.join(PAIRS_EXTENSIONS)}")
    try:
        yield from records
    except UnicodeDecodeError:  # met while reading: only an offset into some buffer, so name the line
        raise utf8_error(path) from None


def _csv_records(path: Path, delimiter: str) -> Iterator[tuple[str, int, dict[str, Any]]]:
    with open_text(path, newline="") as f:
        reader = csv.reader(bounded_lines(f, path), delimiter=delimiter)
        try:
            header = next(reader, None)
            if not header:
                raise DataError(f"{path}:1: empty file, expected a header with columns image,caption")
            header = [h.strip() for h in header]
            for column in ("image", "caption"):
                if column not in header:
                    raise DataError(f"{path}:1: header has no '{column}' column "
                                    f"(columns: {', '.join(map(repr, header))})")
            for column in ("image", "caption", "split", "label"):
                if header.count(column) > 1:
                    raise DataError(f"{path}:1: header names column '{column}' more than once")
            while True:
                line = reader.line_num + 1  # a record may span lines (quoted newlines): report its first
                fields = next(reader, None)
                if fields is None:
                    break
                if not any(field.strip() for field in fields):
                    continue
                if len(fields) > len(header):
                    raise DataError(f"{path}:{line}: {len(fields)} fields but the header has {len(header)}")
                yield f"{path}:{line}", line, dict(zip(header, fields))
        except csv.Error as exc:
            raise DataError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from None


def _jsonl_records(path: Path) -> Iterator[tuple[str, int, dict[str, Any]]]:
    with open_text(path) as f:
        for line, text in enumerate(bounded_lines(f, path), start=1):
            if not text.strip():
                continue
            record = parse_json(text, f"{path}:{line}")
            if not isinstance(record, dict):
                raise DataError(f"{path}:{line}: expected a JSON object, got {json_type(record)}")
            yield f"{path}:{line}", line, record


def _json_array_records(path: Path) -> Iterator[tuple[str, int, dict[str, Any]]]:
    data = parse_json(read_utf8(path), str(path), whole_file=True)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of objects, got {json_type(data)}")
    for entry, record in enumerate(data, start=1):
        if not isinstance(record, dict):
            raise DataError(f"{path}: entry {entry}: expected a JSON object, got {json_type(record)}")
        yield f"{path}: entry {entry}", entry, record


def _is_json_array(path: Path) -> bool:
    """A ``.json`` pairs file may be a JSON array of objects instead of JSON lines."""
    try:
        with open(path, encoding="utf-8-sig", errors="replace") as f:
            while chunk := f.read(4096):
                stripped = chunk.lstrip()
                if stripped:
                    return stripped[0] == "["
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return False
