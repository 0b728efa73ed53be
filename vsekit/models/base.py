"""What every encoder declares, so that the model, the trainer and the objective never probe for methods."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from vsekit.errors import ConfigError
from vsekit.models.layers import l2norm
from vsekit.utils.freeze import Freezer


class Encoder(nn.Module):
    """An image or text encoder into the joint space.

    ``forward(x) = finish(forward_features(x))``: :meth:`forward_features` is the vector before the final
    normalisation (what an instance classifier sees), :meth:`finish` the normalisation (L2, optional abs).
    An encoder with a pretrained part that may stay fixed names it in :attr:`finetune_scope`;
    :meth:`set_finetune` freezes or unfreezes it (no gradients, batch norm in eval mode).

    A text encoder with its own tokenizer (e.g. BERT's word pieces) defines
    ``tokenize(caption: str, max_len: int | None) -> list[int]``; the training run and the Embedder then use
    it instead of vsekit's vocabulary. Id 0 must be its padding (token batches are padded with 0).
    """

    #: the sub-module frozen while the encoder is not fine-tuned (e.g. a CNN backbone); None: none
    finetune_scope: ClassVar[str | None] = None
    #: image encoders over precomputed features get their input size from the data set
    reads_features: ClassVar[bool] = False
    #: the embedding is this many equal parts, one per level (GXN's two-level encoders: 2)
    levels: ClassVar[int] = 1
    #: a text encoder's own tokenizer, ``tokenize(caption, max_len) -> ids`` (a method); None: the vocabulary's
    tokenize: Callable[[str, int | None], list[int]] | None = None
    #: :meth:`finish`: L2 (an encoder's ``no_imgnorm`` / ``no_txtnorm`` turn it off), then abs()
    normalize: bool = False
    use_abs: bool = False
    #: keep the batch norm of :attr:`finetune_scope` in eval mode while it learns (its running statistics fixed,
    #: its affine weights trained): mmdetection's ``norm_eval``
    norm_eval: bool = False

    def __init__(self) -> None:
        super().__init__()
        self.finetune = True
        self._freezer = Freezer()

    @classmethod
    def reads_features_of(cls, spec: dict[str, Any]) -> bool:
        """Whether the encoder ``spec`` (its config section) builds reads precomputed features (a wrapper
        encoder asks its inner one)."""
        return cls.reads_features

    def forward_features(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The feature before :meth:`finish`; an encoder defines this or :meth:`forward_parts`."""
        if type(self).forward_parts is Encoder.forward_parts:
            raise NotImplementedError
        return self.forward_parts(*inputs)[0]

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            x = l2norm(x)
        return x.abs() if self.use_abs else x

    def forward_parts(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(feature before :meth:`finish`, context) from one pass. The context is what a term that looks
        inside the encoder needs, e.g. the (B, R, D) reasoned regions a caption decoder attends to, or the
        (B, T, D) word features of a local-alignment similarity; ``None`` when the encoder has none."""
        return self.forward_features(*inputs), None

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.finish(self.forward_features(*inputs))

    def set_finetune(self, finetune: bool) -> None:
        """Train (``True``) or freeze (``False``) :attr:`finetune_scope`."""
        finetune = bool(finetune)
        if self.finetune_scope is None:
            if not finetune:
                raise ConfigError(f"{type(self).__name__} has no pretrained part to keep fixed (finetune: false); "
                                  "freeze parameters by name with train.freeze instead")
            return
        self.finetune = finetune
        if finetune:
            self._freezer.release()
        else:
            self._freezer.freeze([self.finetune_scope], self.named_parameters(), self.named_modules(),
                                 what=f"{type(self).__name__}.finetune_scope")
        self.train(self.training)

    def train(self, mode: bool = True) -> Encoder:
        super().train(mode)
        self._freezer.hold_eval()
        if mode and self.norm_eval and self.finetune_scope:
            for m in self.get_submodule(self.finetune_scope).modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self
