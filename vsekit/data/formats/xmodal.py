"""Cross-modal label benchmarks shipped as feature files: Wikipedia, NUS-WIDE-10k, Pascal Sentences, MSCOCO.

The common public releases (those the ACMR / DSCMR line of work reads) hold, per split, an image-feature
matrix, a text-feature matrix (bag of words, TF-IDF, LDA or sentence vectors: the text itself is not shipped)
and labels, one row per pair, as MATLAB ``.mat`` or NumPy ``.npy`` files::

    {split}_img.mat      variable {split}_img       (N, Di)  e.g. 4,096-d VGG fc7
    {split}_txt.mat      variable {split}_txt       (N, Dt)  e.g. 5,000-d bag of words
    {split}_img_lab.mat  variable {split}_img_lab   (N,) / (N, 1) class ids, or (N, C) one-hot / multi-hot

(``{split}_lab.*`` is accepted for the labels too, and a ``.mat`` file with a single variable may name it
anything.) Class ids that start at 1 (MATLAB releases) are shifted to start at 0; one-hot rows become class
ids; rows with several ones stay multi-hot (MSCOCO's 80 categories). Every file is read with scipy / numpy
without pickle (``allow_pickle=False``).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

import numpy as np

from vsekit.data.corpus import Corpus, DataError
from vsekit.data.sources.base import DataConfig, register_source

_SUFFIXES = (".mat", ".npy")
_LABEL_STEMS = ("{split}_img_lab", "{split}_lab", "{split}_labels")


def _find(root: Path, stems: tuple[str, ...], split: str, what: str) -> Path:
    for stem in stems:
        for suffix in _SUFFIXES:
            p = root / (stem.format(split=split) + suffix)
            if p.is_file():
                return p
    names = ", ".join(s.format(split=split) + "{.mat,.npy}" for s in stems)
    raise DataError(f"{root}: no {what} file for split {split!r} (looked for {names})")


def read_matrix(path: Path) -> np.ndarray:
    """The array in a ``.npy`` file or a ``.mat`` file (its variable named like the file, or its only one)."""
    try:
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False)
        from scipy.io import loadmat

        data = {k: v for k, v in loadmat(str(path)).items() if not k.startswith("__")}
    except (OSError, ValueError, NotImplementedError) as e:
        raise DataError(f"{path}: not a readable {path.suffix} file ({str(e).splitlines()[0] if str(e) else e})") \
            from None
    if path.stem in data:
        return np.asarray(data[path.stem])
    arrays = [k for k, v in data.items() if isinstance(v, np.ndarray) and v.dtype != object]
    if len(arrays) != 1:
        raise DataError(f"{path}: expected a variable named {path.stem!r} or a single matrix, found {sorted(data)}")
    return np.asarray(data[arrays[0]])


def _features(path: Path) -> np.ndarray:
    x = read_matrix(path)
    if x.ndim != 2 or x.shape[0] == 0 or not np.issubdtype(x.dtype, np.number):
        raise DataError(f"{path}: expected a non-empty (N, D) numeric matrix, got {x.dtype} {x.shape}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    bad = ~np.isfinite(x).all(1)
    if bad.any():
        raise DataError(f"{path}: row {int(np.flatnonzero(bad)[0])} holds NaN or inf ({int(bad.sum())} rows)")
    return x


def _as_ids(y: np.ndarray) -> np.ndarray:
    return y[:, 0] if y.ndim == 2 and y.shape[1] == 1 else y


def label_layout(raws: list[np.ndarray]) -> tuple[bool, bool]:
    """(shift ids by -1, keep multi-hot) for a data set, decided over the label arrays of all its splits: ids
    are 1-based when no split holds a 0 and the smallest id is 1; 0/1 rows are class ids when every row of every
    split has exactly one 1. Deciding per split would renumber a split that lacks class 0, or turn a split whose
    rows happen to have one category each into class ids."""
    ids = [_as_ids(np.asarray(r)) for r in raws]
    flat = [y for y in ids if y.ndim == 1 and y.size]
    shift = bool(flat) and min(int(y.min()) for y in flat) == 1 and not any((y == 0).any() for y in flat)
    hot = [y for y in ids if y.ndim == 2]
    multi = any(np.asarray(y).sum(1).max(initial=0) != 1 or np.asarray(y).sum(1).min(initial=1) != 1 for y in hot)
    return shift, multi


def normalise_labels(raw: np.ndarray, where: str, *, shift: bool | None = None,
                     multi: bool | None = None) -> np.ndarray:
    """(N,) 0-based class ids, or (N, C) multi-hot rows, from any of the releases' label layouts. ``shift`` and
    ``multi`` (from :func:`label_layout` over the whole data set) override what this array alone suggests."""
    y = _as_ids(np.asarray(raw))
    if not np.issubdtype(y.dtype, np.number):
        raise DataError(f"{where}: labels must be numbers, got {y.dtype}")
    own_shift, own_multi = label_layout([y])
    shift = own_shift if shift is None else shift
    multi = own_multi if multi is None else multi
    if y.ndim == 1:
        if not np.all(np.equal(np.mod(y, 1), 0)):
            raise DataError(f"{where}: class ids must be integers")
        y = y.astype(np.int64) - (1 if shift else 0)
        if y.size and y.min() < 0:
            raise DataError(f"{where}: class id {int(y.min()) + (1 if shift else 0)} is out of range"
                            + (" (ids start at 1 in the other splits)" if shift else ""))
        return y
    if y.ndim != 2 or not np.isin(y, (0, 1)).all():
        raise DataError(f"{where}: expected class ids (N,) or 0/1 rows (N, C), got {y.dtype} {y.shape}")
    y = y.astype(np.int64)
    per_row = y.sum(1)
    if (per_row == 0).any():
        raise DataError(f"{where}: row {int(np.flatnonzero(per_row == 0)[0])} has no label")
    return y if multi else y.argmax(1)  # one-hot in every split: class ids


def _label_paths(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.suffix in _SUFFIXES
                  and any(p.stem.endswith(s.replace("{split}", "")) for s in _LABEL_STEMS))


def _dataset_layout(root: Path) -> tuple[bool, bool]:
    key = tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in _label_paths(root))
    if _LAYOUTS.get(root) and _LAYOUTS[root][0] == key:
        return _LAYOUTS[root][1]
    layout = label_layout([read_matrix(p) for p in _label_paths(root)])
    _LAYOUTS[root] = (key, layout)
    return layout


_LAYOUTS: dict[Path, tuple[tuple, tuple[bool, bool]]] = {}


@register_source("xmodal", sniff_priority=16)  # after shards: a folder holding both reads as shards
class CrossModalFeatureData(DataConfig):
    """a folder of {split}_img / {split}_txt / {split}_img_lab .mat or .npy feature files."""

    format: Literal["xmodal"] = "xmodal"
    path: str
    reads_image_files: ClassVar[bool] = False

    def read(self, split: str, max_images: int | None) -> Corpus:
        root = Path(self.path)
        if not root.is_dir():
            raise DataError(f"{root}: not a folder")
        img_path = _find(root, ("{split}_img",), split, "image-feature")
        txt_path = _find(root, ("{split}_txt",), split, "text-feature")
        lab_path = _find(root, _LABEL_STEMS, split, "label")
        images, texts = _features(img_path), _features(txt_path)
        shift, multi = _dataset_layout(root)
        labels = normalise_labels(read_matrix(lab_path), str(lab_path), shift=shift, multi=multi)
        n = images.shape[0]
        if texts.shape[0] != n or labels.shape[0] != n:
            raise DataError(f"{root}: split {split!r} has {n} image rows, {texts.shape[0]} text rows and "
                            f"{labels.shape[0]} label rows ({img_path.name}, {txt_path.name}, {lab_path.name})")
        if max_images is not None and max_images < n:
            n = max_images
            images, texts, labels = images[:n], texts[:n], labels[:n]
        ids = [f"{split}:{i}" for i in range(n)]
        return Corpus(name=f"{root.name}_{split}", captions=[f"{txt_path.name}:{i + 1}" for i in range(n)],
                      caption_to_image=np.arange(n), image_ids=ids, features=images, labels=labels,
                      caption_ids=list(ids), caption_features=texts,
                      meta={"format": "xmodal", "source": str(root), "split": split})

    @classmethod
    def sniff(cls, path: Path) -> bool:
        return path.is_dir() and (any(path.glob("*_img.mat")) or any(path.glob("*_img.npy")))
