"""Objective terms that plug in by name: a module, a registry entry and a recipe section.

A term adds one weighted value to the training objective, computed from the batch's forward pass
(:class:`~vsekit.models.vse.PairOutput`) and the batch itself (:class:`TermBatch`): a caption decoder's
cross-entropy, a GAN's generator loss, ... Config (``objective.terms``, keyed by the registered name)::

    objective:
      terms:
        caption: {weight: 1.0, hidden: 512, mode: xe}     # the term's own options beside `weight`
        gan:     {weight: 0.1, optim: {lr: 2.0e-4, betas: [0.5, 0.999]}}

``weight`` may change per training stage (0 switches a term off), and so may the options a term lists in
:attr:`ObjectiveTerm.stage_keys` (e.g. a decoder switching from cross-entropy to self-critical training);
every other option is fixed when the term is built. A term that trains a part of its own against the rest
(a GAN's discriminator) returns :class:`AuxiliaryUpdate` s: the trainer gives each its own optimizer
(``optim`` of the term's section, over the stage's ``optim``), steps it before the main update, and keeps those
parameters out of the main optimizer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar

from torch import Tensor, nn

from vsekit.registry import Registry

#: factories receive these from the run: the joint-space size, the vocabulary, the training corpus, the
#: per-image shape of precomputed features (None for image files)
OBJECTIVE_TERMS = Registry("objective term", injected=("embed_size", "vocab", "corpus", "feature_shape"))
#: keys of a term's section that the objective handles itself
TERM_OWN_KEYS = ("weight", "optim")


@dataclass
class TermBatch:
    """What a term may read of the batch besides the forward pass: the model's image input (pixels or
    features), the text input tuple ((tokens (B, T), lengths (B,)) or (features,)), the training-corpus row
    of each image, class labels if any, and the training progress in [0, 1]."""

    images: Tensor
    text: tuple[Tensor, ...]
    image_ids: Tensor
    labels: Tensor | None = None
    progress: float = 0.0
    caption_vectors: Tensor | None = None  # LSA vectors of the batch's captions, when the run has them


@dataclass
class AuxiliaryUpdate:
    """A part of a term trained by its own optimizer against its own loss (a discriminator).

    ``loss(out, batch)`` gets a detached copy of the forward pass: it must not send gradients into the model.
    It runs before the main loss, so the main loss sees the part's updated weights. It returns the loss, or
    ``(loss, {name: tensor})`` with extra numbers to log (a discriminator's accuracies).
    """

    name: str
    module: nn.Module
    loss: Callable[[Any, TermBatch], Tensor | tuple[Tensor, dict[str, Tensor]]]


class ObjectiveTerm(nn.Module):
    """Base class of the registered terms. ``forward(out, batch)`` returns the term's value, or
    ``(value, {name: tensor})`` with extra numbers to log (not part of the objective)."""

    #: options that may change from one training stage to the next (passed to :meth:`set_stage`)
    stage_keys: ClassVar[tuple[str, ...]] = ()

    def forward(self, out: Any, batch: TermBatch) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def set_stage(self, **options: Any) -> None:
        """Take the :attr:`stage_keys` options of the current stage."""
        for k, v in options.items():
            setattr(self, k, v)

    def set_epoch(self, epoch: int) -> None:
        """The run's epoch (0-based), given before every call: for a schedule inside the term, e.g. the
        warm-up of a ranking loss it holds."""

    def auxiliary_updates(self) -> list[AuxiliaryUpdate]:
        return []


def detached(out: Any) -> Any:
    """A copy of a dataclass of tensors (a PairOutput) with every tensor detached."""
    return replace(out, **{f.name: getattr(out, f.name).detach() for f in fields(out)
                           if isinstance(getattr(out, f.name), Tensor)})


def term_options(section: dict[str, Any]) -> dict[str, Any]:
    """A term's section without the objective's own keys: what its factory takes."""
    return {k: v for k, v in section.items() if k not in TERM_OWN_KEYS}
