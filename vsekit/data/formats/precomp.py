"""The ``precomp`` data format: precomputed image features in the VSE++/SCAN layout.

A folder holds ``{split}_ims.npy`` (N x D global or N x R x D region features) and ``{split}_caps.txt``
(one caption per line). The feature file is memory-mapped, never loaded whole: COCO's BUTD training
features alone are ~33 GB. The number of captions per image is inferred from the two counts. An optional
``{split}_ids.txt`` (one id per image row, as ``vsekit features extract`` writes) names the images; with it
the captions file may be absent (images only, for ``encode`` and ``index build``).

Feature rows holding NaN or inf are an error naming the file and the first such row. They are found by one
pass over the memory map in chunks of ~64 MB (a float32 sum per chunk; only a chunk whose sum is not finite
is looked at row by row), at most once per file and process: on warm page cache this runs at memory speed
(a few tenths of a second per GB), otherwise at disk speed, and it pages in the features the first epoch
reads anyway.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np

from vsekit.data.corpus import Corpus, DataError
from vsekit.data.sources.base import DataConfig, register_source
from vsekit.data.textio import read_caption_lines

# Which file prefixes to try for a requested split. The field uses both ``dev`` (VSE++, SCAN) and ``val``;
# ``testall`` is SCAN/VSRN's name for COCO's 5K test set (their ``test`` is its first 1K images).
_FILE_SPLITS = {"val": ("val", "dev"), "dev": ("dev", "val")}
_NPY_MAGIC = b"\x93NUMPY"
_CHUNK_BYTES = 64 << 20  # features summed per step of the finiteness check
# (resolved path, size, mtime, inode) -> (rows [0, k) known finite, first non-finite row or None)
_FINITE: dict[tuple, tuple[int, int | None]] = {}
_FINITE_LOCK = threading.Lock()


@register_source("precomp", sniff_priority=10)
class PrecompData(DataConfig):
    """a folder of {split}_ims.npy + {split}_caps.txt (or {split}_ids.txt)."""

    format: Literal["precomp"] = "precomp"
    path: str

    reads_image_files: ClassVar[bool] = False

    def read(self, split: str, max_images: int | None) -> Corpus:
        return read_precomp(self.path, split, max_images=max_images)

    @classmethod
    def sniff(cls, path: Path) -> bool:
        return path.is_dir() and any(path.glob("*_ims.npy")) and (any(path.glob("*_caps.txt"))
                                                                  or any(path.glob("*_ids.txt")))


def read_precomp(root: str | Path, split: str, *, max_images: int | None = None) -> Corpus:
    """Read ``{split}_ims.npy`` + ``{split}_caps.txt`` from ``root``.

    Caption ``j`` belongs to image ``j // k`` with ``k = M / N`` (5 for the usual releases, 1 for data
    that stores one feature row per caption); counts that do not divide are an error rather than a guess.
    ``max_images`` keeps the first N images and their captions, as a view on the memory map; only those rows
    are checked for NaN/inf (:func:`check_finite`).
    """
    root = Path(root)
    if not split or "/" in split or "\\" in split:
        raise DataError(f"{root}: bad split name {split!r}")
    if max_images is not None and max_images < 1:
        raise DataError(f"{root}: max_images must be >= 1, got {max_images}")
    prefix = _find_prefix(root, split)
    ims_path, caps_path, ids_path = (root / f"{prefix}_{name}" for name in ("ims.npy", "caps.txt", "ids.txt"))
    if not caps_path.is_file() and not ids_path.is_file():
        raise DataError(f"{caps_path}: caption file not found (it goes with {ims_path.name})")

    features = _open_features(ims_path)
    captions = read_caption_lines(caps_path) if caps_path.is_file() else []
    n, m = features.shape[0], len(captions)
    if n == 0:
        raise DataError(f"{ims_path}: holds no feature rows")
    if m % n != 0:
        raise DataError(f"{caps_path} has {m} captions and {ims_path} has {n} image rows; "
                        f"{m} is not a multiple of {n}, so captions cannot be assigned to images")
    per_image = m // n
    image_ids = [str(i) for i in range(n)]
    if ids_path.is_file():
        image_ids = read_caption_lines(ids_path)
        if len(image_ids) != n:
            raise DataError(f"{ids_path}: {len(image_ids)} ids for the {n} image rows of {ims_path.name}")
    caption_ids = [f"{caps_path.name}:{line}" for line in range(1, m + 1)]
    if max_images is not None and max_images < n:
        n = max_images
        features = features[:n]  # slicing a memmap gives a memmap: nothing is read
        captions = captions[: n * per_image]
        caption_ids = caption_ids[: n * per_image]
        image_ids = image_ids[:n]
    check_finite(features, ims_path, n, caption_file=caps_path.name, captions_per_image=per_image)
    labels = read_labels(root, prefix, features.shape[0] if max_images is None else None, n)

    return Corpus(name=f"{root.name or 'precomp'}_{prefix}", captions=captions,
                  caption_to_image=np.arange(len(captions), dtype=np.int64) // max(per_image, 1),
                  image_ids=image_ids, features=features, labels=labels, caption_ids=caption_ids,
                  meta={"format": "precomp", "source": str(root), "split": split, "file_split": prefix,
                        "captions_per_image": per_image, "max_images": max_images})


def read_labels(root: Path, prefix: str, expected: int | None, keep: int) -> np.ndarray | None:
    """Optional class labels of the image rows: ``{prefix}_labels.npy`` ((N,) ids or (N, C) 0/1 rows) or
    ``{prefix}_labels.txt`` (one line per image: a class id, or several separated by spaces, commas, ``|`` or
    ``;`` for multi-label data). ``expected``: the number of image rows the file must have (None when only the
    first ``keep`` rows are read)."""
    from vsekit.data.formats.pairs import labels_array, parse_labels

    npy, txt = root / f"{prefix}_labels.npy", root / f"{prefix}_labels.txt"
    if npy.is_file():
        try:
            y = np.load(npy, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DataError(f"{npy}: not a readable .npy file ({e})") from None
        if y.ndim not in (1, 2) or not np.issubdtype(y.dtype, np.integer) and not np.issubdtype(y.dtype, np.bool_):
            raise DataError(f"{npy}: expected (N,) integer class ids or (N, C) 0/1 rows, got {y.dtype} {y.shape}")
        where, y = npy, np.asarray(y, dtype=np.int64)
    elif txt.is_file():
        rows = [parse_labels(line, f"{txt}:{i}") or () for i, line in enumerate(read_caption_lines(txt), 1)]
        where, y = txt, labels_array(rows)
    else:
        return None
    if (expected is not None and len(y) != expected) or len(y) < keep:
        raise DataError(f"{where}: {len(y)} label rows for {expected or keep} image rows")
    return y[:keep]


def _find_prefix(root: Path, split: str) -> str:
    candidates = _FILE_SPLITS.get(split, (split,))
    for prefix in candidates:
        if (root / f"{prefix}_ims.npy").is_file():
            return prefix
    tried = " or ".join(str(root / f"{p}_ims.npy") for p in candidates)
    raise DataError(f"feature file not found: expected {tried}")


def _open_features(path: Path) -> np.ndarray:
    try:
        with open(path, "rb") as f:
            magic = f.read(len(_NPY_MAGIC))
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if magic != _NPY_MAGIC:
        what = "is empty" if not magic else "is not a .npy file (no NPY header)"
        raise DataError(f"{path}: {what}; expected an N x D or N x R x D array saved with numpy.save")
    try:
        features = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:  # a corrupt header or a short file: numpy raises ValueError, OSError, SyntaxError...
        reason = str(exc) or type(exc).__name__
        raise DataError(f"{path}: cannot memory-map as a .npy array ({reason})") from None
    if not isinstance(features, np.ndarray) or features.ndim not in (2, 3):
        shape = getattr(features, "shape", None)
        raise DataError(f"{path}: expected an N x D or N x R x D array, got shape {shape}")
    if not (np.issubdtype(features.dtype, np.floating) or np.issubdtype(features.dtype, np.integer)):
        raise DataError(f"{path}: features must be floats (or integers), got dtype {features.dtype}")
    if 0 in features.shape[1:]:
        raise DataError(f"{path}: feature rows are empty (shape {features.shape})")
    return features


def check_finite(features: np.ndarray, path: Path, rows: int | None = None, *, caption_file: str | None = None,
                 captions_per_image: int | None = None) -> None:
    """Raise a :class:`DataError` naming ``path`` and the first row among the first ``rows`` (default: all)
    that holds NaN or inf.

    One pass in chunks of ~64 MB: a chunk is summed (NaN and inf survive a sum) and looked at row by row only
    when its sum is not finite, which also covers a sum that overflowed. The result is remembered per file
    (path, size, modification time), so the train, val and test reads of one run check each file once and a
    later request for more rows continues where the last one stopped.
    """
    n = features.shape[0] if rows is None else min(rows, features.shape[0])
    if not np.issubdtype(features.dtype, np.floating) or n == 0:
        return
    try:
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    except OSError:
        key = None
    with _FINITE_LOCK:
        done, bad = _FINITE.get(key, (0, None)) if key is not None else (0, None)
    if bad is None and done < n:
        row_size = math.prod(features.shape[1:])
        step = max(1, _CHUNK_BYTES // (row_size * features.dtype.itemsize))
        accumulate = np.float32 if features.dtype.itemsize < 4 else None  # float16 sums overflow early
        for start in range(done, n, step):
            chunk = features[start : min(start + step, n)]
            with np.errstate(all="ignore"):
                total = chunk.sum(dtype=accumulate)
            if not np.isfinite(total):
                finite_rows = np.isfinite(chunk.reshape(len(chunk), -1)).all(axis=1)
                if not finite_rows.all():
                    bad = start + int(np.argmin(finite_rows))
                    done = bad
                    break
            done = start + len(chunk)
        if key is not None:
            with _FINITE_LOCK:
                _FINITE[key] = (done, bad)
    if bad is not None and bad < n:
        row = np.asarray(features[bad])
        nan, inf = int(np.isnan(row).sum()), int(np.isinf(row).sum())
        what = " and ".join(f"{k} {name}" for k, name in ((nan, "NaN"), (inf, "inf")) if k)
        owner = ""
        if caption_file and captions_per_image:
            first = bad * captions_per_image + 1
            last = first + captions_per_image - 1
            lines = f"line {first}" if first == last else f"lines {first}-{last}"
            owner = f" (the image of {caption_file} {lines})"
        raise DataError(f"{path}: row {bad}{owner} holds {what} of its {row.size} values, the first non-finite "
                        "row in the file; recompute the features, or drop the row and its captions")
