"""Reader for precomputed image features in the VSE++/SCAN layout.

A folder holds ``{split}_ims.npy`` (N x D global or N x R x D region features) and ``{split}_caps.txt``
(one caption per line). The feature file is memory-mapped, never read whole: COCO's BUTD training
features alone are ~33 GB. The number of captions per image is inferred from the two counts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vsekit.data.corpus import Corpus, DataError

# Which file prefixes to try for a requested split. The field uses both ``dev`` (VSE++, SCAN) and ``val``;
# ``testall`` is SCAN/VSRN's name for COCO's 5K test set (their ``test`` is its first 1K images).
_FILE_SPLITS = {"val": ("val", "dev"), "dev": ("dev", "val")}


def read_precomp(root: str | Path, split: str, *, max_images: int | None = None) -> Corpus:
    """Read ``{split}_ims.npy`` + ``{split}_caps.txt`` from ``root``.

    Caption ``j`` belongs to image ``j // k`` with ``k = M / N`` (5 for the usual releases, 1 for data
    that stores one feature row per caption); counts that do not divide are an error rather than a guess.
    ``max_images`` keeps the first N images and their captions, as a view on the memory map.
    """
    root = Path(root)
    if not split or "/" in split or "\\" in split:
        raise DataError(f"{root}: bad split name {split!r}")
    if max_images is not None and max_images < 1:
        raise DataError(f"{root}: max_images must be >= 1, got {max_images}")
    prefix = _find_prefix(root, split)
    ims_path = root / f"{prefix}_ims.npy"
    caps_path = root / f"{prefix}_caps.txt"
    if not caps_path.is_file():
        raise DataError(f"{caps_path}: caption file not found (it goes with {ims_path.name})")

    features = _open_features(ims_path)
    captions = _read_caption_lines(caps_path)
    n, m = features.shape[0], len(captions)
    if n == 0:
        raise DataError(f"{ims_path}: holds no feature rows")
    if m % n != 0:
        raise DataError(
            f"{caps_path} has {m} captions and {ims_path} has {n} image rows; "
            f"{m} is not a multiple of {n}, so captions cannot be assigned to images"
        )
    per_image = m // n
    caption_ids = [f"{caps_path.name}:{line}" for line in range(1, m + 1)]
    if max_images is not None and max_images < n:
        n = max_images
        features = features[:n]  # slicing a memmap gives a memmap: nothing is read
        captions = captions[: n * per_image]
        caption_ids = caption_ids[: n * per_image]

    return Corpus(
        name=f"{root.name or 'precomp'}_{prefix}",
        captions=captions,
        caption_to_image=np.arange(len(captions), dtype=np.int64) // per_image,
        image_ids=[str(i) for i in range(n)],
        features=features,
        caption_ids=caption_ids,
        meta={
            "format": "precomp",
            "source": str(root),
            "split": split,
            "file_split": prefix,
            "captions_per_image": per_image,
            "max_images": max_images,
        },
    )


def _find_prefix(root: Path, split: str) -> str:
    candidates = _FILE_SPLITS.get(split, (split,))
    for prefix in candidates:
        if (root / f"{prefix}_ims.npy").is_file():
            return prefix
    tried = " or ".join(str(root / f"{p}_ims.npy") for p in candidates)
    raise DataError(f"feature file not found: expected {tried}")


def _open_features(path: Path) -> np.ndarray:
    try:
        features = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise DataError(f"{path}: cannot memory-map as a .npy array ({exc})") from None
    if not isinstance(features, np.ndarray) or features.ndim not in (2, 3):
        shape = getattr(features, "shape", None)
        raise DataError(f"{path}: expected an N x D or N x R x D array, got shape {shape}")
    return features


def _read_caption_lines(path: Path) -> list[str]:
    """One caption per line. Split on ``\\n`` only: ``str.splitlines`` would also break captions at
    form feeds or Unicode line separators and shift every later caption onto the wrong image."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 ({exc})") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    captions = [line.strip() for line in lines]
    for number, caption in enumerate(captions, start=1):
        if not caption:
            raise DataError(f"{path}:{number}: empty caption line")
    if not captions:
        raise DataError(f"{path}: holds no captions")
    return captions
