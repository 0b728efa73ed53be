"""Search indexes over embedded collections: build, update, query.

Typical use::

    from vsekit.index import SearchIndex
    index = SearchIndex.open("runs/demo_index")
    for hit in index.search_text("a red circle left of a square", k=5):
        print(hit.rank, f"{hit.score:+.3f}", hit.path)
"""

from __future__ import annotations

from vsekit.index.backends import LocalConfig, QdrantConfig
from vsekit.index.build import add_to_index, build_index, corpus_from_folder, remove_from_index
from vsekit.index.data import AnnParams, IndexMismatchError, SearchIndexError
from vsekit.index.manifest import read_manifest
from vsekit.index.search import SearchIndex, SearchResult

__all__ = ["AnnParams", "IndexMismatchError", "LocalConfig", "QdrantConfig", "SearchIndex",
           "SearchIndexError", "SearchResult", "add_to_index", "build_index", "corpus_from_folder",
           "read_manifest", "remove_from_index"]
