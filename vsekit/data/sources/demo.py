"""The embedded demo set: synthetic scenes of coloured shapes, generated on first use and cached."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from vsekit.data.corpus import Corpus
from vsekit.data.karpathy import read_karpathy
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

    def read(self, split: str, max_images: int | None) -> Corpus:
        from vsekit.data.demo import build_demo  # lazy: generating the demo set is its own concern

        json_path = Path(build_demo(self.root, num_images=self.num_images, seed=self.seed,
                                    image_size=self.render_size))
        return read_karpathy(json_path, json_path.parent, split, restval_into_train=self.restval_into_train,
                             max_images=max_images)
