"""Data sets: readers (Karpathy JSON, precomputed features, pairs files, demo), images, torch datasets."""

from vsekit.data.corpus import Corpus, DataError
from vsekit.data.images import ImageLoadError, build_transform, load_rgb
from vsekit.data.load import check_images, load_corpus

__all__ = ["Corpus", "DataError", "ImageLoadError", "build_transform", "check_images", "load_corpus", "load_rgb"]
