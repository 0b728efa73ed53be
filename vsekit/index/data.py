"""What every part of an index shares: its errors, targets and kinds, the ANN parameters, one generation's data
in memory, and reading one of its files with a one-line error."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vsekit.errors import VsekitError, one_line
from vsekit.index import thumbnails as thumbs
from vsekit.models.local_sets import LocalSets

KINDS = ("exact", "ivf", "hnsw")
TARGETS = ("images", "captions")
# what a user is told of an index of a vsekit before 0.1.0
BEFORE_RELEASE = "written by a vsekit before 0.1.0, which this one does not read: rebuild it with `vsekit index build`"


class SearchIndexError(VsekitError, ValueError):
    """A missing, corrupt or incompatible index, or a request the index cannot serve."""


class IndexMismatchError(SearchIndexError):
    """The model at hand is not the one the index was built with: its embeddings are not comparable."""


@dataclass
class AnnParams:
    """Parameters of the approximate indexes. ``nlist=None`` picks about sqrt(N) lists."""

    nlist: int | None = None
    nprobe: int = 16
    hnsw_m: int = 32
    ef_construction: int = 40
    ef_search: int = 64

    def __post_init__(self) -> None:
        for name in ("nprobe", "hnsw_m", "ef_construction", "ef_search"):
            if int(getattr(self, name)) < 1:
                raise SearchIndexError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.nlist is not None and self.nlist < 1:
            raise SearchIndexError(f"nlist must be >= 1, got {self.nlist}")

    @classmethod
    def of_manifest(cls, manifest: dict[str, Any]) -> AnnParams:
        """The parameters a (validated) manifest records."""
        return cls(**manifest.get("params", {}))


@dataclass
class IndexData:
    """The vectors and records of one generation. Vectors may be read-only memory maps; they are ``None``
    when they live in a vector database (the records are always here)."""

    image_vectors: np.ndarray | None
    images: list[dict[str, Any]]
    caption_vectors: np.ndarray | None = None
    captions: list[dict[str, Any]] | None = None
    ann: dict[str, Any] = field(default_factory=dict)  # target -> a backend's search structure in the folder
    sets: dict[str, LocalSets] = field(default_factory=dict)  # target -> local sets (similarity networks only)
    thumbnails: thumbs.Thumbnails | None = None  # one row per image; None: the index has none

    @property
    def has_captions(self) -> bool:
        return self.captions is not None

    def vectors(self, target: str) -> np.ndarray:
        if target == "captions" and not self.has_captions:
            raise SearchIndexError("this index holds no captions")
        v = self.image_vectors if target == "images" else self.caption_vectors
        if v is None:
            raise SearchIndexError("this index keeps its vectors in a vector database, not in its folder")
        return v

    def appended(self, new: IndexData, vectors: bool = True) -> IndexData:
        """These items followed by those of ``new``: vectors (without ``vectors``, none), records, local sets
        and thumbnails (empty ones for new items that have none, when these items have thumbnails)."""
        def join(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
            return None if not vectors else a if b is None else b if a is None else np.concatenate([a, b])

        data = IndexData(join(self.image_vectors, new.image_vectors), self.images + new.images)
        if self.has_captions:
            data.caption_vectors = join(self.caption_vectors, new.caption_vectors)
            data.captions = (self.captions or []) + (new.captions or [])
        data.sets = {t: LocalSets.concat([self.sets[t], s]) for t, s in new.sets.items()}
        if self.thumbnails is not None:
            added = new.thumbnails if new.thumbnails is not None else thumbs.Thumbnails.empty(
                len(new.images), self.thumbnails.max_side)
            data.thumbnails = thumbs.Thumbnails.concat([self.thumbnails, added])
        return data

    def subset(self, keep: dict[str, np.ndarray]) -> IndexData:
        """The items whose ``keep[target]`` is True: their vectors (where these data hold them), records,
        local sets and thumbnails."""
        def pick(v: np.ndarray | None, k: np.ndarray) -> np.ndarray | None:
            return np.asarray(v[k]) if v is not None and len(k) else v

        data = IndexData(pick(self.image_vectors, keep["images"]),
                         [r for r, k in zip(self.images, keep["images"]) if k])
        if self.has_captions:
            data.caption_vectors = pick(self.caption_vectors, keep["captions"])
            data.captions = [c for c, k in zip(self.captions or [], keep["captions"]) if k]
        data.sets = {t: s.subset(np.flatnonzero(keep[t])) for t, s in self.sets.items() if t in keep}
        if self.thumbnails is not None:
            data.thumbnails = self.thumbnails.subset(np.flatnonzero(keep["images"]))
        return data

    def records(self, target: str) -> list[dict[str, Any]]:
        return self.images if target == "images" else (self.captions or [])

    def count(self, target: str) -> int:
        """Number of items of ``target``; an index without captions has none to search."""
        if target == "captions" and not self.has_captions:
            raise SearchIndexError("this index holds no captions")
        return len(self.records(target))


def read_file(path: Path, what: str, read: Callable[[], Any]) -> Any:
    """``read()``, with every failure a one-line SearchIndexError naming ``path``."""
    try:
        return read()
    except SearchIndexError:
        raise
    except FileNotFoundError:
        raise SearchIndexError(f"{path}: missing: the index's {what} file is not there") from None
    except UnicodeDecodeError as e:
        raise SearchIndexError(f"{path}: unreadable {what} file (not UTF-8 text at byte {e.start})") from None
    except (OSError, ValueError, EOFError, RuntimeError, MemoryError) as e:
        # a C++ library may report a truncated file as a RuntimeError whose text is a location and assertion
        raise SearchIndexError(f"{path}: unreadable {what} file, truncated or corrupt ({one_line(e)})") from None
