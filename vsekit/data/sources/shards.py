"""webdataset tar shards (``vsekit shards`` writes them): images or precomputed features, read by offset."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from vsekit.data.corpus import Corpus
from vsekit.data.shards import read_shards
from vsekit.data.sources.base import DataConfig, register_source


@register_source("shards", sniff_priority=15)
class ShardsData(DataConfig):
    """a folder of webdataset {split}-NNNNNN.tar shards."""

    format: Literal["shards"] = "shards"
    # a folder of {split}-*.tar, one .tar, or a pattern: shards/{split}-{000000..000009}.tar, shards/*.tar
    path: str

    def read(self, split: str, max_images: int | None) -> Corpus:
        return read_shards(self.path, split, max_images=max_images)

    @classmethod
    def sniff(cls, path: Path) -> bool:
        if path.is_file():
            return path.suffix == ".tar"
        return path.is_dir() and any(p.is_file() for p in path.glob("*-*.tar"))
