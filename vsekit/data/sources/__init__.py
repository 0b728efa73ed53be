"""Data sources: each ``data.format`` is a typed options class with its reader (see :mod:`.base`)."""

from vsekit.data.sources import demo, folder, karpathy, pairs, precomp, shards, xmodal  # noqa: F401  (registers them)
from vsekit.data.sources.base import (
    DataConfig,
    common_keys,
    data_config,
    load_corpus,
    load_split,
    register_source,
    sniff_source,
    source_class,
    source_names,
)
from vsekit.data.sources.demo import DemoData
from vsekit.data.sources.folder import FolderData, list_images, read_folder
from vsekit.data.sources.karpathy import KarpathyData
from vsekit.data.sources.pairs import PairsData
from vsekit.data.sources.precomp import PrecompData
from vsekit.data.sources.shards import ShardsData
from vsekit.data.sources.xmodal import CrossModalFeatureData

__all__ = ["CrossModalFeatureData", "DataConfig", "DemoData", "FolderData", "KarpathyData", "PairsData", "PrecompData", "ShardsData", "common_keys",
           "data_config", "list_images", "load_corpus", "load_split", "read_folder", "register_source", "sniff_source",
           "source_class", "source_names"]
