"""The terms of the training objective: each a module, an ``OBJECTIVE_TERMS`` entry and a config section.

Every term follows one protocol (:class:`ObjectiveTerm`): :meth:`~ObjectiveTerm.losses` returns its values by
name, computed from the forward pass (:class:`~vsekit.models.vse.PairOutput`) and the
:class:`~vsekit.data.batch.Batch`, and hooks let it act around a step (``prepare`` before the forward pass,
e.g. negative mining; ``set_progress``, ``set_epoch``, ``set_stage``). The built-in terms have sections of
their own (``objective.instance``, ...); the others sit under ``objective.terms``, keyed by name::

    objective:
      terms:
        caption: {weight: 1.0, hidden: 512, mode: xe}     # the term's own options beside `weight`
        gan:     {weight: 0.1, optim: {lr: 2.0e-4, betas: [0.5, 0.999]}}

``weight`` may change per training stage (0 switches a term off), and so may the options a term lists in
:attr:`ObjectiveTerm.stage_keys`; every other option is fixed when the term is built. A term that trains a part
of its own against the rest (a GAN's discriminator) returns :class:`AuxiliaryUpdate` s: the trainer gives each
its own optimizer (``optim`` of the term's section, over the stage's), steps it before the main update, and
keeps those parameters out of the main optimizer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar

from torch import Tensor, nn

from vsekit.data.batch import Batch
from vsekit.registry import Registry

#: factories receive these from the run: the joint-space size, the vocabulary, the training corpus, the
#: per-image shape of precomputed features (None for image files)
OBJECTIVE_TERMS = Registry("objective term", injected=("embed_size", "vocab", "corpus", "feature_shape"))
#: keys of a term's section that the objective handles itself
TERM_OWN_KEYS = ("weight", "optim")


@dataclass
class AuxiliaryUpdate:
    """A part of a term trained by its own optimizer against its own loss (a discriminator).

    ``loss(out, batch)`` gets a detached copy of the forward pass: it must not send gradients into the model.
    It runs before the main loss, so the main loss sees the part's updated weights. It returns the loss, or
    ``(loss, {name: tensor})`` with extra numbers to log (a discriminator's accuracies).
    """

    name: str
    module: nn.Module
    loss: Callable[[Any, Batch], Tensor | tuple[Tensor, dict[str, Tensor]]]


class ObjectiveTerm(nn.Module):
    """Base class of the objective's terms. The objective calls :meth:`losses`; a term's ``forward`` is its own
    (the registered ones take ``(out, batch)`` and return the value, or ``(value, {name: tensor})`` with extra
    numbers to log, which the default :meth:`losses` passes on)."""

    #: options that may change from one training stage to the next (passed to :meth:`set_stage`)
    stage_keys: ClassVar[tuple[str, ...]] = ()
    #: True for an in-batch term: on a distributed step it reads the gathered forward pass and
    #: :meth:`Batch.gather`; otherwise this process's rows
    global_batch: ClassVar[bool] = False
    #: whether the term reads the batch's LSA caption vectors (e.g. LSEH per level) / the images' class labels
    requires_caption_vectors: bool = False
    requires_labels: ClassVar[bool] = False
    #: whether the term reads the batch's raw inputs, which a distributed step does not gather
    reads_inputs: bool = False
    #: set by the objective: the term's name, the weights of its :meth:`parts`, the options it was built with
    name: str = ""
    weights: dict[str, float] = {}  # noqa: RUF012 - replaced, never mutated
    built_options: dict[str, Any] | None = None

    def parts(self) -> tuple[str, ...]:
        """The names of the weighted values :meth:`losses` returns (their weights: ``objective.weights()``)."""
        return (self.name,)

    def losses(self, out: Any, batch: Batch) -> dict[str, Tensor]:
        """The term's values by name: those of :meth:`parts` whose weight is non-zero, and extra numbers to log
        (not part of the objective)."""
        value = self(out, batch)
        value, extra = value if isinstance(value, tuple) else (value, {})
        return {**extra, self.name: value}

    def prepare(self, model: nn.Module, batch: Batch, restore_mode: Callable[[], None]) -> Batch:
        """Before the forward pass (on the device, under autocast): the batch with what the term adds to it,
        e.g. mined negatives. ``restore_mode`` puts the model back in training mode after an eval-mode pass."""
        return batch

    def set_stage(self, **options: Any) -> None:
        """Take the :attr:`stage_keys` options of the current stage."""
        for k, v in options.items():
            setattr(self, k, v)

    def set_epoch(self, epoch: int) -> None:
        """The run's epoch (0-based), given before every call: for a schedule inside the term, e.g. the
        warm-up of a ranking loss it holds."""

    def set_progress(self, epoch: float, step: float) -> None:
        """Training progress in [0, 1] before every step: ``epoch / epochs`` and the same per step."""

    def auxiliary_updates(self) -> list[AuxiliaryUpdate]:
        return []


def detached(out: Any) -> Any:
    """A copy of a dataclass of tensors (a PairOutput) with every tensor detached."""
    return replace(out, **{f.name: getattr(out, f.name).detach() for f in fields(out)
                           if isinstance(getattr(out, f.name), Tensor)})


def term_options(section: dict[str, Any]) -> dict[str, Any]:
    """A term's section without the objective's own keys: what its factory takes."""
    return {k: v for k, v in section.items() if k not in TERM_OWN_KEYS}
