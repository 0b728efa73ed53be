"""Encoders, similarities and the VSE model, each behind a registry.

Every module that registers an encoder or a similarity is imported here, and only here: importing any part of
``vsekit.models`` (e.g. ``vsekit.models.vse``) runs this first, so the registries are complete.
"""

import vsekit.models.bert  # noqa: F401  (registers the "bert" text encoder)
import vsekit.models.open_clip_encoders  # noqa: F401  (registers the open_clip image and text encoders)
import vsekit.models.projectors  # noqa: F401  (registers the ACMR projectors)
import vsekit.models.sgraf  # noqa: F401  (registers the SGRAF encoders and similarity networks)
import vsekit.models.textcnn  # noqa: F401  (registers the "textcnn" text encoder)
import vsekit.models.timm_encoder  # noqa: F401  (registers the timm image encoder)
import vsekit.models.twolevel  # noqa: F401  (registers GXN's two-level encoders and similarity)
import vsekit.models.vse_infty  # noqa: F401  (registers "vse_infty" and "bigru_gpo")
import vsekit.models.vsrn  # noqa: F401  (registers the "vsrn" image encoder)
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
