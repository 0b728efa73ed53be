"""Data sets: one module per data format (:mod:`.formats`), their registry (:mod:`.sources`), images, torch
datasets."""

from vsekit.data.checks import check_images
from vsekit.data.corpus import Corpus, DataError
from vsekit.data.images import ImageLoadError, build_transform, load_rgb
from vsekit.data.sources import DataConfig, data_config, load_split, sniff_source

__all__ = ["Corpus", "DataConfig", "DataError", "ImageLoadError", "build_transform", "check_images", "data_config",
           "load_rgb", "load_split", "sniff_source"]
