"""The training objective: ``objective.loss_weight`` x the ``loss:`` section's ranking loss plus weighted terms.

Every term is an ``OBJECTIVE_TERMS`` entry with one protocol and a config section
(:mod:`vsekit.losses.terms`); the objective adds up the weighted values the terms return. A term is built
when some stage gives it a non-zero weight, and computed only while its weight is non-zero; with the
defaults the objective is exactly the ``loss:`` section.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from vsekit.config import RunConfig
from vsekit.config.schema import BUILTIN_TERMS, ObjectiveConfig
from vsekit.data.batch import Batch
from vsekit.errors import ConfigError
from vsekit.losses.base import RankingLoss
from vsekit.losses.terms import OBJECTIVE_TERMS, AuxiliaryUpdate, ObjectiveTerm, term_options
from vsekit.models.vse import PairOutput

# keys of the built-in terms' sections that are not their options (the instance weights, the mined loss's name)
_NOT_OPTIONS = ("image_weight", "text_weight", "name")


def _where(name: str) -> str:
    return f"objective.{name}" if name in BUILTIN_TERMS else f"objective.terms.{name}"


def _options(name: str, section: dict[str, Any]) -> dict[str, Any]:
    """A term's options: its section without the weights and the objective's own keys."""
    options = term_options(section)
    return {k: v for k, v in options.items() if k not in _NOT_OPTIONS} if name in BUILTIN_TERMS else options


class Objective(nn.Module):
    """``loss_weight`` x the in-batch ranking loss plus the weighted values of the terms.

    ``rank_loss`` is the ``loss:`` section's module (owned and checkpointed by the trainer);
    :attr:`terms` holds the objective's terms by name, which the trainer optimises and checkpoints under the
    name ``objective``.
    """

    def __init__(self, rank_loss: RankingLoss, terms: dict[str, ObjectiveTerm] | None = None) -> None:
        super().__init__()
        self.rank_loss = rank_loss
        self.terms = nn.ModuleDict()
        for name, term in (terms or {}).items():
            term.name, term.weights = name, {}
            self.terms[name] = term
        self.weights = ObjectiveConfig().weights()

    # -- configuration ---------------------------------------------------------------------------------
    def set_weights(self, objective_cfg: ObjectiveConfig) -> None:
        """Take the weights and the stage options of one stage's ``objective`` section."""
        w = objective_cfg.weights()
        for name, section in objective_cfg.term_sections().items():
            if name in self.terms:
                self._set_stage(self.terms[name], _options(name, section))
            elif objective_cfg.term_weight(name):
                raise ConfigError(f"{_where(name)} has a weight but no {name} term was built")
        for term in self.terms.values():
            term.weights = {p: w.setdefault(p, 0.0) for p in term.parts()}
        self.weights = w

    @staticmethod
    def _set_stage(term: ObjectiveTerm, options: dict[str, Any]) -> None:
        built = term.built_options
        if built is not None:
            fixed = [k for k in set(options) | set(built)
                     if k not in term.stage_keys and options.get(k) != built.get(k)]
            if fixed:
                raise ConfigError(f"{_where(term.name)}.{sorted(fixed)[0]}: cannot change between training stages "
                                  f"(only {', '.join(term.stage_keys) or 'the weight'} can)")
        term.set_stage(**{k: options[k] for k in term.stage_keys if k in options})

    def _active(self) -> list[ObjectiveTerm]:
        return [t for t in self.terms.values() if any(t.weights.values())]

    def active(self, name: str) -> bool:
        return bool(self.weights.get(name))

    def auxiliary_updates(self) -> list[tuple[str, AuxiliaryUpdate]]:
        """(term name, part) of each term's parts with optimizers of their own (every built term's, whatever
        its weight now: the optimizers persist across stages like the terms)."""
        return [(name, u) for name, term in self.terms.items() for u in term.auxiliary_updates()]

    @property
    def needs_caption_vectors(self) -> bool:
        """Whether a term reads the LSA vectors of the batch's captions (e.g. LSEH per level)."""
        return any(t.requires_caption_vectors for t in self.terms.values())

    @property
    def needs_labels(self) -> bool:
        """Whether a term reads the class labels of the batch's images (ACMR's label and triplet terms)."""
        return any(t.requires_labels for t in self.terms.values())

    def check_distributed(self) -> None:
        """A distributed step gathers embeddings, ids, labels and caption vectors, not the raw inputs: a term
        that reads the whole batch's raw inputs cannot run (said now, not at the first step)."""
        for name, term in self.terms.items():
            if term.global_batch and term.reads_inputs:
                raise ConfigError(f"{_where(name)}.mine_in: input mines in the raw inputs of the whole batch, which "
                                  "distributed training does not gather: set mine_in: embedding, or train in one "
                                  "process")

    # -- hooks around a step ---------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """:meth:`ObjectiveTerm.set_epoch` of every term, at the start of every epoch."""
        for term in self.terms.values():
            term.set_epoch(epoch)

    def set_progress(self, epoch: float, step: float) -> None:
        """:meth:`ObjectiveTerm.set_progress` of every term, before every step."""
        for term in self.terms.values():
            term.set_progress(epoch, step)

    def prepare(self, model: nn.Module, batch: Batch, restore_mode: Callable[[], None]) -> Batch:
        """Before the forward pass: the batch with what the active terms add to it (mined negatives)."""
        for term in self._active():
            batch = term.prepare(model, batch, restore_mode)
        return batch

    # -- loss ------------------------------------------------------------------------------------------
    def forward(self, out: PairOutput, batch: Batch,
                local: tuple[PairOutput, Batch] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """(total loss, {name: unweighted value}): the sum of the weighted values the active terms return
        (their other values, e.g. the adversary's accuracy and λ, are logged only). On a distributed step
        ``out`` and ``batch`` are gathered over processes and ``local`` holds this process's own (else the same),
        which the terms that are not in-batch (:attr:`~vsekit.losses.terms.ObjectiveTerm.global_batch`) read."""
        parts: dict[str, Tensor] = {}
        total: Tensor | None = None

        def add(name: str, weight: float, value: Tensor) -> None:
            nonlocal total
            parts[name] = value.detach()
            weighted = value if weight == 1.0 else weight * value
            total = weighted if total is None else total + weighted

        if self.weights["loss"]:
            value = self.rank_loss(out.sim.float(), batch.image_ids, caption_vectors=batch.caption_vectors)
            add("loss", self.weights["loss"], value)
        for term in self._active():
            term_out, term_batch = (out, batch) if term.global_batch or local is None else local
            for name, value in term.losses(term_out, term_batch).items():
                if term.weights.get(name):
                    add(name, term.weights[name], value)
                else:
                    parts[name] = value.detach()
        if total is None:
            raise ConfigError("every objective weight is 0: nothing to train")
        return total, parts


def build_objective(stage_configs: list[RunConfig], rank_loss: RankingLoss, *, feature_dim: int, vocab=None,
                    corpus=None, feature_shape: tuple[int, ...] | None = None) -> Objective:
    """The objective of a run: the terms that some stage switches on, each built by its ``OBJECTIVE_TERMS``
    factory with the options of the first such stage (``feature_dim``, ``vocab``, the training ``corpus`` and
    ``feature_shape`` are the factories' injected arguments)."""
    sections = [c.objective for c in stage_configs]
    terms: dict[str, ObjectiveTerm] = {}
    for name in dict.fromkeys(n for s in sections for n in s.term_sections()):
        first = next((s for s in sections if s.term_weight(name)), None)
        if first is None:
            continue
        options = _options(name, first.term_sections()[name])
        term = OBJECTIVE_TERMS.build({"name": name, **options}, embed_size=feature_dim, vocab=vocab, corpus=corpus,
                                     feature_shape=feature_shape)
        if not isinstance(term, ObjectiveTerm):
            raise ConfigError(f"{_where(name)}: the registered factory did not build an ObjectiveTerm")
        term.built_options = options
        terms[name] = term
    objective = Objective(rank_loss, terms)
    objective.set_weights(sections[0])
    return objective
