"""The ``shards`` data format: webdataset tar shards of a data set, written by ``vsekit shards``, read back as a
:class:`Corpus`.

**Layout.** One sample per image, in corpus row order, key ``%09d`` (the row): the image file's own bytes as
``<key>.<ext>`` (``jpg``, ``png``, ...; never re-encoded) or its precomputed features as ``<key>.npy``, and
``<key>.json`` = ``{"image_id", "captions": [...], "caption_ids": [...], "label"}`` (``label``: a class id,
a 0/1 multi-hot list, or null). Shards are ``{split}-000000.tar``, ``{split}-000001.tar``, ... Shards
written by other tools read too when each sample has one image (or ``.npy``) and its captions in a
``.json`` as above or in a ``.txt`` (one caption), as img2dataset writes them.

**Reading: random access through an index, not a stream.** The first read of a set of shards scans their
tar headers (and reads the small ``.json`` members) once and stores an index: for every sample the shard,
the byte offset and size of its image or ``.npy`` data, and its captions, ids and label. The corpus then
holds :class:`~vsekit.data.archive.MemberPath` images (or lazy :class:`~vsekit.data.archive.ShardFeatures`
rows), so every command reads shards through the same Corpus / Dataset / sampler code as image files:
the seeded per-epoch permutation, mid-epoch resume and the loss of a run are exactly those of the source
the shards were written from. A streaming ``IterableDataset`` would read shards sequentially (faster on
object stores and network disks, which vsekit does not read) but shuffle only within a buffer, so the
order, the resume point and hence the loss could not match. The index is ``{split}.index.json`` beside
the shards (written by ``vsekit shards``), else in ``$VSEKIT_CACHE/shards``, and is rebuilt when a shard's
size or modification time changes; each read also checks the member's tar header.

**Member names and types are checked** when a shard is scanned and again when a stored index is read (it
may be stale or crafted): a name that is absolute, climbs out with ``..``, holds a backslash or a control
character, and a member that is a symbolic or hard link, a device, a FIFO or a sparse file, is refused with
an error naming the shard and the member. A member is only ever read from inside its shard, but its name
ends up in the paths an index records, and a sparse member's data is not where its offset says.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import itertools
import json
import logging
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from vsekit.data.archive import (
    MAX_MEMBER_BYTES,
    MemberPath,
    ShardFeatures,
    check_member_name,
    npy_header,
    read_member,
)
from vsekit.data.corpus import Corpus, DataError
from vsekit.data.images import IMAGE_EXTENSIONS
from vsekit.data.sources.base import DataConfig, register_source

log = logging.getLogger("vsekit.data")

INDEX_FORMAT = "vsekit-shards-index"
INDEX_VERSION = 1
# a member is an image when its extension is one of the formats the decoder accepts (AVIF included)
IMAGE_EXTS = frozenset(e.lstrip(".") for e in IMAGE_EXTENSIONS)
CAPTION_EXTS = ("txt", "caption", "cap")
MAX_JSON_BYTES = 1 << 20  # one sample's metadata
MAX_INDEX_BYTES = 4 << 30
MAX_SHARDS = 100_000
_SPLIT_ALIASES = {"val": ("val", "dev"), "dev": ("dev", "val")}
_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]+)$")  # webdataset: the key is the name up to the first dot
_COLUMNS = ("shard", "member", "offset", "size", "header", "image_id", "captions", "caption_ids", "label")
_LINK_KINDS = {tarfile.SYMTYPE: "a symbolic link", tarfile.LNKTYPE: "a hard link", tarfile.CHRTYPE: "a character "
               "device", tarfile.BLKTYPE: "a block device", tarfile.FIFOTYPE: "a FIFO"}


# -- finding the shards -----------------------------------------------------------------------------------
def expand_braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` -> ``a-000.tar a-001.tar a-002.tar``; ``{x,y}`` alternatives (webdataset's
    notation). Ranges keep the width of their first bound; at most :data:`MAX_SHARDS` names, a range counted
    before its names are made (``braceexpand``, webdataset's, builds a whole range first: ``{0..10**12}`` fills
    memory)."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    body, head, tail = m.group(1), pattern[: m.start()], pattern[m.end():]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        a, b = int(r.group(1)), int(r.group(2))
        if b < a or b - a >= MAX_SHARDS:
            raise DataError(f"{pattern}: bad shard range {{{body}}}")
        options = [str(i).zfill(len(r.group(1))) for i in range(a, b + 1)]
    else:
        options = body.split(",")
    out: list[str] = []
    for o in options:
        out.extend(expand_braces(head + o + tail))
        if len(out) > MAX_SHARDS:
            raise DataError(f"{pattern}: names more than {MAX_SHARDS} shards")
    return out


def find_shards(path: str | Path, split: str) -> tuple[list[Path], Path | None]:
    """The shard files of ``split`` and the folder whose ``{split}.index.json`` may index them.

    ``path``: a folder (its ``{split}-*.tar``; ``dev`` and ``val`` stand in for each other), one ``.tar``, or
    a pattern with ``{split}``, brace ranges (``{000000..000009}``) or ``*`` (without ``{split}`` every split
    reads the same shards)."""
    text = str(path)
    folder = Path(text).expanduser()
    if folder.is_dir():
        for name in _SPLIT_ALIASES.get(split, (split,)):
            found = sorted(p for p in folder.glob(f"{glob.escape(name)}-*.tar")
                           if re.fullmatch(rf"{re.escape(name)}-\d+\.tar", p.name) and p.is_file())
            if found:
                return found, folder
        raise DataError(f"{folder}: no shards of split {split!r} ({split}-000000.tar, ...)")
    files: list[Path] = []
    for name in expand_braces(text.replace("{split}", split)):
        name = os.path.expanduser(name)
        matches = sorted(glob.glob(name)) if glob.has_magic(name) else [name]
        files.extend(Path(m) for m in matches)
    if not files:
        raise DataError(f"{text}: matches no shard files")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise DataError(f"{missing[0]}: shard not found (of {len(files)} named by {text})")
    return files, None


# -- the index --------------------------------------------------------------------------------------------
def _stamp(files: Sequence[Path]) -> list[list[Any]]:
    return [[f.name, (st := f.stat()).st_size, st.st_mtime_ns] for f in files]


def _read_index(path: Path, files: Sequence[Path]) -> dict[str, Any] | None:
    try:
        if not path.is_file() or path.stat().st_size > MAX_INDEX_BYTES:
            return None
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (not isinstance(index, dict) or index.get("format") != INDEX_FORMAT or index.get("version") != INDEX_VERSION
            or index.get("shards") != _stamp(files)):
        return None
    return index


def _cache_path(files: Sequence[Path]) -> Path:
    from vsekit.utils.io import cache_root

    h = hashlib.sha256("\n".join(str(f.resolve()) for f in files).encode()).hexdigest()[:24]
    return cache_root() / "shards" / f"{h}.index.json"


def load_index(files: Sequence[Path], beside: Path | None = None, name: str = "") -> dict[str, Any]:
    """The index of ``files``: a valid stored one, else built (:func:`build_index`) and stored beside the
    shards when that folder is writable, else in vsekit's cache."""
    from vsekit.utils.io import atomic_write_text

    places = ([beside / f"{name}.index.json"] if beside is not None and name else []) + [_cache_path(files)]
    for p in places:
        index = _read_index(p, files)
        if index is not None:
            return index
    index = build_index(files)
    text = json.dumps(index, separators=(",", ":"))
    for p in places:
        with contextlib.suppress(OSError):
            atomic_write_text(p, text)
            break
    return index


def _check_member(shard: Path, m: tarfile.TarInfo) -> tarfile.TarInfo:
    """``m``, unless its name leaves the shard or it is not a plain file or folder (links, devices, FIFOs,
    sparse files, whose data is not one contiguous run at its offset)."""
    check_member_name(shard, m.name)
    kind = _LINK_KINDS.get(m.type) or ("a sparse file" if m.issparse() else None)
    if kind is None and not (m.isfile() or m.isdir()):
        kind = f"of tar type {m.type!r}"
    if kind:
        raise DataError(f"{shard}: member {m.name[:200]!r} is {kind}; shards hold plain files only")
    return m


def _samples(tf: tarfile.TarFile, path: Path) -> Iterator[tuple[str, dict[str, tarfile.TarInfo]]]:
    """(key, {extension: member}) per sample of a shard: its consecutive files of one key, as webdataset
    groups them."""
    named = ((k, m) for m in tf if _check_member(path, m).isfile() and (k := _KEY.match(m.name)))
    for key, group in itertools.groupby(named, key=lambda km: km[0].group(1)):
        sample: dict[str, tarfile.TarInfo] = {}
        for k, m in group:
            ext = k.group(2).lower()
            if ext in sample:
                raise DataError(f"{path}: {m.name}: a second {ext!r} member in sample {key!r}")
            sample[ext] = m
        yield key, sample


def build_index(files: Sequence[Path]) -> dict[str, Any]:
    """Scan the shards once: per sample its shard, the offset and size of its image or ``.npy`` data (for
    ``.npy`` also the length of the array header), and its id, captions, caption ids and label."""
    b = _IndexBuilder()
    for s, path in enumerate(files):
        try:
            tf = tarfile.open(path, mode="r:")
        except (tarfile.TarError, OSError) as e:
            raise DataError(f"{path}: not an uncompressed tar file ({e}); shards are read by byte offset, "
                            "so they cannot be compressed") from None
        with tf:
            try:
                for key, sample in _samples(tf, path):
                    b.add(tf, path, s, key, sample)
            except tarfile.TarError as e:
                raise DataError(f"{path}: damaged tar file ({e})") from None
    if b.kind is None:
        raise DataError(f"{files[0]}: the shards hold no samples (an image or .npy member per sample)")
    return {"format": INDEX_FORMAT, "version": INDEX_VERSION, "shards": _stamp(files), **b.columns()}


class _IndexBuilder:
    def __init__(self) -> None:
        self.kind: str | None = None  # "images" or "features"
        self.feature: dict[str, Any] | None = None  # row shape and dtype of features
        self.cols: dict[str, list] = {k: [] for k in _COLUMNS}

    def columns(self) -> dict[str, Any]:
        return {"kind": self.kind, "feature": self.feature, **self.cols}

    def add(self, tf: tarfile.TarFile, path: Path, shard: int, key: str, sample: dict[str, tarfile.TarInfo]) -> None:
        where = f"{path}: sample {key!r}"
        images = [e for e in sample if e in IMAGE_EXTS]
        kind = "features" if "npy" in sample else "images" if images else None
        if kind is None or len(images) + ("npy" in sample) != 1:
            raise DataError(f"{where} needs exactly one image or .npy member, has {sorted(sample)}")
        if self.kind not in (None, kind):
            raise DataError(f"{where} holds {kind}, earlier samples hold {self.kind}: one kind per set of shards")
        self.kind = kind
        data = sample["npy"] if kind == "features" else sample[images[0]]
        if data.size > MAX_MEMBER_BYTES:
            raise DataError(f"{where}: {data.name} has {data.size} bytes (at most {MAX_MEMBER_BYTES})")
        header = 0
        if kind == "features":
            header = self._check_npy(path, data, f"{path}: {data.name}")
        meta = self._meta(tf, sample, where)
        meta["image_id"] = key if meta["image_id"] is None else meta["image_id"]
        row = {"shard": shard, "member": data.name, "offset": data.offset_data, "size": data.size, "header": header}
        for k, v in {**row, **meta}.items():
            self.cols[k].append(v)

    def _check_npy(self, path: Path, m: tarfile.TarInfo, where: str) -> int:
        raw = read_member(path, m.offset_data, m.size, m.name)
        header, shape, dtype = npy_header(raw[: min(len(raw), 1 << 16)], where)
        spec = {"shape": list(shape), "dtype": dtype.str}
        if self.feature is None:
            if len(shape) not in (1, 2) or 0 in shape:
                raise DataError(f"{where}: a feature row must be (D,) or (R, D), got {shape}")
            self.feature = spec
        elif spec != self.feature:
            raise DataError(f"{where}: shape {shape} {dtype}, earlier rows are {tuple(self.feature['shape'])} "
                            f"{np.dtype(self.feature['dtype'])}")
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if m.size != header + nbytes:
            raise DataError(f"{where}: {m.size} bytes for a {shape} {dtype} array")
        row = np.frombuffer(raw, dtype=dtype, offset=header)
        if np.issubdtype(dtype, np.floating) and not np.isfinite(row).all():
            raise DataError(f"{where}: holds NaN or inf")
        return header

    @staticmethod
    def _meta(tf: tarfile.TarFile, sample: dict[str, tarfile.TarInfo], where: str) -> dict[str, Any]:
        def text(m: tarfile.TarInfo) -> str:
            if m.size > MAX_JSON_BYTES:
                raise DataError(f"{where}: {m.name} has {m.size} bytes (at most {MAX_JSON_BYTES})")
            try:
                return tf.extractfile(m).read().decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{where}: {m.name} is not UTF-8") from None

        meta: dict[str, Any] = {}
        if "json" in sample:
            try:
                meta = json.loads(text(sample["json"]))
            except ValueError as e:
                raise DataError(f"{where}: {sample['json'].name} is not JSON ({e})") from None
            if not isinstance(meta, dict):
                raise DataError(f"{where}: {sample['json'].name} is not a JSON object")
        caps = meta.get("captions")
        if caps is None:
            found = next((e for e in CAPTION_EXTS if e in sample), None)
            caps = [text(sample[found]).strip()] if found else []
        if not isinstance(caps, list) or not all(isinstance(c, str) and c.strip() for c in caps):
            raise DataError(f"{where}: captions must be a list of non-empty strings")
        ids = meta.get("caption_ids")
        if ids is not None and (not isinstance(ids, list) or len(ids) != len(caps)
                                or not all(isinstance(i, (str, int)) for i in ids)):
            raise DataError(f"{where}: caption_ids must be a list of {len(caps)} ids, one per caption")
        label = meta.get("label")
        if not (label is None or type(label) is int
                or isinstance(label, list) and all(v in (0, 1) and type(v) is int for v in label)):
            raise DataError(f"{where}: label must be a class id, a 0/1 multi-hot list, or null; got {label!r}")
        image_id = meta.get("image_id")
        return {"image_id": None if image_id is None else str(image_id), "captions": list(caps),
                "caption_ids": None if ids is None else [str(i) for i in ids], "label": label}


# -- reading ----------------------------------------------------------------------------------------------
def read_shards(path: str | Path, split: str, *, max_images: int | None = None) -> Corpus:
    """One split of a set of shards as a :class:`Corpus` (image members as :class:`MemberPath`, or lazy
    :class:`ShardFeatures` rows), its first ``max_images`` images when given."""
    files, beside = find_shards(path, split)
    index = load_index(files, beside, files[0].name.rsplit("-", 1)[0] if beside is not None else "")
    n = len(index["shard"]) if max_images is None else min(max_images, len(index["shard"]))
    cols = {k: index[k][:n] for k in _COLUMNS}
    names = [str(f) for f in files]
    images = index["kind"] == "images"
    paths = []
    for s, m, o, z in zip(cols["shard"], cols["member"], cols["offset"], cols["size"]):  # may be stale or crafted
        if type(s) is not int or not 0 <= s < len(names):
            raise DataError(f"{files[0]}: the stored index of these shards names shard {s!r} of {len(names)}; "
                            "delete it to have it rebuilt")
        if images:
            paths.append(MemberPath(names[s], m, o, z))  # checks the member name
        else:
            check_member_name(names[s], m)
    captions, owner, caption_ids = [], [], []
    for i, (caps, ids) in enumerate(zip(cols["captions"], cols["caption_ids"])):
        captions.extend(caps)
        owner.extend([i] * len(caps))
        caption_ids.extend(ids if ids is not None else
                           [f"{Path(names[cols['shard'][i]]).name}:{cols['member'][i]}:{k}" for k in range(len(caps))])
    kw: dict[str, Any] = {}
    if images:
        kw["image_paths"] = paths
    else:
        f = index["feature"]
        kw["features"] = ShardFeatures(names, np.asarray(cols["shard"], np.int32), np.asarray(cols["offset"], np.int64),
                                       np.asarray(cols["header"], np.int64), tuple(f["shape"]), np.dtype(f["dtype"]),
                                       cols["member"])
    return Corpus(name=f"{Path(str(path)).name or 'shards'}_{split}", captions=captions,
                  caption_to_image=np.asarray(owner, dtype=np.int64), image_ids=cols["image_id"],
                  labels=_labels(cols["label"], files[0]), caption_ids=caption_ids,
                  meta={"format": "shards", "source": str(path), "split": split, "shards": len(files),
                        "max_images": max_images}, **kw)


def _labels(values: list[Any], where: Path) -> np.ndarray | None:
    if all(v is None for v in values):
        return None
    if all(isinstance(v, list) for v in values):
        widths = {len(v) for v in values}
        if len(widths) != 1:
            raise DataError(f"{where}: multi-hot labels of different widths {sorted(widths)}")
        return np.asarray(values, dtype=np.int64)
    if any(isinstance(v, list) for v in values):
        raise DataError(f"{where}: some labels are class ids, others multi-hot lists")
    return np.asarray([-1 if v is None else v for v in values], dtype=np.int64)


# -- writing ----------------------------------------------------------------------------------------------
@dataclass
class ShardsResult:
    split: str
    files: list[Path]
    index: Path
    samples: int
    captions: int


def _image_bytes(path: Any) -> tuple[bytes, str]:
    """A corpus image's file bytes and their extension (from the name, else from the format PIL reads)."""
    from vsekit.data.images import ImageLoadError

    if isinstance(path, MemberPath):
        data, ext = path.read_bytes(), path.suffix.lstrip(".").lower()
    else:
        p = Path(path)
        try:
            if p.stat().st_size > MAX_MEMBER_BYTES:
                raise ImageLoadError(f"{p}: larger than {MAX_MEMBER_BYTES} bytes")
            data = p.read_bytes()
        except OSError as e:
            raise ImageLoadError(f"{p}: cannot read ({e.strerror or e})") from None
        ext = p.suffix.lstrip(".").lower()
    if ext not in IMAGE_EXTS:
        from vsekit.data.images import open_image

        try:
            with open_image(data) as im:
                fmt = (im.format or "").lower()
        except Exception:  # noqa: BLE001 - PIL raises many kinds for non-images
            fmt = ""
        ext = {"jpeg": "jpg", "tiff": "tif"}.get(fmt, fmt)
        if ext not in IMAGE_EXTS:
            raise ImageLoadError(f"{path}: not an image format a shard can hold ({', '.join(sorted(IMAGE_EXTS))})")
    return data, ext


def _sample_meta(corpus: Corpus, row: int, caps: np.ndarray) -> dict[str, Any]:
    meta: dict[str, Any] = {"image_id": corpus.image_ids[row], "captions": [corpus.captions[j] for j in caps]}
    if corpus.caption_ids is not None:
        meta["caption_ids"] = [corpus.caption_ids[j] for j in caps]
    labels = corpus.labels
    meta["label"] = None if labels is None else labels[row].tolist() if corpus.multi_label else int(labels[row])
    return meta


def write_shards(corpus: Corpus, out_dir: str | Path, split: str, *, max_per_shard: int = 10_000,
                 max_shard_bytes: int = 1 << 30, overwrite: bool = False, progress: bool = True) -> ShardsResult:
    """Write ``corpus`` as ``{split}-%06d.tar`` shards in ``out_dir`` with ``wds.ShardWriter`` (a new shard
    after ``max_per_shard`` samples or ``max_shard_bytes``), then their index ``{split}.index.json``.
    A shard is written as ``*.tar.part`` and renamed when complete; tar headers carry no time, so the same
    corpus gives the same bytes."""
    from vsekit.utils.optional import import_optional
    from vsekit.utils.progress import progress as progress_bar

    wds = import_optional("webdataset", "shards", "vsekit shards")
    out = Path(out_dir)
    if not split or not re.fullmatch(r"[A-Za-z0-9_.]+", split) or split.startswith("."):
        raise DataError(f"bad split name {split!r} (letters, digits, _ and . only)")
    if corpus.caption_features is not None:
        raise DataError(f"{corpus.name}: ships its text as feature vectors; shards hold captions as text")
    if corpus.num_images == 0:
        raise DataError(f"{corpus.name}: no images to write")
    if max_per_shard < 1 or max_shard_bytes < 1:
        raise DataError("max_per_shard and max_shard_bytes must be >= 1")
    out.mkdir(parents=True, exist_ok=True)
    old = sorted(out.glob(f"{split}-*.tar")) + sorted(out.glob(f"{split}-*.tar.part"))
    if old and not overwrite:
        raise DataError(f"{out}: holds shards of split {split!r} already ({old[0].name}, ...); --overwrite "
                        "replaces them")
    for f in [*old, out / f"{split}.index.json"]:
        f.unlink(missing_ok=True)

    order = np.argsort(corpus.caption_to_image, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(corpus.captions_per_image())])
    if (np.diff(corpus.caption_to_image) < 0).any():
        log.info("%s: captions are stored image by image, so their order changes", corpus.name)
    open_files: dict[str, Any] = {}

    def opener(fname: str):
        open_files[fname] = f = open(fname + ".part", "wb")  # noqa: SIM115 - closed in done()
        return f

    def done(fname: str) -> None:
        f = open_files.pop(fname)
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(fname + ".part", fname)

    pattern = str(out / f"{split}-%06d.tar")
    bar = progress_bar(corpus.num_images, desc=f"shards {split}", unit="image", enabled=progress, logger=log)
    with bar, wds.ShardWriter(pattern, maxcount=max_per_shard, maxsize=max_shard_bytes, verbose=0,
                              opener=opener, post=done, encoder=False, mtime=0.0) as writer:
        for row in range(corpus.num_images):
            sample: dict[str, Any] = {"__key__": f"{row:09d}"}
            if corpus.features is not None:
                buf = io.BytesIO()
                np.save(buf, np.ascontiguousarray(np.asarray(corpus.features[row])), allow_pickle=False)
                sample["npy"] = buf.getvalue()
            else:
                data, ext = _image_bytes(corpus.image_paths[row])
                sample[ext] = data
            meta = _sample_meta(corpus, row, order[bounds[row]: bounds[row + 1]])
            sample["json"] = json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")
            writer.write(sample)
            bar.update(1)
    files, _ = find_shards(out, split)
    index = load_index(files, out, split)
    return ShardsResult(split, files, out / f"{split}.index.json", len(index["shard"]), corpus.num_captions)


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
