"""The interface every backend implements (see :mod:`vsekit.index.backends` for the life of a write)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from vsekit.index.data import AnnParams, IndexData, SearchIndexError


class Backend(ABC):
    """The vectors of one index: kept in step with its records by the writes, searched by :meth:`search`.

    After :meth:`build`, :meth:`add` or :meth:`remove` the backend is bound to the data it returned; after
    :func:`open_backend`, to the data it was opened with.

    What a backend keeps beside the records it declares here: its own files in a generation folder, one per
    target (``files``: extension -> what it holds), and the model of its manifest section
    (``manifest_section``)."""

    name: ClassVar[str]
    files: ClassVar[dict[str, str]] = {}
    manifest_section: ClassVar[type | None] = None
    inner_product_only: ClassVar[tuple[str, str] | None] = None

    def __init__(self, kind: str, params: AnnParams) -> None:
        self.kind, self.params = kind, params
        self.data: IndexData | None = None

    # -- what the manifest and the generation folder hold ----------------------------------------------
    @classmethod
    def check_manifest(cls, manifest: Any) -> None:
        """Refuse (ValueError, naming the field) a validated manifest whose section of this backend does not
        fit its other fields."""
        return None

    @classmethod
    def load_files(cls, gen: Path, names: Sequence[str], manifest: dict[str, Any]) -> dict[str, Any]:
        """target -> the structure read from this backend's files ``names`` of generation ``gen``."""
        return {}

    @classmethod
    def save_files(cls, folder: Path, data: IndexData) -> None:
        """Write the structures of ``data`` into the generation ``folder``."""
        return None

    @classmethod
    def replaced(cls, index_dir: Path, previous: dict[str, Any], written: dict[str, Any]) -> None:
        """Called when the index ``previous`` (of this backend) at ``index_dir`` was replaced by ``written``."""
        return None

    # -- construction ------------------------------------------------------------------------------------
    @classmethod
    def check_model(cls, similarity: str, kind: str) -> None:
        """Refuse a model whose similarity this backend cannot rank by (before anything is encoded): a backend
        with ``inner_product_only`` (what it would rank by, and what to use instead) serves cosine models
        only."""
        if similarity != "cosine" and cls.inner_product_only is not None:
            wrong, instead = cls.inner_product_only
            raise SearchIndexError(f"this model scores with {similarity!r} similarity, which is not an inner "
                                   f"product: {wrong.format(kind=kind)} would rank by the wrong score. "
                                   f"{instead.format(similarity=similarity)}")

    @classmethod
    def create(cls, config: Any, *, index_dir: str | Path, kind: str, params: AnnParams,
               targets: Sequence[str], overwrite: bool) -> Backend:
        """The backend a new index at ``index_dir`` is built with (not bound to data yet)."""
        return cls(kind, params)

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any], params: AnnParams) -> Backend:
        """The backend an existing index's manifest describes (not bound to data yet)."""
        return cls(manifest["kind"], params)

    def attach(self, data: IndexData) -> None:
        """Bind to the data of an opened index."""
        self.data = data

    # -- writes and search -------------------------------------------------------------------------------
    @abstractmethod
    def build(self, data: IndexData) -> IndexData:
        """A fresh index of ``data`` (vectors and records); returns the generation to write."""

    @abstractmethod
    def add(self, old: IndexData, new: IndexData) -> IndexData:
        """``old`` plus the items of ``new`` (their vectors and records, appended in this order)."""

    @abstractmethod
    def remove(self, old: IndexData, keep: dict[str, np.ndarray]) -> IndexData:
        """``old`` without the rows whose ``keep[target]`` is False."""

    @abstractmethod
    def search(self, target: str, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows) of the top ``k`` of each query by inner product, best first; rows index
        ``data.records(target)``; a row of -1 pads a list shorter than ``k``."""

    def manifest_fields(self) -> dict[str, Any]:
        """What the manifest records about the backend of the data it is bound to."""
        return {"backend": self.name, "kind": self.kind, "params": asdict(self.params),
                "nlist": None, "recall_at_10": None}

    def committed(self) -> None:
        """Called once the manifest naming the last write's generation is committed."""
        return None

    def discard(self) -> None:
        """Undo what :meth:`build` did outside the index folder, when its generation was never committed."""
        return None

    def close(self) -> None:
        """Release connections or locks."""
        return None

    def _bound(self) -> IndexData:
        if self.data is None:
            raise SearchIndexError("the backend is not bound to an index's data yet")
        return self.data
