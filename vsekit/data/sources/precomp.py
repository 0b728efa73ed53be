"""Precomputed image features (``{split}_ims.npy``, memory-mapped) and ``{split}_caps.txt``: the VSE++ / SCAN
releases, and what ``vsekit features extract`` writes (with ``{split}_ids.txt``)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from vsekit.data.corpus import Corpus
from vsekit.data.precomp import read_precomp
from vsekit.data.sources.base import DataConfig, register_source


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
