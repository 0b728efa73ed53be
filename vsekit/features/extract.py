"""Precomputed image features in the layout ``data.format=precomp`` reads, written resumably.

One split of a corpus becomes ``{split}_ims.npy`` ((N, D) pooled or (N, R, D) grid features, row i = image
i), ``{split}_ids.txt`` (the image ids, one per row), and, for a data set with captions,
``{split}_caps.txt`` (the same number of captions for every image, grouped by image: what the precomp reader
expects) and ``{split}_labels.npy`` when the images have class labels. ``{split}_ims.json`` records how the
features were made (backbone, weights fingerprint, pooling, image size, ...).

The array is written through a memory map (``np.lib.format.open_memmap``) batch by batch, so no more than
one batch of features is ever in memory. Until the split is finished it is ``{split}_ims.partial.npy``
beside ``{split}_ims.progress.json``, which records the settings and the rows done, rewritten atomically
after each batch once the rows are flushed. A killed run started again with the same settings continues at
the first row not recorded; the batches it computes are the ones an uninterrupted run computes (same rows,
same batch size, the network in eval mode), so the finished file is byte-identical. Different settings are
an error naming the setting, not a file with rows of two kinds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from vsekit.checkpoint import model_fingerprint
from vsekit.data.corpus import Corpus, DataError
from vsekit.data.images import ImageLoadError, applies_exif, build_transform, load_rgb
from vsekit.errors import ConfigError
from vsekit.features.backbones import ExtractionModel, regions
from vsekit.utils.device import resolve_device
from vsekit.utils.io import atomic_write, atomic_write_json, atomic_write_text
from vsekit.utils.progress import progress

log = logging.getLogger("vsekit.features")

FORMAT_VERSION = 1
MAX_GRID = 64  # --grid G: at most 64 x 64 regions per image
MAX_BATCH = 4096


@dataclass
class ExtractOptions:
    """How features are made; every field but ``num_workers``, ``device`` and ``progress`` is a setting a
    resumed run must share."""

    pool: Literal["global", "grid"] = "global"
    grid: int | None = None  # grid pooling: adaptive-average-pool the map to grid x grid cells
    batch_size: int = 64
    dtype: Literal["float32", "float16"] = "float32"
    image_size: int | None = None  # default: the backbone's (a vsekit checkpoint's), else 224
    resize: int | None = None
    resize_policy: str | None = None
    num_workers: int = 0
    device: str = "auto"
    progress: bool = True

    def check(self) -> None:
        if self.pool not in ("global", "grid"):
            raise ConfigError(f"--pool must be global or grid, got {self.pool!r}")
        if self.grid is not None and (self.pool != "grid" or not 1 <= self.grid <= MAX_GRID):
            raise ConfigError(f"--grid needs --pool grid and a size in [1, {MAX_GRID}], got {self.grid}")
        if not 1 <= self.batch_size <= MAX_BATCH:
            raise ConfigError(f"--batch-size must be in [1, {MAX_BATCH}], got {self.batch_size}")
        if self.dtype not in ("float32", "float16"):
            raise ConfigError(f"--dtype must be float32 or float16, got {self.dtype!r}")


@dataclass
class SplitResult:
    split: str
    path: Path
    shape: tuple[int, ...]
    rows_computed: int  # 0 when the split was already complete
    captions: int


def eval_transform(model: ExtractionModel, opts: ExtractOptions) -> tuple[transforms.Compose, int]:
    """The evaluation transform (resize + centre crop), normalised with the backbone's own statistics."""
    size = opts.image_size or model.image_size or 224
    resize = opts.resize if opts.resize is not None else (model.resize if opts.image_size is None else None)
    policy = opts.resize_policy or model.resize_policy
    t = build_transform(False, size, resize, resize_policy=policy)
    t.transforms[-1] = transforms.Normalize(mean=model.mean, std=model.std)
    return t, size


class _Rows(Dataset):
    """Item k = (image tensor or None, row, error message or None) for rows[k]: an unreadable image is
    reported by the main process, with its file name, rather than as a worker's traceback."""

    def __init__(self, paths: Sequence[Path], rows: range, transform, exif_transpose: bool = True) -> None:
        self.paths, self.rows, self.transform, self.exif_transpose = paths, rows, transform, exif_transpose

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int):
        row = self.rows[k]
        try:
            return self.transform(load_rgb(self.paths[row], exif_transpose=self.exif_transpose)), row, None
        except ImageLoadError as e:
            return None, row, str(e)


def _collate(batch):
    errors = [(row, msg) for _, row, msg in batch if msg is not None]
    rows = [row for _, row, _ in batch]
    images = None if errors else torch.stack([x for x, _, _ in batch])
    return images, rows, errors


def grouped_captions(corpus: Corpus, captions_per_image: int | None) -> list[str]:
    """The captions image by image (row order, each image's in corpus order), ``k`` per image: the layout
    of ``{split}_caps.txt``, where caption j belongs to image j // k. A data set with varying counts needs
    ``captions_per_image`` (each image's first k are kept)."""
    counts = corpus.captions_per_image()
    order = np.argsort(corpus.caption_to_image, kind="stable")
    k = captions_per_image
    if k is None:
        if counts.min() != counts.max():
            raise DataError(f"{corpus.name}: images have {counts.min()} to {counts.max()} captions; the precomp "
                            "layout needs the same number for every image: pass --captions-per-image K (each "
                            "image's first K captions are kept)")
        k = int(counts[0])
    elif counts.min() < k:
        i = int(np.argmin(counts))
        raise DataError(f"{corpus.name}: image {corpus.image_ids[i]!r} has {counts[i]} captions, fewer than "
                        f"--captions-per-image {k}")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    # a caption is one line: no newline may split it
    return [" ".join(str(corpus.captions[int(j)]).split()) for s in starts for j in order[s: s + k]]


def _check_ids(ids: Sequence[str], where: str) -> None:
    for i, x in enumerate(ids):
        if not x.strip() or "\n" in x or "\r" in x or x != x.strip():
            raise DataError(f"{where}: image id {x!r} (row {i}) cannot be written as one line of an ids file")


def extract_split(corpus: Corpus, model: ExtractionModel, out_dir: str | Path, split: str, opts: ExtractOptions,
                  *, captions: bool = True, captions_per_image: int | None = None,
                  restart: bool = False) -> SplitResult:
    """Write the features of every image of ``corpus`` (and, with ``captions``, its captions) as split
    ``split`` of the precomp folder ``out_dir``, continuing an interrupted run (see the module docstring).
    ``restart``: discard what an earlier run left and start over."""
    opts.check()
    out = Path(out_dir)
    if not split or any(c in split for c in "/\\\0") or split.startswith("."):
        raise ConfigError(f"bad split name {split!r}")
    if corpus.image_paths is None:
        raise DataError(f"{corpus.name}: holds precomputed features already, not image files")
    if corpus.num_images == 0:
        raise DataError(f"{corpus.name}: no images")
    _check_ids(corpus.image_ids, corpus.name)
    lines = grouped_captions(corpus, captions_per_image) if captions and corpus.num_captions else None

    transform, size = eval_transform(model, opts)
    device = resolve_device(opts.device)
    net = model.backbone.to(device).eval()
    dtype = np.dtype(opts.dtype)
    with torch.no_grad():
        probe = _forward(net, torch.zeros(1, 3, size, size, device=device), opts)
    shape = (corpus.num_images, *probe.shape[1:])
    settings = {"format_version": FORMAT_VERSION, "backbone": model.name,
                "weights": model_fingerprint(net.state_dict()), "pool": opts.pool, "grid": opts.grid,
                "image_size": size, "transform": repr(transform), "dtype": dtype.name,
                "batch_size": opts.batch_size, "shape": list(shape),
                "image_ids": hashlib.sha256("\n".join(corpus.image_ids).encode()).hexdigest()[:16]}

    final, partial = out / f"{split}_ims.npy", out / f"{split}_ims.partial.npy"
    progress_path, meta_path = out / f"{split}_ims.progress.json", out / f"{split}_ims.json"
    out.mkdir(parents=True, exist_ok=True)
    if restart:
        for p in (final, partial, progress_path, meta_path):
            p.unlink(missing_ok=True)
    state = _read_json(progress_path)
    if final.is_file() and state is None:
        done = _read_json(meta_path)
        if done is not None and done.get("settings") == settings:
            log.info("%s: already extracted (%s); nothing to do", final, " x ".join(map(str, shape)))
            _write_side_files(out, split, corpus, lines)
            return SplitResult(split, final, shape, 0, len(lines or []))
        raise DataError(f"{final}: exists, made with other settings than these ({_differs(done, settings)}); "
                        "--restart overwrites it")
    _write_side_files(out, split, corpus, lines)
    if state is not None and final.is_file() and state.get("rows_done") == shape[0]:
        start = shape[0]  # killed after the rename: only the bookkeeping is left
    elif state is not None:
        if state.get("settings") != settings:
            raise DataError(f"{progress_path}: an unfinished extraction with other settings "
                            f"({_differs(state, settings)}); run it with its own settings, or --restart")
        start = int(state.get("rows_done", -1))
        if not 0 <= start <= shape[0] or not partial.is_file():
            raise DataError(f"{progress_path}: does not match {partial.name}; --restart to start over")
        log.info("%s: continuing at row %d of %d", partial, start, shape[0])
    else:
        start = 0
        np.lib.format.open_memmap(partial, mode="w+", dtype=dtype, shape=shape).flush()
        atomic_write_json(progress_path, {"settings": settings, "rows_done": 0})

    if start < shape[0]:
        _fill(corpus, partial, progress_path, settings, start, shape, dtype, net, transform, device, opts, split)
    if partial.is_file():
        os.replace(partial, final)
    atomic_write_json(meta_path, {"settings": settings, "images": shape[0], "captions": len(lines or [])})
    progress_path.unlink(missing_ok=True)
    return SplitResult(split, final, shape, shape[0] - start, len(lines or []))


def _fill(corpus: Corpus, partial: Path, progress_path: Path, settings: dict[str, Any], start: int,
          shape: tuple[int, ...], dtype: np.dtype, net, transform, device, opts: ExtractOptions, split: str) -> None:
    try:
        mm = np.load(partial, mmap_mode="r+", allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - a damaged partial file
        raise DataError(f"{partial}: cannot be continued ({e}); --restart to start over") from None
    if mm.shape != shape or mm.dtype != dtype:
        raise DataError(f"{partial}: shape {mm.shape} {mm.dtype}, expected {shape} {dtype}; --restart")
    rows = range(start, shape[0])
    loader = DataLoader(_Rows(corpus.image_paths, rows, transform, applies_exif(corpus.meta)), batch_size=opts.batch_size,
                        num_workers=opts.num_workers, collate_fn=_collate)
    bar = progress(shape[0], desc=f"features {split}", unit="image", initial=start, enabled=opts.progress,
                   logger=log)
    with bar, torch.no_grad():
        for images, batch_rows, errors in loader:
            if errors:
                row, msg = errors[0]
                more = f" (and {len(errors) - 1} more in this batch)" if len(errors) > 1 else ""
                raise DataError(f"{msg}{more}: image {corpus.image_ids[row]!r}, row {row} of split {split}. Fix or "
                                "replace the file and run the same command again: the rows done so far are kept")
            feats = _forward(net, images.to(device), opts).float().cpu().numpy()
            if not np.isfinite(feats).all():
                row = batch_rows[int(np.argmin(np.isfinite(feats.reshape(len(feats), -1)).all(1)))]
                raise DataError(f"{corpus.image_paths[row]}: the backbone gives non-finite features for this image")
            a, b = batch_rows[0], batch_rows[-1] + 1
            mm[a:b] = feats.astype(dtype, copy=False)
            mm.flush()  # the rows are on disk before the progress file says so
            atomic_write_json(progress_path, {"settings": settings, "rows_done": b})
            bar.update(b - a)
    del mm


def _forward(net, images: torch.Tensor, opts: ExtractOptions) -> torch.Tensor:
    if opts.pool == "global":
        return net.pooled(images)
    return regions(net.feature_map(images), opts.grid)


def _write_side_files(out: Path, split: str, corpus: Corpus, lines: list[str] | None) -> None:
    atomic_write_text(out / f"{split}_ids.txt", "".join(f"{i}\n" for i in corpus.image_ids))
    if lines is not None:
        atomic_write_text(out / f"{split}_caps.txt", "".join(f"{c}\n" for c in lines))
    if corpus.labels is not None:
        atomic_write(out / f"{split}_labels.npy", lambda f: np.save(f, np.asarray(corpus.labels, np.int64)))


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        if path.stat().st_size > 1 << 20:
            raise ValueError("larger than 1 MiB")
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable ({e}); --restart to start over") from None
    if not isinstance(value, dict):
        raise DataError(f"{path}: not a JSON object; --restart to start over")
    return value


def _differs(recorded: dict[str, Any] | None, settings: dict[str, Any]) -> str:
    old = (recorded or {}).get("settings") or {}
    keys = [k for k in settings if old.get(k) != settings[k]]
    return ", ".join(f"{k}: {old.get(k)!r} then, {settings[k]!r} now" for k in keys[:3]) or "unknown settings"
