"""``manifest.json``, the file of an index that names all others (what it records: docs/search.md): its
schema, reading (validated field by field) and writing. A backend's own section (``"qdrant"``) and files are
those it declares (:attr:`Backend.manifest_section`, :attr:`Backend.files`). An index whose vectors live in a
vector database has format version 2, so that a vsekit that predates backends refuses it ("upgrade vsekit")
instead of looking for files that are not there.
"""

from __future__ import annotations

import json
import re
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from vsekit.errors import one_line
from vsekit.index import thumbnails as thumbs
from vsekit.index.backends import BACKENDS, backend_class, backend_files, kinds_of
from vsekit.index.data import BEFORE_RELEASE, TARGETS, AnnParams, IndexData, SearchIndexError
from vsekit.registry import short_repr
from vsekit.utils.io import atomic_write_json

INDEX_FORMAT = "vsekit-index"
INDEX_VERSION = 2  # the newest format this vsekit reads; version 1 = vectors in the folder (still written)
MANIFEST = "manifest.json"
GENERATION = re.compile(r"^g(\d{6,})$")  # the name of a generation folder
# The only file names a generation holds; the manifest's "files" may name no other (no paths).
SET_EXTS = ("sets.npy", "offsets.npy")  # the local sets of a similarity-network model
FILE_NAMES = tuple(f"{t}.{ext}" for t in TARGETS for ext in ("npy", "jsonl", *backend_files(), *SET_EXTS))
# backend name -> the model of its manifest section, for the backends that have one
_SECTIONS = {cls.name: cls.manifest_section for cls in BACKENDS.values() if cls.manifest_section is not None}


# -- the schema -------------------------------------------------------------------------------------------
class _FileRecord(BaseModel):
    """Size and sha256 of one file of the generation."""

    model_config = ConfigDict(extra="forbid")

    bytes: StrictInt = Field(ge=0)
    sha256: StrictStr = Field(pattern=r"^[0-9a-f]{64}$")


# the fields of AnnParams, strict
_ManifestParams = create_model(
    "_ManifestParams", __config__=ConfigDict(extra="forbid"),
    **{f.name: (StrictInt | None if f.default is None else StrictInt, Field(f.default, ge=1))
       for f in fields(AnnParams)})


class _ThumbnailsManifest(BaseModel):
    """The ``thumbnails`` section: the generation whose folder holds them, their size and count, and the
    checksums of their two files."""

    model_config = ConfigDict(extra="forbid")

    generation: StrictStr = Field(pattern=GENERATION.pattern)
    format: Literal["jpeg"] = "jpeg"
    max_side: StrictInt = Field(ge=1, le=thumbs.MAX_SIDE_LIMIT)
    count: StrictInt = Field(ge=0)
    files: dict[Literal["images.thumbs", "images.thumbs.npy"], _FileRecord]

    @field_validator("files")
    @classmethod
    def _both(cls, v: dict[str, _FileRecord]) -> dict[str, _FileRecord]:
        if set(v) != set(thumbs.FILE_NAMES):
            raise ValueError(f"must record {' and '.join(thumbs.FILE_NAMES)}")
        return v


class _ManifestFields(BaseModel):
    """The fields of ``manifest.json`` that vsekit reads, but for the backends' sections (:data:`_Manifest`);
    keys it does not know are kept as they are."""

    model_config = ConfigDict(extra="allow")

    format: Literal["vsekit-index"]
    version: StrictInt = Field(ge=1)
    generation: StrictStr
    fingerprint: StrictStr = Field(min_length=1)
    checkpoint: StrictStr | None = None
    similarity: StrictStr = Field(min_length=1)
    dim: StrictInt = Field(ge=1)
    kind: Literal["exact", "ivf", "hnsw"]
    backend: StrictStr = "local"
    num_images: StrictInt = Field(ge=0)
    num_captions: StrictInt = Field(ge=0)
    has_captions: StrictBool
    params: _ManifestParams = Field(default_factory=_ManifestParams)
    nlist: dict[StrictStr, StrictInt] | None = None
    recall_at_10: dict[StrictStr, float] | None = None
    sources: list[StrictStr] = Field(default_factory=list)
    files: dict[StrictStr, _FileRecord]
    rerank: StrictInt | None = Field(None, ge=1)  # similarity networks: shortlist size reranked by the network
    thumbnails: _ThumbnailsManifest | None = None

    @field_validator("generation")
    @classmethod
    def _generation_name(cls, v: str) -> str:
        if not GENERATION.match(v):
            raise ValueError(f"must name a generation folder like g000001, got {v[:60]!r}")
        return v

    @field_validator("files")
    @classmethod
    def _file_names(cls, v: dict[str, _FileRecord]) -> dict[str, _FileRecord]:
        for name in v:
            if name not in FILE_NAMES:
                raise ValueError(f"names {name[:60]!r}, which is not a file of an index "
                                 f"({', '.join(FILE_NAMES)})")
        return v

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, v: str) -> str:
        if not kinds_of(v):
            raise ValueError(f"unknown backend {v[:60]!r}; known: {', '.join(sorted({b for b, _ in BACKENDS}))}")
        return v

    @model_validator(mode="after")
    def _backend_section(self) -> _ManifestFields:
        kinds = kinds_of(self.backend)
        backend_class(self.backend, kinds[0]).check_manifest(self)  # the kinds of a backend share its section
        if self.kind not in kinds:
            raise ValueError(f"kind: a {self.backend} index is {' or '.join(kinds)}, not {self.kind}")
        for name in _SECTIONS:
            if name != self.backend and getattr(self, name) is not None:
                raise ValueError(f"{name}: only a {name} index has this section (backend is {self.backend!r})")
        return self


# every backend's section is a field of the manifest (so that an error names ``qdrant.url``, say)
_Manifest = create_model("_Manifest", __base__=_ManifestFields,
                         **{name: (model | None, None) for name, model in _SECTIONS.items()})


def _field_errors(e: ValidationError) -> str:
    """``field: problem; field: problem`` from a pydantic error, in one line."""
    out = []
    for err in e.errors()[:4]:
        field = ".".join(str(p) for p in err.get("loc", ())) or "(manifest)"
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        if err.get("type") == "missing":
            msg = "missing"
        elif "input" in err and err["type"] not in ("value_error",):
            msg += f" (got {short_repr(err['input'], 43)})"
        out.append(f"{field}: {msg}")
    more = len(e.errors()) - len(out)
    return "; ".join(out) + (f"; and {more} more" if more > 0 else "")


def read_manifest(index_dir: str | Path) -> dict[str, Any]:
    """The manifest of ``index_dir``, checked field by field: a missing, mistyped or out-of-range field,
    or a generation name that is not a plain folder name, is a :class:`SearchIndexError` naming it."""
    index_dir = Path(index_dir)
    path = index_dir / MANIFEST
    if not path.is_file():
        what = "no such folder" if not index_dir.exists() else f"no {MANIFEST} in it"
        raise SearchIndexError(f"{index_dir}: not a vsekit index ({what}); build one with `vsekit index build`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SearchIndexError(f"{path}: unreadable manifest ({one_line(e)})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != INDEX_FORMAT:
        raise SearchIndexError(f"{path}: not a vsekit index manifest (no \"format\": \"{INDEX_FORMAT}\")")
    version = manifest.get("version")
    if isinstance(version, int) and not isinstance(version, bool) and version > INDEX_VERSION:
        raise SearchIndexError(f"{path}: index format version {version} is newer than this vsekit "
                               f"reads ({INDEX_VERSION}); upgrade vsekit")
    if "files" not in manifest:
        raise SearchIndexError(f"{path}: an index without checksums, {BEFORE_RELEASE}")
    try:
        _Manifest.model_validate(manifest)
    except ValidationError as e:
        raise SearchIndexError(f"{path}: invalid manifest: {_field_errors(e)}") from None
    return manifest


def vectors_in_folder(manifest: dict[str, Any]) -> bool:
    """Whether the index's generation folder holds its vectors (only the local backend's does)."""
    return manifest.get("backend", "local") == "local"


# -- writing ----------------------------------------------------------------------------------------------
def generation_manifest(manifest: dict[str, Any], gen: str, data: IndexData, files: dict[str, Any],
                        thumb_files: dict[str, Any]) -> dict[str, Any]:
    """``manifest`` pointed at the new generation ``gen`` of ``data``, whose files (and thumbnails' files)
    have the records ``files`` (``thumb_files``). The format version is 1 while the vectors are in the folder
    (readable by every vsekit), 2 when they are in a vector database."""
    manifest = {**manifest, "format": INDEX_FORMAT, "version": 1 if vectors_in_folder(manifest) else 2,
                "generation": gen, "num_images": len(data.images), "num_captions": len(data.captions or []),
                "has_captions": data.has_captions, "files": files}
    manifest.pop("thumbnails", None)
    if data.thumbnails is not None:
        manifest["thumbnails"] = {"generation": gen, "format": thumbs.FORMAT, "max_side": data.thumbnails.max_side,
                                  "count": data.thumbnails.count, "files": thumb_files}
    return manifest


def write_manifest(index_dir: Path, manifest: dict[str, Any]) -> None:
    """Replace the manifest of ``index_dir`` atomically: the commit point of every write."""
    atomic_write_json(index_dir / MANIFEST, manifest)
