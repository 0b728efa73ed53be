"""A CSV / JSONL / JSON file of (image, caption) rows, with optional ``split`` and ``label`` columns."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from vsekit.data.corpus import Corpus
from vsekit.data.pairs import read_pairs
from vsekit.data.sources.base import DataConfig, register_source
from vsekit.data.textio import first_char

PAIRS_SUFFIXES = (".csv", ".tsv", ".jsonl")
REQUESTED = "requested"


@register_source("pairs", sniff_priority=30)
class PairsData(DataConfig):
    """a .csv/.tsv/.jsonl pairs file (or a .json array of rows)."""

    format: Literal["pairs"] = "pairs"
    path: str
    image_root: str | None = None  # relative image paths resolve here (default: the file's folder)
    # which rows a split reads: "requested" (the rows whose split column is the split asked for), a split
    # value (those rows, whatever split is asked for), or null (every row: a file per split, no split column)
    split: str | None = Field(REQUESTED, description="rows to read: 'requested', a split value, or null for all")

    def read(self, split: str, max_images: int | None) -> Corpus:
        file_split = split if self.split == REQUESTED else self.split
        return read_pairs(self.path, file_split, image_root=self.image_root)

    @classmethod
    def sniff(cls, path: Path) -> bool:
        suffix = path.suffix.lower()
        return path.is_file() and (suffix in PAIRS_SUFFIXES or (suffix == ".json" and first_char(path) == "["))

    @classmethod
    def from_path(cls, path: Path, image_root: str | None = None) -> dict[str, Any]:
        return {"path": str(path), "image_root": image_root}
