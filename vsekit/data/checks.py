"""Image checks and corpus selection, shared by every data source (:mod:`vsekit.data.sources`)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from vsekit.data.archive import MemberPath
from vsekit.data.corpus import Corpus, DataError
from vsekit.data.images import ImageLoadError, applies_exif, load_rgb, open_image

logger = logging.getLogger(__name__)


def check_images(corpus: Corpus, *, skip_missing: bool = False, decode: bool = False,
                 log: Callable[[str], None] | None = None, num_threads: int | None = None) -> Corpus:
    """Check that every image file exists and has a readable image header, or (``decode``) decodes.

    By default only headers are read (:func:`~vsekit.data.images.open_image`, without loading pixels): cheap enough for 100K images,
    and it catches missing, empty and non-image files before training starts, but not data corrupted past
    the header (a truncated file). With ``decode`` every image is decoded fully by
    :func:`vsekit.data.images.load_rgb`, as training will: slower (the pixels are read and converted), run on
    threads like the header scan, and it finds every image that would stop training. The number checked and
    failed is logged at INFO level.

    By default a bad image is a :class:`DataError` naming the first few, each with the row of the data file
    that names it when the reader recorded one (``corpus.meta["image_lines"]``: image id -> ``"file:line"``).
    With ``skip_missing`` the bad images and their captions are dropped, a warning goes to ``log`` (default:
    this module's logger), and the filtered corpus is returned. Precomputed corpora are returned unchanged.
    """
    if corpus.image_paths is None:
        return corpus
    log = log or logger.warning
    paths = corpus.image_paths
    started = time.perf_counter()
    problems = _scan(paths, num_threads, decode, applies_exif(corpus.meta))
    if decode:
        logger.info("%s: decoded %d images in %.1f s: %d cannot be decoded", corpus.name, len(paths),
                    time.perf_counter() - started, len(problems))
    if not problems:
        return corpus

    bad = sorted(problems)
    lines = corpus.meta.get("image_lines")
    lines = lines if isinstance(lines, dict) else {}

    def describe(i: int) -> str:
        where = lines.get(corpus.image_ids[i])
        return f"{paths[i]} ({problems[i]}{f', named at {where}' if where else ''})"

    first = "; ".join(describe(i) for i in bad[:3])
    what = "missing or undecodable" if decode else "missing or unreadable"
    if not skip_missing:
        raise DataError(f"{corpus.name}: {len(bad)} of {len(paths)} images are {what}, e.g. {first}. "
                        "Fix the paths (image_root?) or set skip_missing_images to drop them.")
    keep = np.ones(len(paths), dtype=bool)
    keep[bad] = False
    if not keep.any():
        raise DataError(f"{corpus.name}: all {len(paths)} images are {what}, e.g. {first}")
    filtered = select_images(corpus, keep)
    dropped = filtered.meta["dropped_images"] = int(len(paths) - filtered.num_images)
    dropped_captions = filtered.meta["dropped_captions"] = corpus.num_captions - filtered.num_captions
    log(f"{corpus.name}: skipping {dropped} of {len(paths)} images that are {what} "
        f"(and their {dropped_captions} captions), e.g. {first}")
    return filtered


def _scan(paths: Sequence[Path], num_threads: int | None, decode: bool = False,
          exif_transpose: bool = True) -> dict[int, str]:
    """Index -> reason for each path whose header cannot be read (``decode``: that cannot be decoded, as
    training loads it: ``exif_transpose`` or not). Threads: the header scan is mostly file I/O, and PIL
    releases the GIL while it decodes."""
    chunk = 64 if decode else 512
    starts = range(0, len(paths), chunk)

    def scan_chunk(start: int) -> dict[int, str]:
        reasons = {i: _decode_problem(paths[i], exif_transpose) if decode else _header_problem(paths[i])
                   for i in range(start, min(start + chunk, len(paths)))}
        return {i: r for i, r in reasons.items() if r is not None}

    if len(starts) <= 1:
        return scan_chunk(0) if paths else {}
    workers = num_threads or min(16, (os.cpu_count() or 1) * 2)
    problems: dict[int, str] = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for found in pool.map(scan_chunk, starts):
            problems.update(found)
    return problems


def _header_problem(path: Path) -> str | None:
    try:
        if isinstance(path, MemberPath):  # an image in a shard: only the bytes of its header are read
            with path.open() as f, open_image(f):
                return None
        with open_image(path):
            return None
    except DataError as exc:  # a shard member that cannot be read
        return str(exc).removeprefix(f"{path}: ")
    except FileNotFoundError:
        return "file not found"
    except IsADirectoryError:
        return "a directory"
    except PermissionError:
        return "permission denied"
    except UnidentifiedImageError:
        return "not a recognised image"
    except Image.DecompressionBombError:
        return "decompression bomb"
    except Exception as exc:  # corrupt headers raise OSError, SyntaxError, ValueError, struct.error, ...
        return f"unreadable header: {exc or type(exc).__name__}"


def _decode_problem(path: Path, exif_transpose: bool = True) -> str | None:
    try:
        load_rgb(path, exif_transpose=exif_transpose).close()
        return None
    except ImageLoadError as exc:
        return str(exc).removeprefix(f"{path}: ")


def select_images(corpus: Corpus, keep: np.ndarray) -> Corpus:
    """A new corpus with the images where ``keep`` (bool, (N,)) is true and only their captions.

    ``caption_to_image`` is remapped to the new rows. A kept prefix of a memory-mapped feature array stays
    a memory map; any other selection of features is read into memory.
    """
    keep = np.asarray(keep, dtype=bool)
    if keep.shape != (corpus.num_images,):
        raise ValueError(f"keep has shape {keep.shape}, expected ({corpus.num_images},)")
    rows = np.flatnonzero(keep)
    new_row = np.full(corpus.num_images, -1, dtype=np.int64)
    new_row[rows] = np.arange(len(rows))
    caption_keep = keep[corpus.caption_to_image]
    caption_index = np.flatnonzero(caption_keep)

    features = corpus.features
    if features is not None:
        is_prefix = len(rows) == 0 or (rows[-1] == len(rows) - 1)
        features = features[: len(rows)] if is_prefix else features[rows]
    return replace(
        corpus,
        captions=[corpus.captions[j] for j in caption_index],
        caption_to_image=new_row[corpus.caption_to_image[caption_keep]],
        image_ids=[corpus.image_ids[i] for i in rows],
        image_paths=None if corpus.image_paths is None else [corpus.image_paths[i] for i in rows],
        features=features,
        labels=None if corpus.labels is None else corpus.labels[rows],
        caption_ids=None if corpus.caption_ids is None else [corpus.caption_ids[j] for j in caption_index],
        caption_features=None if corpus.caption_features is None else corpus.caption_features[caption_index],
        meta=dict(corpus.meta),
    )


def take_first_images(corpus: Corpus, n: int) -> Corpus:
    """The first ``n`` images of ``corpus`` with all their captions."""
    if n < 1:
        raise DataError(f"{corpus.name}: max_images must be >= 1, got {n}")
    if n >= corpus.num_images:
        return corpus
    keep = np.zeros(corpus.num_images, dtype=bool)
    keep[:n] = True
    return select_images(corpus, keep)
