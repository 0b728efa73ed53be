"""The outputs of a fixed pretrained part, kept per input for the length of a training run.

A frozen BERT gives a caption the same token outputs every epoch, and a frozen CNN gives an image the same
pooled vector as long as the image reaches it unchanged (no random crops or colour jitter): computing them again
every epoch is most of a CPU run's time. :class:`FrozenOutputs` is the mixin of an encoder with such a part
(:attr:`~vsekit.models.base.Encoder.finetune_scope`): while the part is frozen, the encoder asks
:meth:`FrozenOutputs.cached` for its outputs and the part runs only on inputs not seen before.

The cache belongs to a training run: it starts with the first training step (a model only ever in eval mode,
an index or a server, keeps nothing), validation reads it once training has filled it, and it is emptied when
the part is unfrozen or the encoder's weights are loaded. It never holds more than ``cache_mb`` MiB; once full,
inputs not in it are computed every time.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import torch

from vsekit.errors import ConfigError


def content_keys(x: torch.Tensor) -> list[bytes]:
    """A key per row of ``x`` from its bytes, shape and dtype (a 128-bit BLAKE2b digest: ~1 ms per 224-px
    image, against tens of milliseconds for a CNN's forward pass on it)."""
    rows = x.detach().cpu().contiguous()
    head = f"{rows.dtype}{tuple(rows.shape[1:])}".encode()
    flat = rows.reshape(rows.shape[0], -1)
    if flat.dtype == torch.bfloat16:  # numpy has no bfloat16: hash the same bits as int16
        flat = flat.view(torch.int16)
    data = flat.numpy()
    return [hashlib.blake2b(head + data[i].tobytes(), digest_size=16).digest() for i in range(data.shape[0])]


class FrozenOutputs:
    """Mixin (before :class:`~vsekit.models.base.Encoder`) for an encoder whose fixed part's outputs are
    kept per input. Call :meth:`init_frozen_cache` in ``__init__`` before ``set_finetune``."""

    def init_frozen_cache(self, cache_mb: float, where: str) -> None:
        if not cache_mb >= 0:
            raise ConfigError(f"{where}.cache_mb: {cache_mb} MiB; must be >= 0 (0: no cache)")
        self.cache_bytes = int(cache_mb * 2**20)
        self._cache: dict[bytes, torch.Tensor] = {}  # an input's key -> the fixed part's output for it
        self._cached = 0  # bytes held
        self.register_load_state_dict_post_hook(lambda module, keys: module.clear_cache())

    def set_finetune(self, finetune: bool) -> None:
        super().set_finetune(finetune)
        self.clear_cache()

    def clear_cache(self) -> None:
        self._cache, self._cached = {}, 0

    def cache_in_use(self) -> bool:
        """Whether outputs are read from (and written to) the cache now: the part is frozen, the cache is on,
        and a training step has run or runs now (only training fills it)."""
        return (self.training or bool(self._cache)) and not self.finetune and self.cache_bytes > 0

    def cached(self, keys: Sequence[bytes], compute: Callable[[list[int]], Sequence[torch.Tensor]]) -> list[torch.Tensor]:
        """The outputs for inputs ``keys``: those seen before from the cache, the others from
        ``compute(positions)`` (their rows, in that order, computed without a graph: the part is fixed)."""
        found = {k: self._cache[k] for k in keys if k in self._cache}
        first: dict[bytes, int] = {}
        for i, k in enumerate(keys):
            if k not in found:
                first.setdefault(k, i)
        todo = list(first.values())
        if todo:  # each input not seen before, once (an image may come twice in a batch, with two captions)
            with torch.no_grad():
                fresh = compute(todo)
            for i, row in zip(todo, fresh, strict=True):
                found[keys[i]] = row
                size = row.numel() * row.element_size()
                if self._cached + size <= self.cache_bytes:  # when full, later inputs are computed every time
                    self._cache[keys[i]] = row.clone()  # not a view holding the whole batch's outputs
                    self._cached += size
        return [found[k] for k in keys]

    def frozen(self, part: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """``part(x)`` for a batch of images ``x``, each image's output from the cache while it is in use
        and the batch is on the CPU (keying a GPU batch would cost a copy to the host, and a GPU makes the
        forward pass it saves cheap)."""
        if not (self.cache_in_use() and x.device.type == "cpu"):
            return part(x)
        return torch.stack(self.cached(content_keys(x), lambda todo: part(x[todo])))
