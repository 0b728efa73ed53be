"""A folder of image files, each optionally with captions in a same-named ``.txt`` file beside it.

``photos/beach.jpg`` + ``photos/beach.txt`` (one caption per line) is one image with its captions; an image
without a ``.txt`` has none (fine for indexing and encoding). When the folder has ``train/``, ``val/`` or
``test/`` subfolders, a split reads its subfolder; otherwise every split is the whole folder. Image ids are
paths relative to the folder read.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import numpy as np

from vsekit.data.corpus import Corpus, DataError
from vsekit.data.images import IMAGE_EXTENSIONS
from vsekit.data.sources.base import DataConfig, register_source
from vsekit.data.textio import read_caption_lines

SPLIT_FOLDERS = ("train", "val", "test")
logger = logging.getLogger("vsekit.data")


def list_images(folder: str | Path, recursive: bool = True) -> list[Path]:
    """The image files under ``folder`` (by extension), sorted by path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder")
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def read_folder(folder: str | Path, *, recursive: bool = True, captions: bool = True) -> Corpus:
    """Every image under ``folder``; with ``captions``, the lines of ``<image stem>.txt`` are its captions
    (an empty line or a byte that is not UTF-8 is an error naming the file and line)."""
    folder = Path(folder)
    paths = list_images(folder, recursive)
    if not paths:
        raise DataError(f"{folder}: no image files found ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    texts: list[str] = []
    caption_ids: list[str] = []
    owner: list[int] = []
    for row, p in enumerate(paths):
        side = p.with_suffix(".txt")
        if not captions or not side.is_file():
            continue
        for i, line in enumerate(read_caption_lines(side, allow_empty_file=True), 1):
            texts.append(line)
            caption_ids.append(f"{side.relative_to(folder).as_posix()}:{i}")
            owner.append(row)
    return Corpus(name=str(folder), captions=texts, caption_to_image=np.asarray(owner, dtype=np.int64),
                  image_ids=[p.relative_to(folder).as_posix() for p in paths], image_paths=paths,
                  caption_ids=caption_ids, meta={"format": "folder", "source": str(folder)})


@register_source("folder", sniff_priority=90)
class FolderData(DataConfig):
    """a folder of images (with optional same-named .txt captions)."""

    format: Literal["folder"] = "folder"
    path: str
    recursive: bool = True
    captions: bool = True  # read <image>.txt files as captions

    def read(self, split: str, max_images: int | None) -> Corpus:
        root = Path(self.path)
        sub = root / split
        if split in SPLIT_FOLDERS and sub.is_dir():
            return read_folder(sub, recursive=self.recursive, captions=self.captions)
        if any((root / s).is_dir() for s in SPLIT_FOLDERS):
            raise DataError(f"{root}: has split subfolders but no {split}/")
        return read_folder(root, recursive=self.recursive, captions=self.captions)

    @classmethod
    def sniff(cls, path: Path) -> bool:
        return path.is_dir()
