"""Optimizers with per-group learning-rate multipliers, and the step-decay schedule."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def param_groups(model: nn.Module, lr: float, lr_mult: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """One group per distinct multiplier; a parameter takes the multiplier of the longest matching name prefix.

    Frozen parameters are included (they get no gradient, so the optimizer skips them), which lets a later
    training stage unfreeze them without rebuilding the optimizer.
    """
    lr_mult = dict(lr_mult or {})
    groups: dict[float, list[nn.Parameter]] = {}
    names: dict[float, list[str]] = {}
    for name, p in model.named_parameters():
        best, mult = -1, 1.0
        for prefix, m in lr_mult.items():
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                best, mult = len(prefix), float(m)
        groups.setdefault(mult, []).append(p)
        names.setdefault(mult, []).append(name)
    unknown = [p for p in lr_mult if not any(n == p or n.startswith(p + ".") for ns in names.values() for n in ns)]
    if unknown:
        raise ValueError(f"optim.lr_mult names no parameters: {unknown}")
    return [{"params": ps, "lr": lr * m, "lr_mult": m} for m, ps in sorted(groups.items())]


def build_optimizer(model: nn.Module, cfg: dict[str, Any]) -> torch.optim.Optimizer:
    name = cfg.get("name", "adam").lower()
    lr = float(cfg["lr"])
    groups = param_groups(model, lr, cfg.get("lr_mult"))
    wd = float(cfg.get("weight_decay", 0.0))
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=wd)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, weight_decay=wd, momentum=float(cfg.get("momentum", 0.9)),
                               nesterov=bool(cfg.get("nesterov", True)))
    raise ValueError(f"optim.name must be adam, adamw or sgd, got {name!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: dict[str, Any]):
    """Per-epoch learning-rate decay by ``lr_decay_factor``, stepped once per epoch.

    ``lr_decay_every: n``: lr * factor ** (epoch // n), the VSE++ / LSEH schedule. ``lr_milestones: [a, b]``:
    decay after epochs a and b (Dual-Path COCO stage II: 0.1 x 15, 0.01 x 5, 0.001 x 1 is ``[15, 20]``).
    Neither: constant. Epochs count from the optimizer's creation, i.e. from the start of a training stage.
    """
    every, milestones = cfg.get("lr_decay_every"), cfg.get("lr_milestones")
    gamma = float(cfg.get("lr_decay_factor", 0.1))
    if every and milestones:
        raise ValueError("optim: set lr_decay_every or lr_milestones, not both (set the other to null)")
    if milestones:
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=sorted(int(m) for m in milestones),
                                                    gamma=gamma)
    if not every:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 1.0)
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=int(every), gamma=gamma)
