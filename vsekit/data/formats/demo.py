"""The embedded demo set: synthetic scenes of coloured shapes, generated on first use and cached."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Literal

from pydantic import Field

from vsekit.data.corpus import Corpus
from vsekit.data.formats.karpathy import read_karpathy
from vsekit.data.sources.base import DataConfig, register_source


@register_source("demo")
class DemoData(DataConfig):
    """the demo set."""

    format: Literal["demo"] = "demo"
    root: str | None = None  # default: $VSEKIT_CACHE/demo-v.../
    num_images: int = Field(3000, ge=10)
    seed: int = Field(0, ge=0)
    render_size: int = Field(64, ge=16, description="pixels of the generated images (not the training crop)")
    restval_into_train: bool = False
    # "grid": precomputed region features instead of image files, for the region networks (VSRN, SGRAF,
    # VSE-infinity) -- a grid x grid set of patches per image, each patch average-pooled to patch x patch RGB
    regions: Literal["none", "grid"] = "none"
    grid: int = Field(4, ge=1, le=16)
    patch: int = Field(4, ge=1, le=16)

    def read(self, split: str, max_images: int | None) -> Corpus:
        from vsekit.data.demo import build_demo  # lazy: generating the demo set is its own concern

        json_path = Path(build_demo(self.root, num_images=self.num_images, seed=self.seed,
                                    image_size=self.render_size))
        corpus = read_karpathy(json_path, json_path.parent, split, restval_into_train=self.restval_into_train,
                               max_images=max_images)
        if self.regions == "grid":
            corpus = grid_regions(corpus, self.grid, self.patch)
        return corpus


def grid_regions(corpus: Corpus, grid: int, patch: int) -> Corpus:
    """The corpus with region features in place of its image files: each image cut into ``grid`` x ``grid``
    patches, each patch average-pooled to ``patch`` x ``patch`` pixels, RGB in [0, 1], flattened: an
    (N, grid * grid, patch * patch * 3) float32 array (cached beside the images, one file per split)."""
    import numpy as np
    import torch
    from torch.nn import functional as F

    from vsekit.data.images import load_rgb
    from vsekit.utils.io import atomic_write

    paths = corpus.image_paths or []
    cache = (paths[0].parent if paths else Path(".")) / f"regions_{corpus.name}_g{grid}p{patch}_{len(paths)}.npy"
    if cache.is_file():
        feats = np.load(cache, mmap_mode="r")
    else:
        side = grid * patch
        rows = []
        for p in paths:
            x = torch.from_numpy(np.asarray(load_rgb(p), dtype=np.float32) / 255.0).permute(2, 0, 1)
            x = F.adaptive_avg_pool2d(x.unsqueeze(0), side)[0]  # (3, side, side)
            x = x.reshape(3, grid, patch, grid, patch).permute(1, 3, 2, 4, 0)  # (gy, gx, py, px, 3)
            rows.append(x.reshape(grid * grid, patch * patch * 3).numpy())
        feats = np.stack(rows) if rows else np.zeros((0, grid * grid, patch * patch * 3), np.float32)
        atomic_write(cache, lambda f: np.save(f, feats))
    return replace(corpus, image_paths=None, features=feats)
