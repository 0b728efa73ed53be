"""One entry point from a config's data spec to a :class:`Corpus`, plus an up-front image check.

A spec is a plain dict, e.g. ``{"format": "karpathy", "path": "data/dataset_coco.json",
"image_root": "data/coco", "restval_into_train": true}``. Keys:

- ``format``: ``karpathy`` | ``precomp`` | ``pairs`` | ``demo``
- ``path``: the JSON file / the precomp folder / the pairs file (not for ``demo``)
- ``image_root``: folder image paths are relative to (karpathy, pairs)
- ``split``: pairs only; the ``split`` value to select in the file instead of the requested split name,
  ``null`` for every row (a file without a split column, e.g. one file per split)
- ``restval_into_train``: karpathy only; train on COCO's restval images too
- ``max_images``: keep the first N images of the split with their captions (small dev sets)
- ``check_images`` (default true) and ``skip_missing_images`` (default false): see :func:`check_images`
- ``root``, ``num_images``, ``seed``, ``image_size``: passed to the demo builder
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from vsekit.data.corpus import Corpus, DataError
from vsekit.data.karpathy import read_karpathy
from vsekit.data.pairs import read_pairs
from vsekit.data.precomp import read_precomp

logger = logging.getLogger(__name__)

FORMATS = ("karpathy", "precomp", "pairs", "demo")
_COMMON_KEYS = {"format", "name", "max_images", "check_images", "skip_missing_images"}
_FORMAT_KEYS = {
    "karpathy": {"path", "image_root", "restval_into_train"},
    "precomp": {"path"},
    "pairs": {"path", "image_root", "split"},
    "demo": {"root", "num_images", "seed", "image_size", "restval_into_train"},
}
_DEMO_KEYS = ("root", "num_images", "seed", "image_size")


def load_corpus(spec: dict[str, Any], split: str) -> Corpus:
    """Read ``split`` of the data set described by ``spec`` (see the module docstring for the keys).

    Image-backed corpora are checked with :func:`check_images` after ``max_images`` is applied, so a
    dev subset only checks its own images. Unknown keys are logged, since a misspelt
    ``restval_into_train`` would otherwise silently change the training set.
    """
    if not isinstance(spec, dict):
        raise DataError(f"data spec must be a dict, got {type(spec).__name__}")
    fmt = spec.get("format")
    if fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r}; known formats: {', '.join(FORMATS)}")
    unknown = set(spec) - _COMMON_KEYS - _FORMAT_KEYS[fmt]
    if unknown:
        logger.warning("data spec (format %s): ignoring unknown keys %s", fmt, ", ".join(sorted(unknown)))
    max_images = spec.get("max_images")

    if fmt == "karpathy":
        corpus = read_karpathy(
            _path(spec),
            spec.get("image_root"),
            split,
            restval_into_train=bool(spec.get("restval_into_train", False)),
            max_images=max_images,
        )
    elif fmt == "precomp":
        corpus = read_precomp(_path(spec), split, max_images=max_images)
    elif fmt == "pairs":
        file_split = spec["split"] if "split" in spec else split
        corpus = read_pairs(_path(spec), file_split, image_root=spec.get("image_root"))
        if max_images is not None:
            corpus = take_first_images(corpus, max_images)
    else:
        from vsekit.data.demo import build_demo  # lazy: generating the demo set is its own concern

        json_path = Path(build_demo(**{k: spec[k] for k in _DEMO_KEYS if k in spec}))
        corpus = read_karpathy(
            json_path,
            json_path.parent,
            split,
            restval_into_train=bool(spec.get("restval_into_train", False)),
            max_images=max_images,
        )

    if corpus.image_paths is not None and spec.get("check_images", True):
        corpus = check_images(corpus, skip_missing=bool(spec.get("skip_missing_images", False)))
    return corpus


def _path(spec: dict[str, Any]) -> str | Path:
    path = spec.get("path")
    if not path:
        raise DataError(f"data spec (format {spec['format']}) needs a 'path'")
    return path


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
