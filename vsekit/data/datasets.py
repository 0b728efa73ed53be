"""Torch datasets over a :class:`Corpus`: training pairs, and images / captions for encoding.

Images are encoded once per image (never once per caption); captions are encoded separately.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from vsekit.data.corpus import Corpus


class ImageSource:
    """Row -> image tensor: a decoded + transformed raw image, or a row of precomputed features."""

    def __init__(self, corpus: Corpus, transform: Callable | None = None) -> None:
        self.corpus = corpus
        self.transform = transform
        if not corpus.is_precomputed and transform is None:
            raise ValueError("raw images need a transform")
        self._load = None
        if not corpus.is_precomputed:
            from vsekit.data.images import load_rgb  # lazily: precomputed-only users never need PIL

            self._load = load_rgb

    def __call__(self, row: int) -> torch.Tensor:
        c = self.corpus
        if c.features is not None:
            return torch.from_numpy(np.array(c.features[row], dtype=np.float32))
        return self.transform(self._load(c.image_paths[row]))


class PairDataset(Dataset):
    """Item k = one (image, caption) training pair.

    ``sample="caption"`` (VSE++): one item per caption, so an epoch visits every caption once.
    ``sample="image"``: one item per image, with one of its captions drawn at random each epoch
    (call :meth:`set_epoch`), as the Dual-Path and instance-loss recipes do.
    """

    def __init__(self, corpus: Corpus, encode: Callable[[str], list[int]], image_source: ImageSource,
                 sample: str = "caption", seed: int = 0) -> None:
        if sample not in ("caption", "image"):
            raise ValueError(f"data.sample must be 'caption' or 'image', got {sample!r}")
        self.corpus, self.encode, self.images = corpus, encode, image_source
        self.sample, self.seed = sample, seed
        order = np.argsort(corpus.caption_to_image, kind="stable")
        counts = corpus.captions_per_image()
        self._caps_of = np.split(order, np.cumsum(counts)[:-1])
        self._trainable = np.flatnonzero(counts > 0)
        self._pick = None
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        if self.sample == "image":
            rng = np.random.default_rng([self.seed, epoch, 17])
            self._pick = np.array([caps[rng.integers(len(caps))] for caps in
                                   (self._caps_of[i] for i in self._trainable)], dtype=np.int64)

    def __len__(self) -> int:
        return self.corpus.num_captions if self.sample == "caption" else len(self._trainable)

    def caption_index(self, k: int) -> int:
        return int(k) if self.sample == "caption" else int(self._pick[k])

    def __getitem__(self, k: int):
        j = self.caption_index(k)
        row = int(self.corpus.caption_to_image[j])
        return self.images(row), torch.tensor(self.encode(self.corpus.captions[j])), row, j


class CaptionPool:
    """Random training captions, tokenised, with the row of their image: candidates for negative mining.

    Sampling uses the global torch RNG, so a seeded run draws the same pools, and a resumed run (whose
    checkpoint restores the RNG) continues with the pools an uninterrupted run would have drawn.
    """

    def __init__(self, corpus: Corpus, encode: Callable[[str], list[int]]) -> None:
        if corpus.num_captions == 0:
            raise ValueError(f"{corpus.name}: no captions to draw negatives from")
        self.corpus, self.encode = corpus, encode
        self._image_of = torch.from_numpy(np.asarray(corpus.caption_to_image, dtype=np.int64))

    def __len__(self) -> int:
        return self.corpus.num_captions

    def sample(self, n: int) -> torch.Tensor:
        """``n`` caption indices drawn uniformly with replacement."""
        return torch.randint(self.corpus.num_captions, (int(n),))

    def tokens(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded token ids (n, T) and lengths (n,) of the captions ``idx``."""
        return pad_tokens([torch.tensor(self.encode(self.corpus.captions[int(j)])) for j in idx])

    def image_ids(self, idx: torch.Tensor) -> torch.Tensor:
        """(n,) image row of each caption."""
        return self._image_of[idx.cpu()]


class ImageDataset(Dataset):
    """Item i = (image tensor, i) for every image row of the corpus (or the given rows)."""

    def __init__(self, image_source: ImageSource, rows: Sequence[int] | None = None) -> None:
        self.images = image_source
        self.rows = list(range(image_source.corpus.num_images)) if rows is None else list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        return self.images(self.rows[i]), i


class CaptionDataset(Dataset):
    """Item j = (token ids, j) for a list of caption strings."""

    def __init__(self, captions: Sequence[str], encode: Callable[[str], list[int]]) -> None:
        self.captions, self.encode = captions, encode

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, j: int):
        return torch.tensor(self.encode(self.captions[j])), j


def pad_tokens(seqs: Sequence[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    out = torch.full((len(seqs), int(lengths.max())), pad_id, dtype=torch.long)
    for k, s in enumerate(seqs):
        out[k, : len(s)] = s
    return out, lengths


def collate_pairs(batch):
    images, tokens, rows, caps = zip(*batch)
    tok, lengths = pad_tokens(tokens)
    return {"images": torch.stack(images), "tokens": tok, "lengths": lengths,
            "image_rows": torch.tensor(rows, dtype=torch.long), "caption_idx": torch.tensor(caps, dtype=torch.long)}


def collate_images(batch):
    images, idx = zip(*batch)
    return torch.stack(images), torch.tensor(idx, dtype=torch.long)


def collate_captions(batch):
    tokens, idx = zip(*batch)
    tok, lengths = pad_tokens(tokens)
    return tok, lengths, torch.tensor(idx, dtype=torch.long)


class EpochSampler(Sampler[int]):
    """A permutation that depends only on (seed, epoch), starting at position ``start``.

    Resuming mid-epoch recreates the same permutation and skips the batches already done, so a resumed
    run sees exactly the batches an uninterrupted one would.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch, self.start = n, seed, 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def permutation(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)

    def __iter__(self):
        return iter(self.permutation()[self.start:].tolist())

    def __len__(self) -> int:
        return self.n - self.start
