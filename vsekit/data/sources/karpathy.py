"""Karpathy-style JSON (``dataset_coco.json``, ``dataset_flickr30k.json``) with the images beside it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from vsekit.data.corpus import Corpus
from vsekit.data.karpathy import read_karpathy
from vsekit.data.sources.base import DataConfig, register_source
from vsekit.data.textio import first_char


@register_source("karpathy", sniff_priority=20)
class KarpathyData(DataConfig):
    """a Karpathy dataset_*.json."""

    format: Literal["karpathy"] = "karpathy"
    path: str
    image_root: str | None = None  # folder of filepath/filename (default: the JSON file's folder)
    restval_into_train: bool = False  # COCO: train on the restval images too (113,287 images)

    def read(self, split: str, max_images: int | None) -> Corpus:
        return read_karpathy(self.path, self.image_root, split, restval_into_train=self.restval_into_train,
                             max_images=max_images)

    @classmethod
    def sniff(cls, path: Path) -> bool:
        return path.is_file() and path.suffix.lower() == ".json" and first_char(path) == "{"

    @classmethod
    def from_path(cls, path: Path, image_root: str | None = None) -> dict[str, Any]:
        return {"path": str(path), "image_root": image_root or str(path.parent)}
