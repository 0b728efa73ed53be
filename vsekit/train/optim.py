"""Optimizers with per-group learning-rate multipliers, the step-decay schedule, and the
:class:`OptimizerSet` that a run steps (main and auxiliary optimizers, their schedules, the training stage)."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from vsekit.checkpoint import CheckpointError
from vsekit.config.schema import OptimConfig
from vsekit.data.batch import Batch
from vsekit.errors import ConfigError
from vsekit.losses.terms import AuxiliaryUpdate, detached
from vsekit.utils import distributed
from vsekit.utils.freeze import Freezer

if TYPE_CHECKING:
    from vsekit.train.objective import Objective
    from vsekit.train.stages import StagePlan

log = logging.getLogger("vsekit.train")
T = TypeVar("T")


def param_groups(model: nn.Module, lr: float, lr_mult: dict[str, float] | None = None,
                 exclude: set[int] | frozenset[int] = frozenset()) -> list[dict[str, Any]]:
    """One group per distinct multiplier; a parameter takes the multiplier of the longest matching name prefix.

    Frozen parameters are included (they get no gradient, so the optimizer skips them), which lets a later
    training stage unfreeze them without rebuilding the optimizer. ``exclude``: ids of parameters another
    optimizer owns (a GAN discriminator's).
    """
    lr_mult = dict(lr_mult or {})
    groups: dict[float, list[nn.Parameter]] = {}
    used: set[str] = set()  # the prefixes that name a parameter
    for name, p in model.named_parameters():
        if id(p) in exclude:
            continue
        matching = [prefix for prefix in lr_mult if name == prefix or name.startswith(prefix + ".")]
        used.update(matching)
        groups.setdefault(float(lr_mult[max(matching, key=len)]) if matching else 1.0, []).append(p)
    unknown = [p for p in lr_mult if p not in used]
    if unknown:
        raise ConfigError(f"optim.lr_mult names no parameters: {unknown}")
    return [{"params": ps, "lr": lr * m, "lr_mult": m} for m, ps in sorted(groups.items())]


def build_optimizer(model: nn.Module, cfg: OptimConfig,
                    exclude: set[int] | frozenset[int] = frozenset()) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.lr, cfg.lr_mult, exclude)
    if cfg.name in ("adam", "adamw"):
        adam = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
        return adam(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                           nesterov=cfg.nesterov)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-epoch learning-rate decay by ``lr_decay_factor``, stepped once per epoch.

    ``lr_decay_every: n``: lr * factor ** (epoch // n), the VSE++ / LSEH schedule. ``lr_milestones: [a, b]``:
    decay after epochs a and b (Dual-Path COCO stage II: 0.1 x 15, 0.01 x 5, 0.001 x 1 is ``[15, 20]``).
    Neither: constant. Epochs count from the optimizer's creation, i.e. from the start of a training stage.
    """
    if cfg.lr_milestones:
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=sorted(cfg.lr_milestones),
                                                    gamma=cfg.lr_decay_factor)
    if not cfg.lr_decay_every:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 1.0)
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_decay_every, gamma=cfg.lr_decay_factor)


_ENCODERS = ("image_encoder", "text_encoder")


@dataclass
class Auxiliary:
    """An objective term's part with its own optimizer and schedule (see vsekit.losses.terms)."""

    update: AuxiliaryUpdate
    term: str
    cfg: OptimConfig
    optimizer: torch.optim.Optimizer
    scheduler: Any


class OptimizerSet:
    """The optimizers of a run and the stage that sets them up: the main optimizer over the model, the loss and
    the objective's terms (:attr:`trainable`); one optimizer per part of a term that trains against its own loss
    (:attr:`aux`, a discriminator); their LR schedules, the AMP gradient scaler, and the frozen parts. Each
    training stage (:mod:`vsekit.train.stages`) rebuilds them (:meth:`apply_stage`). :meth:`state_dict` gives a
    checkpoint's ``optimizer``, ``scheduler``, ``scaler``, ``aux_optimizers`` and ``stage`` entries."""

    def __init__(self, model: nn.Module, loss: nn.Module, objective: Objective, plan: StagePlan,
                 device: torch.device, amp: bool, cpu_bf16: bool = False, state: dict[str, Any] | None = None) -> None:
        self.model, self.objective, self.plan, self.amp = model, objective, plan, amp
        self.autocast = _autocast(device, amp, cpu_bf16)  # the step's forward runs in it
        # one parameter set (named as optim.lr_mult and train.freeze name them) for the optimizer, gradient
        # clipping and freezing
        self.trainable = _ModelAndLoss(model, loss, objective.terms)
        self.freezer = Freezer()
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp)
        self.stage = -1  # the index of the stage in force
        self.aux: dict[str, Auxiliary] = {}
        self.ddp: DistributedDataParallel | None = None  # under torchrun: averages the main gradients
        # the first stage, or the one the checkpoint ``state`` to resume was saved in (loaded later)
        self.apply_stage(self.plan.index_at(0) if state is None else
                         int(state.get("stage", self.plan.index_at(int(state["epoch"])))))

    def apply_stage(self, k: int) -> None:
        """Switch to stage ``k``: encoder finetune flags, frozen prefixes, objective weights, a new optimizer
        and LR schedule (the stage's ``optim`` section; schedule epochs count from the stage's start)."""
        scfg = self.plan.config(k)
        self.freezer.release()
        for enc_name in _ENCODERS:
            spec = getattr(scfg.model, enc_name)
            if "finetune" in spec:
                getattr(self.model, enc_name).set_finetune(bool(spec["finetune"]))
        self.freezer.freeze(scfg.train.freeze, self.trainable.named_parameters(), self.trainable.named_parts())
        self.objective.set_weights(scfg.objective)
        self.cfg = scfg.optim
        # parts of the objective's terms with optimizers of their own (a discriminator), out of the main one
        self.aux = {}
        for term, upd in self.objective.auxiliary_updates():
            section = scfg.objective.terms.get(term, {}).get("optim") or {}
            # the stage's lr_mult names parameters of the model (image_encoder.backbone, objective.gan...), not of
            # this part: only the term's own optim section may give the part multipliers
            cfg = OptimConfig.model_validate({**scfg.optim.model_dump(), "lr_mult": {}, **section})
            opt = build_optimizer(upd.module, cfg)
            self.aux[upd.name] = Auxiliary(upd, term, cfg, opt, build_scheduler(opt, cfg))
        owned = {id(p) for a in self.aux.values() for p in a.update.module.parameters()}
        self.optimizer = build_optimizer(self.trainable, self.cfg, exclude=owned)
        self.scheduler = build_scheduler(self.optimizer, self.cfg)
        self.main_params = [p for p in self.trainable.parameters() if id(p) not in owned]
        self.ddp = self._data_parallel(owned)
        self.stage = k
        self.train_mode()
        if self.plan.configured:
            log.info("stage %d/%d (%s) from epoch %d: objective weights %s, frozen %s", k + 1, len(self.plan),
                     self.plan.name(k), self.plan.stages[k].start + 1, self.objective.weights,
                     self.freezer.prefixes or "-")

    def _data_parallel(self, owned: set[int]) -> DistributedDataParallel | None:
        """Under torchrun, DistributedDataParallel over the main parameters that train in this stage (it takes
        those that require a gradient when it is built, hence one per stage); the auxiliary parts average their
        own gradients. The processes start alike (same seed) and keep their own buffers, as before DDP; a step's
        terms may leave parameters unused (a term weighted 0)."""
        self.ddp = None  # the previous stage's reducer lets go of its hooks first
        if not distributed.world().distributed or not any(p.requires_grad for p in self.main_params):
            return None
        ignored = [n for n, p in self.trainable.named_parameters() if id(p) in owned]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self.trainable, ignored)
        return DistributedDataParallel(self.trainable, init_sync=False, broadcast_buffers=False,
                                       find_unused_parameters=True)

    def forward(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``: the step's way from a batch to its loss; under torchrun inside DDP's forward, so that
        the backward that follows averages the gradients as they are computed."""
        return self.ddp(fn, *args) if self.ddp is not None else fn(*args)

    def train_mode(self) -> None:
        """Training mode, except for what is frozen (its batch norm keeps its statistics)."""
        self.model.train()
        self.objective.train()
        self.freezer.hold_eval()

    def base_lr(self) -> float:
        groups = self.optimizer.param_groups
        return next((g["lr"] for g in groups if g.get("lr_mult") == 1.0), groups[0]["lr"])

    def scale_lr(self, factor: float) -> float:
        """Multiply the main learning rate, now and in its schedule, by ``factor``; the new base rate."""
        for g in self.optimizer.param_groups:
            g["lr"] *= factor
        self.scheduler.base_lrs = [lr * factor for lr in self.scheduler.base_lrs]
        return self.base_lr()

    def auxiliary_steps(self, out: Any, batch: Batch) -> dict[str, torch.Tensor] | None:
        """One update of each active term's own parts (a discriminator) on the detached forward pass, before
        the main loss is computed; None when a loss is not finite (the step is skipped)."""
        parts: dict[str, torch.Tensor] = {}
        active = [a for a in self.aux.values() if self.objective.active(a.term)]
        if not active:
            return parts
        frozen = detached(out)
        for a in active:
            with self.autocast():
                value = a.update.loss(frozen, batch)
            extra: dict[str, torch.Tensor] = {}
            if isinstance(value, tuple):  # (loss, {extra numbers to log})
                value, extra = value
            if not torch.isfinite(value.detach()):
                a.optimizer.zero_grad(set_to_none=True)
                return None
            a.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(value).backward()
            distributed.average_gradients(a.update.module.parameters())
            if a.cfg.grad_clip:
                self.scaler.unscale_(a.optimizer)
                torch.nn.utils.clip_grad_norm_(list(a.update.module.parameters()), float(a.cfg.grad_clip))
            self.scaler.step(a.optimizer)
            a.optimizer.zero_grad(set_to_none=True)  # the main loss's gradients into this part are not its own
            parts[a.update.name] = value.detach()
            parts.update({k: v.detach() for k, v in extra.items()})
        return parts

    def step(self, loss: torch.Tensor) -> float | None:
        """Backward and one update of the main optimizer; None when taken, else the non-finite gradient norm
        for which it was skipped (under AMP the scaler skips such steps itself)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        clip = self.cfg.grad_clip
        if clip or not self.amp:
            self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(self.main_params, float(clip or math.inf))
            if not self.amp and not torch.isfinite(norm):
                self.optimizer.zero_grad(set_to_none=True)
                return float(norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return None

    def skip(self, outputs: list[torch.Tensor], aux_taken: bool) -> None:
        """A step skipped for a non-finite loss; ``aux_taken``: the auxiliary steps before it were taken. Under
        DDP a backward through the forward's ``outputs`` ends the reduction its forward began (every process
        skips the same step), and the gradients are dropped."""
        if self.ddp is not None and outputs:
            torch.stack([t.float().sum() for t in outputs]).sum().mul(0).backward()
        self.optimizer.zero_grad(set_to_none=True)
        if aux_taken:
            self.scaler.update()

    def end_epoch(self) -> None:
        """Step the schedules; an inactive auxiliary part took no step, so its schedule waits."""
        self.scheduler.step()
        for a in self.aux.values():
            if self.objective.active(a.term):
                a.scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "scaler": self.scaler.state_dict()}
        # only runs that use them carry these, so the checkpoints of other recipes stay as they were
        if self.aux:
            state["aux_optimizers"] = {name: {"optimizer": a.optimizer.state_dict(),
                                              "scheduler": a.scheduler.state_dict()} for name, a in self.aux.items()}
        if self.plan.configured:
            state["stage"] = self.stage
        return state

    def load_state_dict(self, state: dict[str, Any], path: Path) -> None:
        """Restore :meth:`state_dict` (of ``path``, named in errors) in the stage it was saved in."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for name, a in self.aux.items():
            saved = (state.get("aux_optimizers") or {}).get(name)
            if saved is None:
                raise CheckpointError(f"{path}: no optimizer state for the objective's {name!r} part")
            a.optimizer.load_state_dict(saved["optimizer"])
            a.scheduler.load_state_dict(saved["scheduler"])
        self.scaler.load_state_dict(state["scaler"])


def _autocast(device: torch.device, amp: bool, cpu_bf16: bool) -> Callable[[], Any]:
    """The step's autocast context: float16 on CUDA with ``train.amp``, bfloat16 on a CPU with
    ``train.cpu_bf16`` (no scaler needed: bfloat16 has float32's range), else none."""
    if device.type == "cpu" and cpu_bf16:
        if not torch.backends.mkldnn.is_available() or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            log.warning("train.cpu_bf16: this CPU has no bfloat16 instructions; autocast will emulate them and "
                        "run slower than float32")
        return functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16)
    return functools.partial(torch.autocast, device.type, dtype=torch.float16, enabled=amp)


class _ModelAndLoss(torch.nn.Module):
    """Groups the model, a loss with parameters (InfoNCE's temperature) and the objective's own terms (the
    shared instance classifier) for one optimizer. Names: the model's own (``image_encoder.backbone...``),
    ``loss.*`` and ``objective.*``, as ``optim.lr_mult`` and ``train.freeze`` use them."""

    def __init__(self, model: torch.nn.Module, loss: torch.nn.Module, terms: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.model, self.loss = model, loss
        self.terms = terms if terms is not None else torch.nn.ModuleDict()

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        yield from self.model.named_parameters(prefix, recurse, remove_duplicate)
        yield from self.loss.named_parameters("loss", recurse, remove_duplicate)
        yield from self.terms.named_parameters("objective", recurse, remove_duplicate)

    def forward(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``: whatever a step computes from the model, the loss and the terms (DDP's forward)."""
        return fn(*args)

    def named_parts(self):
        """Sub-modules under the same names as :meth:`named_parameters`."""
        yield from self.model.named_modules()
        yield from self.loss.named_modules(prefix="loss")
        yield from self.terms.named_modules(prefix="objective")
