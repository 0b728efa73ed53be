"""Training stages: consecutive epoch ranges of one run, each with its own optimizer, loss weights and frozen parts.

``train.stages`` is a list; each stage has ``epochs`` (and an optional ``name``) plus overrides of the run's
config that are deep-merged into it for the stage's epochs only (a stage does not inherit the previous
stage's overrides). What a stage may override:

- ``optim``: anything (``lr``, ``lr_mult``, ``lr_decay_every`` / ``lr_milestones``, ``weight_decay``, ...).
  The optimizer and the LR schedule are rebuilt when the stage starts (momentum starts afresh, and schedule
  epochs count from the stage's first epoch), as when the reference trains stage II from a stage-I snapshot.
- ``objective``: the weights and options of the objective's terms (``loss_weight``, ``instance.*``, ``mined.*``).
- ``train.freeze``: parameter / module name prefixes to freeze (no gradients; batch norm and dropout in eval
  mode), in the same namespace as ``optim.lr_mult``.
- ``model.image_encoder.finetune`` / ``model.text_encoder.finetune``: flags for encoders with ``set_finetune``
  (the CNN image encoder: frozen backbone with its batch norm in eval mode).

The trainer applies a stage at the epoch boundary where it starts and records the active stage in its
checkpoints, so ``--resume`` rebuilds the same optimizer before loading its state.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from vsekit.config import ConfigError, deep_merge

STAGE_KEYS = {"name", "epochs", "optim", "objective", "train", "model"}
_STAGE_TRAIN_KEYS = {"freeze"}
_STAGE_ENCODER_KEYS = {"finetune"}
_ENCODERS = ("image_encoder", "text_encoder")


@dataclass
class Stage:
    name: str
    start: int  # first epoch (0-based)
    epochs: int
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def end(self) -> int:
        return self.start + self.epochs


def _check_overrides(i: int, stage: dict[str, Any]) -> None:
    where = f"train.stages[{i}]"
    unknown = set(stage) - STAGE_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; a stage may set {sorted(STAGE_KEYS)}")
    for sec in ("optim", "objective", "train", "model"):
        if sec in stage and not isinstance(stage[sec], dict):
            raise ConfigError(f"{where}.{sec} must be a mapping")
    bad = set(stage.get("train", {})) - _STAGE_TRAIN_KEYS
    if bad:
        raise ConfigError(f"{where}.train: only {sorted(_STAGE_TRAIN_KEYS)} can change per stage, not {sorted(bad)}")
    model = stage.get("model", {})
    for enc, spec in model.items():
        if enc not in _ENCODERS or not isinstance(spec, dict) or set(spec) - _STAGE_ENCODER_KEYS:
            raise ConfigError(f"{where}.model: only image_encoder.finetune / text_encoder.finetune can change "
                              f"per stage, got {enc}: {spec}")


class StagePlan:
    """The stages of a run. Without ``train.stages`` there is one implicit stage: the config itself."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        raw = (cfg.get("train") or {}).get("stages") or []
        if not isinstance(raw, list):
            raise ConfigError("train.stages must be a list of mappings")
        self.stages: list[Stage] = []
        start = 0
        for i, s in enumerate(raw):
            if not isinstance(s, dict):
                raise ConfigError(f"train.stages[{i}] must be a mapping, got {s!r}")
            _check_overrides(i, s)
            if not isinstance(s.get("epochs"), int) or s["epochs"] < 1:
                raise ConfigError(f"train.stages[{i}].epochs must be a positive integer, got {s.get('epochs')!r}")
            overrides = {k: v for k, v in s.items() if k not in ("name", "epochs")}
            self.stages.append(Stage(str(s.get("name", f"stage{i + 1}")), start, int(s["epochs"]), overrides))
            start += int(s["epochs"])
        epochs = int(cfg["train"]["epochs"])
        if self.stages and epochs > self.total_epochs:
            raise ConfigError(f"train.epochs ({epochs}) is more than the stages' epochs together "
                              f"({self.total_epochs}); set train.epochs to {self.total_epochs} or lengthen a stage")

    @property
    def configured(self) -> bool:
        return bool(self.stages)

    @property
    def total_epochs(self) -> int:
        return self.stages[-1].end if self.stages else int(self.cfg["train"]["epochs"])

    def __len__(self) -> int:
        return max(1, len(self.stages))

    def index_at(self, epoch: int) -> int:
        """The stage that trains epoch ``epoch`` (0-based)."""
        for k, s in enumerate(self.stages):
            if epoch < s.end:
                return k
        return max(0, len(self.stages) - 1)

    def name(self, k: int) -> str:
        return self.stages[k].name if self.stages else "main"

    def config(self, k: int) -> dict[str, Any]:
        """The run's config as stage ``k`` sees it (the stage's overrides merged in)."""
        if not self.stages:
            return self.cfg
        return deep_merge(self.cfg, self.stages[k].overrides)

    def configs(self) -> list[dict[str, Any]]:
        return [self.config(k) for k in range(len(self))]


def _matches(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


class Freezer:
    """Freezes parameters and modules by name prefix, and undoes exactly what it froze.

    A frozen parameter gets ``requires_grad=False`` (so an optimizer that holds it skips it: no update, no
    weight decay, no momentum); a frozen module is put back in eval mode by :meth:`hold_eval` after every
    ``model.train()``, so its batch-norm statistics do not move and its dropout is off.
    """

    def __init__(self) -> None:
        self.prefixes: list[str] = []
        self._params: list[nn.Parameter] = []
        self._modules: list[nn.Module] = []

    def release(self) -> None:
        for p in self._params:
            p.requires_grad_(True)
        self.prefixes, self._params, self._modules = [], [], []

    def freeze(self, prefixes: Iterable[str], named_parameters: Iterator[tuple[str, nn.Parameter]],
               named_modules: Iterator[tuple[str, nn.Module]]) -> None:
        self.release()
        prefixes = [str(p) for p in prefixes or []]
        if not prefixes:
            return
        params = list(named_parameters)
        modules = list(named_modules)
        unknown = [p for p in prefixes if not any(_matches(n, [p]) for n, _ in params)
                   and not any(_matches(n, [p]) for n, _ in modules)]
        if unknown:
            raise ValueError(f"train.freeze names nothing in the model: {unknown}")
        self.prefixes = prefixes
        for name, p in params:
            if _matches(name, prefixes) and p.requires_grad:
                p.requires_grad_(False)
                self._params.append(p)
        self._modules = [m for name, m in modules if name and _matches(name, prefixes)]

    def hold_eval(self) -> None:
        for m in self._modules:
            m.eval()
