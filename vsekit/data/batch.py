"""One training batch, from the collate function to every objective term.

The collate fills it (:func:`vsekit.data.datasets.collate_pairs`), the trainer moves it to the device
(:meth:`Batch.to`), a term that needs more than the pairs adds to it before the forward pass (mined negatives),
and under torchrun the in-batch terms read :meth:`Batch.gather`'s global copy, as one process would.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from vsekit.utils import distributed


def text_to(text: tuple[Tensor, ...], device: torch.device | str) -> tuple[Tensor, ...]:
    """Text inputs on ``device``; the lengths of a token batch stay on the CPU (packing needs them there)."""
    if len(text) == 2:
        return text[0].to(device, non_blocking=True), text[1]
    return tuple(t.to(device, non_blocking=True) for t in text)


@dataclass
class MinedNegatives:
    """One mined caption per anchor: its text inputs (tokens (B, T) and lengths (B,), or features (B, D)), its
    image id (B,), and whether it is usable."""

    text: tuple[Tensor, ...]
    image_ids: Tensor
    valid: Tensor


@dataclass
class Batch:
    """B training pairs: the model's image input (pixels or features; None when every image of the batch was
    unreadable), the text inputs ((tokens (B, T), lengths (B,)) or (features,)), the training-corpus row of
    each image (the instance labels), the caption index of each pair, the images' class labels and the
    captions' LSA vectors when the run has them, the messages of pairs left out for an unreadable image, and
    the mined negatives once a term has mined them."""

    images: Tensor | None
    text: tuple[Tensor, ...]
    image_ids: Tensor
    caption_idx: Tensor | None = None
    labels: Tensor | None = None
    caption_vectors: Tensor | None = None
    skipped: list[str] = field(default_factory=list)
    negatives: MinedNegatives | None = None

    def __len__(self) -> int:
        return len(self.image_ids)

    def _map(self, fn: Callable[[Tensor], Tensor]) -> Batch:
        opt = lambda t: None if t is None else fn(t)  # noqa: E731
        return replace(self, images=opt(self.images), image_ids=fn(self.image_ids), labels=opt(self.labels),
                       caption_vectors=opt(self.caption_vectors))

    def to(self, device: torch.device | str) -> Batch:
        """The batch on ``device`` (token lengths and caption indices stay on the CPU)."""
        out = self._map(lambda t: t.to(device, non_blocking=True))
        return replace(out, text=text_to(self.text, device))

    def pin_memory(self) -> Batch:
        """Page-locked copies, for a DataLoader with ``pin_memory`` (it calls this)."""
        return replace(self._map(Tensor.pin_memory), text=tuple(t.pin_memory() for t in self.text))

    def gather(self) -> Batch:
        """The global batch of a distributed step: every process's ids, labels, caption vectors and mined
        negatives' ids, in rank order (one process: itself). Pixels and token inputs stay with their process
        (None here); a term that reads them reads its own process's batch."""
        if not distributed.world().distributed:
            return self
        g = lambda t: None if t is None else distributed.all_gather(t)  # noqa: E731
        neg = self.negatives
        if neg is not None:
            neg = replace(neg, image_ids=g(neg.image_ids), valid=g(neg.valid))
        return replace(self, images=None, text=(), image_ids=g(self.image_ids), caption_idx=None,
                       labels=g(self.labels), caption_vectors=g(self.caption_vectors), negatives=neg)
