"""Image checks and corpus selection, shared by every data source (:mod:`vsekit.data.sources`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from vsekit.data.corpus import Corpus, DataError

logger = logging.getLogger(__name__)


def check_images(
    corpus: Corpus,
    *,
    skip_missing: bool = False,
    log: Callable[[str], None] | None = None,
    num_threads: int | None = None,
) -> Corpus:
    """Check that every image file exists and has a readable image header.

    Only headers are read (``Image.open`` without loading pixels): cheap enough for 100K images, and it
    catches missing, empty and non-image files before training starts. Data corrupted past the header is
    reported by :func:`vsekit.data.images.load_rgb` when the image is decoded.

    By default a bad image is a :class:`DataError` naming the first few. With ``skip_missing`` the bad
    images and their captions are dropped, a warning goes to ``log`` (default: this module's logger), and
    the filtered corpus is returned. Precomputed corpora are returned unchanged.
    """
    if corpus.image_paths is None:
        return corpus
    log = log or logger.warning
    paths = corpus.image_paths
    problems = _scan(paths, num_threads)
    if not problems:
        return corpus

    bad = sorted(problems)
    first = "; ".join(f"{paths[i]} ({problems[i]})" for i in bad[:3])
    if not skip_missing:
        raise DataError(
            f"{corpus.name}: {len(bad)} of {len(paths)} images are missing or unreadable, e.g. {first}. "
            "Fix the paths (image_root?) or set skip_missing_images to drop them."
        )
    keep = np.ones(len(paths), dtype=bool)
    keep[bad] = False
    if not keep.any():
        raise DataError(f"{corpus.name}: all {len(paths)} images are missing or unreadable, e.g. {first}")
    filtered = select_images(corpus, keep)
    dropped = int(len(paths) - filtered.num_images)
    filtered.meta["dropped_images"] = dropped
    filtered.meta["dropped_captions"] = corpus.num_captions - filtered.num_captions
    log(
        f"{corpus.name}: skipping {dropped} of {len(paths)} images that are missing or unreadable "
        f"(and their {corpus.num_captions - filtered.num_captions} captions), e.g. {first}"
    )
    return filtered


def _scan(paths: Sequence[Path], num_threads: int | None) -> dict[int, str]:
    """Index -> reason for each path whose header cannot be read. Threads: the work is mostly file I/O."""
    chunk = 512
    starts = range(0, len(paths), chunk)

    def scan_chunk(start: int) -> dict[int, str]:
        found = {}
        for i in range(start, min(start + chunk, len(paths))):
            reason = _header_problem(paths[i])
            if reason is not None:
                found[i] = reason
        return found

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
        with Image.open(path):
            return None
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
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        return f"unreadable header: {exc or type(exc).__name__}"


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
