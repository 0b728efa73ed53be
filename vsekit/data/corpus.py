"""The in-memory description of one split of an image-caption collection.

Every reader (Karpathy JSON, precomputed features, pairs file, demo set) returns a :class:`Corpus`.
Protocol facts are explicit data: ``caption_to_image[j]`` is the row of caption ``j``'s image; nothing
assumes a fixed number of captions per image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vsekit.errors import VsekitError


class DataError(VsekitError, ValueError):
    """Bad or missing input data; the message names the file (and line or field where it applies)."""


@dataclass
class Corpus:
    """One split: N images and M captions.

    Exactly one of ``image_paths`` (raw images) and ``features`` (precomputed, memory-mapped) is set.
    """

    name: str
    captions: list[str]
    caption_to_image: np.ndarray  # (M,) int64, values in [0, N)
    image_ids: list[str]  # (N,) stable ids (file name, cocoid, row number, ...)
    image_paths: list[Path] | None = None
    features: np.ndarray | None = None  # (N, D) or (N, R, D), usually np.memmap
    # (N,) int64 class id per image (-1 = unknown), or (N, C) 0/1 multi-hot rows (multi-label, e.g. MSCOCO)
    labels: np.ndarray | None = None
    caption_ids: list[str] | None = None  # (M,) stable ids of captions (sentid, file:line, ...)
    # (M, Dt) precomputed text features (bag of words, TF-IDF, LDA, ...) of the captions, for data sets that
    # ship text as vectors only (the cross-modal label benchmarks); ``captions`` then hold row ids
    caption_features: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.caption_to_image = np.asarray(self.caption_to_image, dtype=np.int64)
        n, m = len(self.image_ids), len(self.captions)
        if self.caption_to_image.shape != (m,):
            raise DataError(f"{self.name}: caption_to_image has shape {self.caption_to_image.shape}, expected ({m},)")
        if m and (self.caption_to_image.min() < 0 or self.caption_to_image.max() >= n):
            raise DataError(f"{self.name}: caption_to_image holds rows outside [0, {n})")
        if (self.image_paths is None) == (self.features is None):
            raise DataError(f"{self.name}: a corpus needs exactly one of image_paths and features")
        if self.image_paths is not None and len(self.image_paths) != n:
            raise DataError(f"{self.name}: {len(self.image_paths)} image paths for {n} image ids")
        if self.features is not None and self.features.shape[0] != n:
            raise DataError(f"{self.name}: {self.features.shape[0]} feature rows for {n} image ids")
        if self.labels is not None:
            self.labels = np.asarray(self.labels, dtype=np.int64)
            if self.labels.ndim not in (1, 2) or self.labels.shape[0] != n:
                raise DataError(f"{self.name}: labels have shape {self.labels.shape}, expected ({n},) class ids "
                                f"or ({n}, C) multi-hot rows")
            if self.labels.ndim == 2 and not np.isin(self.labels, (0, 1)).all():
                raise DataError(f"{self.name}: multi-hot labels must be 0 or 1")
        if self.caption_features is not None:
            shape = getattr(self.caption_features, "shape", ())
            if len(shape) != 2 or shape[0] != m:
                raise DataError(f"{self.name}: caption_features have shape {shape}, expected ({m}, D)")
        if self.caption_ids is not None and len(self.caption_ids) != m:
            raise DataError(f"{self.name}: {len(self.caption_ids)} caption ids for {m} captions")

    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    @property
    def num_captions(self) -> int:
        return len(self.captions)

    @property
    def is_precomputed(self) -> bool:
        return self.features is not None

    @property
    def has_text_features(self) -> bool:
        return self.caption_features is not None

    @property
    def multi_label(self) -> bool:
        return self.labels is not None and self.labels.ndim == 2

    def caption_labels(self) -> np.ndarray | None:
        """The labels of each caption (its image's)."""
        return None if self.labels is None else self.labels[self.caption_to_image]

    def captions_per_image(self) -> np.ndarray:
        """(N,) number of captions of each image."""
        return np.bincount(self.caption_to_image, minlength=self.num_images)
