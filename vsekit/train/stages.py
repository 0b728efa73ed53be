"""Training stages: consecutive epoch ranges of one run, each with its own optimizer, loss weights and frozen parts.

``train.stages`` is a list; each stage has ``epochs`` (and an optional ``name``) plus overrides of the run's
config that are deep-merged into it for the stage's epochs only (a stage does not inherit the previous
stage's overrides). What a stage may override (``vsekit.config.schema.StageConfig``):

- ``optim``: anything (``lr``, ``lr_mult``, ``lr_decay_every`` / ``lr_milestones``, ``weight_decay``, ...).
  The optimizer and the LR schedule are rebuilt when the stage starts (momentum starts afresh, and schedule
  epochs count from the stage's first epoch), as when the reference trains stage II from a stage-I snapshot.
- ``objective``: the weights and options of the objective's terms (``loss_weight``, ``instance.*``, ``mined.*``).
- ``train.freeze``: parameter / module name prefixes to freeze (no gradients; batch norm and dropout in eval
  mode), in the same namespace as ``optim.lr_mult``.
- ``model.image_encoder.finetune`` / ``model.text_encoder.finetune``: freeze or train the part an encoder
  names as its ``finetune_scope`` (the CNN backbone).

The trainer applies a stage at the epoch boundary where it starts and records the active stage in its
checkpoints, so ``--resume`` rebuilds the same optimizer before loading its state.
"""

from __future__ import annotations

from dataclasses import dataclass

from vsekit.config import RunConfig
from vsekit.config.resolve import stage_configs


@dataclass
class Stage:
    name: str
    start: int  # first epoch (0-based)
    epochs: int
    config: RunConfig  # the run's config with the stage's overrides merged in

    @property
    def end(self) -> int:
        return self.start + self.epochs


class StagePlan:
    """The stages of a run. Without ``train.stages`` there is one implicit stage: the config itself."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.stages: list[Stage] = []
        start = 0
        for i, (s, merged) in enumerate(zip(cfg.train.stages, stage_configs(cfg))):
            self.stages.append(Stage(s.name or f"stage{i + 1}", start, s.epochs, merged))
            start += s.epochs

    @property
    def configured(self) -> bool:
        return bool(self.stages)

    def __len__(self) -> int:
        return max(1, len(self.stages))

    def index_at(self, epoch: int) -> int:
        """The stage that trains epoch ``epoch`` (0-based)."""
        return next((k for k, s in enumerate(self.stages) if epoch < s.end), max(0, len(self.stages) - 1))

    def name(self, k: int) -> str:
        return self.stages[k].name if self.stages else "main"

    def config(self, k: int) -> RunConfig:
        """The run's config as stage ``k`` sees it (the stage's overrides merged in)."""
        return self.stages[k].config if self.stages else self.cfg

    def configs(self) -> list[RunConfig]:
        return [self.config(k) for k in range(len(self))]
