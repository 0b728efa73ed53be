"""Encoders, similarities and the VSE model, each behind a registry."""

from vsekit.models.image import BACKBONES, IMAGE_ENCODERS, PretrainedWeightsMissing
from vsekit.models.similarity import SIMILARITIES, cosine_sim, order_sim
from vsekit.models.text import TEXT_ENCODERS
from vsekit.models.vse import VSEModel, build_model

__all__ = ["BACKBONES", "IMAGE_ENCODERS", "TEXT_ENCODERS", "SIMILARITIES", "VSEModel", "build_model",
           "cosine_sim", "order_sim", "PretrainedWeightsMissing"]
