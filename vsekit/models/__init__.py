"""Encoders, similarities and the VSE model, each behind a registry."""

import vsekit.models.open_clip_encoders  # noqa: F401  (registers the open_clip image and text encoders)
import vsekit.models.projectors  # noqa: F401  (registers the ACMR projectors)
import vsekit.models.timm_encoder  # noqa: F401  (registers the timm image encoder)
from vsekit.models.heads import DualPathHead, ProjectorHead, SharedClassifier
from vsekit.models.image import BACKBONES, IMAGE_ENCODERS, PretrainedWeightsMissing
from vsekit.models.sgraf import SGRAFRegionEncoder, SGRAFSimilarity, SGRAFWordEncoder
from vsekit.models.similarity import (
    SIMILARITIES,
    SIMILARITY_NETWORKS,
    FixedSimilarity,
    SimilarityNetwork,
    cosine_sim,
    order_sim,
)
from vsekit.models.text import TEXT_ENCODERS
from vsekit.models.textcnn import TextCNNEncoder
from vsekit.models.vse import PairOutput, VSEModel, build_model

__all__ = ["BACKBONES", "IMAGE_ENCODERS", "TEXT_ENCODERS", "SIMILARITIES", "VSEModel", "PairOutput", "build_model",
           "cosine_sim", "order_sim", "PretrainedWeightsMissing", "DualPathHead", "ProjectorHead", "SharedClassifier",
           "TextCNNEncoder", "SIMILARITY_NETWORKS", "FixedSimilarity", "SimilarityNetwork", "SGRAFRegionEncoder",
           "SGRAFWordEncoder", "SGRAFSimilarity"]
