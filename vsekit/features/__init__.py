"""Precomputed image features from a backbone: ``vsekit features extract`` (see :mod:`.extract`)."""

from vsekit.features.backbones import ExtractionModel, FeatureBackbone, build_backbone, regions
from vsekit.features.extract import ExtractOptions, SplitResult, extract_split, grouped_captions

__all__ = ["ExtractOptions", "ExtractionModel", "FeatureBackbone", "SplitResult", "build_backbone", "extract_split",
           "grouped_captions", "regions"]
