"""The loss registry, the common loss interface and the hinge helpers shared by the ranking losses.

Every loss takes a similarity matrix ``sim`` (B, B) whose row i is the IMAGE of batch slot i and whose
column j is the CAPTION of slot j (diagonal = positive pairs), plus ``image_ids`` (B,) holding the true
image id of each slot, so that two slots showing the same image (with different captions) can be told
apart from real negatives. The losses never look at how ``sim`` was produced (cosine, order, learned).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from vsekit.registry import Registry

LOSSES = Registry("loss")

REDUCTIONS = ("max", "sum")
MASKS = ("diagonal", "same_image")


def check_choice(what: str, value: str, allowed: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``allowed``, else raise a ValueError naming the options."""
    if value not in allowed:
        raise ValueError(f"{what} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return value


def same_image_mask(image_ids: Tensor) -> Tensor:
    """Z (B, B) bool with ``Z[i, j] = image_ids[i] == image_ids[j]`` (the diagonal is always True)."""
    return image_ids.unsqueeze(1) == image_ids.unsqueeze(0)


def diagonal_mask(size: int, device: torch.device) -> Tensor:
    """The (size, size) bool identity, created on ``device``."""
    return torch.eye(size, dtype=torch.bool, device=device)


def hinge_costs(sim: Tensor, margin: float | Tensor, ignore: Tensor) -> tuple[Tensor, Tensor]:
    """The two VSE++ hinge matrices for a (scalar or per-pair) margin.

    ``cost_s[i, j] = [margin_ij + sim_ij - sim_ii]_+`` (image i retrieves captions: caption j is the
    negative) and ``cost_im[i, j] = [margin_ij + sim_ij - sim_jj]_+`` (caption j retrieves images: image
    i is the negative); entries where ``ignore`` is True are set to 0 in both.
    """
    positives = sim.diagonal()
    cost_s = (margin + sim - positives.unsqueeze(1)).clamp_min(0).masked_fill(ignore, 0.0)
    cost_im = (margin + sim - positives.unsqueeze(0)).clamp_min(0).masked_fill(ignore, 0.0)
    return cost_s, cost_im


def reduce_hinge_costs(cost_s: Tensor, cost_im: Tensor, reduction: str) -> Tensor:
    """``"sum"``: every hinge (VSE0); ``"max"``: hardest negative per query (VSE++). Summed, not averaged."""
    if reduction == "max":
        return cost_s.max(dim=1).values.sum() + cost_im.max(dim=0).values.sum()
    return cost_s.sum() + cost_im.sum()


def autocast_disabled(device: torch.device) -> contextlib.AbstractContextManager:
    """A context switching autocast off for ``device``: the loss maths (matmuls included) runs in fp32."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except (RuntimeError, ValueError):  # a device type autocast does not know: nothing to disable
        return contextlib.nullcontext()


class RankingLoss(nn.Module):
    """Base class fixing the interface the trainer relies on.

    Subclasses implement :meth:`compute`, which receives ``sim`` already cast to float32 (autocast
    switched off), ``image_ids`` on ``sim``'s device, and ``caption_vectors`` untouched.
    """

    #: True when :meth:`forward` needs ``caption_vectors`` (the LSA vectors of the batch's captions).
    requires_caption_vectors: bool = False
    #: True for hinge losses whose max-of-hinges form can fall back to the sum of hinges (collapse recovery).
    has_sum_fallback: bool = False
    #: collapse recovery: the sum of hinges is used while the epoch is below this (see :meth:`fall_back_to_sum`)
    sum_until_epoch: int = 0
    #: a VSE∞-style warm-up: the sum of hinges while the epoch is below this
    warmup_epochs: int = 0
    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by the trainer at the start of every epoch; losses with a schedule extend it."""
        self.epoch = int(epoch)

    def fall_back_to_sum(self, until_epoch: int) -> bool:
        """Use the sum of hinges until ``until_epoch`` (exclusive); False when this loss has no such form."""
        if not self.has_sum_fallback:
            return False
        self.sum_until_epoch = max(int(self.sum_until_epoch), int(until_epoch))
        return True

    def reduction_now(self, reduction: str) -> str:
        """``reduction``, or ``"sum"`` during a warm-up or while a collapse fallback is in force."""
        return "sum" if self.epoch < max(self.sum_until_epoch, self.warmup_epochs) else reduction

    def forward(self, sim: Tensor, image_ids: Tensor | None = None, *,
                caption_vectors: Tensor | None = None) -> Tensor:
        """Scalar float32 loss for a (B, B) image-by-caption similarity matrix.

        ``image_ids=None`` means every slot holds a different image.
        """
        if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
            raise ValueError(f"sim must be a square (B, B) matrix; got shape {tuple(sim.shape)}")
        size = sim.shape[0]
        if image_ids is None:
            image_ids = torch.arange(size, device=sim.device)
        elif image_ids.shape != (size,):
            raise ValueError(f"image_ids must have shape ({size},) to match sim; got {tuple(image_ids.shape)}")
        with autocast_disabled(sim.device):
            return self.compute(sim.float(), image_ids.to(sim.device), caption_vectors)

    def compute(self, sim: Tensor, image_ids: Tensor, caption_vectors: Tensor | None) -> Tensor:
        raise NotImplementedError

