"""Data sources: each ``data.format`` is a typed options class with its reader, one module per format in
:mod:`vsekit.data.formats` (the registry is :mod:`.base`)."""

from vsekit.data.formats.demo import DemoData
from vsekit.data.formats.folder import FolderData, list_images, read_folder
from vsekit.data.formats.karpathy import KarpathyData
from vsekit.data.formats.pairs import PairsData
from vsekit.data.formats.precomp import PrecompData
from vsekit.data.formats.shards import ShardsData
from vsekit.data.formats.xmodal import CrossModalFeatureData
from vsekit.data.sources.base import (
    SOURCES,
    DataConfig,
    data_config,
    load_split,
    register_source,
    sniff_order,
    sniff_source,
    source_names,
)

__all__ = ["SOURCES", "CrossModalFeatureData", "DataConfig", "DemoData", "FolderData", "KarpathyData", "PairsData",
           "PrecompData", "ShardsData", "data_config", "list_images", "load_split", "read_folder", "register_source",
           "sniff_order", "sniff_source", "source_names"]
