"""Torch datasets over a :class:`Corpus`: training pairs, and images / captions for encoding.

Images are encoded once per image (never once per caption); captions are encoded separately.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler, get_worker_info
from torchvision import transforms

from vsekit.data.batch import Batch, text_to  # noqa: F401 - text_to: also imported from here
from vsekit.data.corpus import Corpus
from vsekit.data.images import ImageLoadError


class ImageSource:
    """Row -> image tensor: a decoded + transformed raw image, or a row of precomputed features.

    ``cache_bytes`` > 0: the output of the transform's deterministic prefix (decode, resize, centre crop) is
    kept in memory as uint8 pixels, up to that many bytes, so later epochs only run the random augmentations
    and the tensor conversion -- the same PIL operations on the same pixels, hence the same tensors as
    without the cache. The cache lives in the main process (``data.num_workers: 0``, the default): loader
    workers start afresh every epoch, so they keep nothing (each one's copy would grow to ``cache_bytes`` and be
    thrown away at the epoch's end).
    """

    def __init__(self, corpus: Corpus, transform: Callable | None = None, cache_bytes: int = 0) -> None:
        self.corpus = corpus
        self.transform = transform
        if not corpus.is_precomputed and transform is None:
            raise ValueError("raw images need a transform")
        self._load = self._prefix = self._rest = None
        self._cache: dict[int, np.ndarray] = {}
        self._cache_left = 0
        if not corpus.is_precomputed:
            from vsekit.data.images import (  # lazily: precomputed-only users never need PIL
                applies_exif,
                load_rgb,
                pixels_transform,
                split_deterministic,
            )

            # one loading policy: a folder/pairs image is read exactly as a search query of the same file
            self._load = functools.partial(load_rgb, exif_transpose=applies_exif(corpus.meta))
            if cache_bytes > 0 and isinstance(transform, transforms.Compose):
                self._prefix, self._rest = split_deterministic(transform)
                self._cache_left = int(cache_bytes)
                self._from_pixels = pixels_transform(self._rest)  # None: the PIL path

    def __call__(self, row: int) -> torch.Tensor:
        c = self.corpus
        if c.features is not None:
            return torch.from_numpy(np.array(c.features[row], dtype=np.float32))
        if self._prefix is None:
            return self.transform(self._load(c.image_paths[row]))
        pixels = self._cache.get(row)
        if pixels is not None:
            return self._from_pixels(pixels) if self._from_pixels else self._rest(Image.fromarray(pixels))
        image = self._prefix(self._load(c.image_paths[row]))
        pixels = np.array(image)  # writable: torch.from_numpy warns on read-only arrays
        # a loader worker's copy of the cache would die with the worker at the epoch's end: keep none there
        if pixels.nbytes <= self._cache_left and get_worker_info() is None:
            self._cache[row] = pixels
            self._cache_left -= pixels.nbytes
        return self._from_pixels(pixels) if self._from_pixels else self._rest(image)

    @property
    def cached_images(self) -> int:
        """How many images the decoded-image cache holds."""
        return len(self._cache)


class TextSource:
    """Caption index -> text input: token ids (a 1-D long tensor) of the caption string, or the caption's row
    of precomputed text features (a 1-D float tensor) when the corpus ships text as vectors."""

    def __init__(self, corpus: Corpus, encode: Callable[[str], list[int]] | None = None) -> None:
        self.corpus, self.encode = corpus, encode
        if corpus.caption_features is None and encode is None:
            raise ValueError("captions as text need an encode function (a vocabulary)")

    @property
    def reads_features(self) -> bool:
        return self.corpus.caption_features is not None

    def __call__(self, j: int) -> torch.Tensor:
        if self.corpus.caption_features is not None:
            return torch.from_numpy(np.array(self.corpus.caption_features[j], dtype=np.float32))
        return torch.tensor(self.encode(self.corpus.captions[j]))


class PairDataset(Dataset):
    """Item k = one (image, caption) training pair.

    ``sample="caption"`` (VSE++): one item per caption, so an epoch visits every caption once.
    ``sample="image"``: one item per image, with one of its captions drawn at random each epoch
    (call :meth:`set_epoch`), as the Dual-Path and instance-loss recipes do.
    """

    def __init__(self, corpus: Corpus, text: TextSource, image_source: ImageSource,
                 sample: str = "caption", seed: int = 0, skip_unreadable: bool = False, *,
                 labels: torch.Tensor | None = None, caption_vectors: torch.Tensor | None = None) -> None:
        if sample not in ("caption", "image"):
            raise ValueError(f"data.sample must be 'caption' or 'image', got {sample!r}")
        self.corpus, self.text, self.images = corpus, text, image_source
        self.skip_unreadable = bool(skip_unreadable)
        # row-indexed class labels and caption-indexed LSA vectors, when a term reads them (see collate)
        self.labels, self.caption_vectors = labels, caption_vectors
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
        try:
            image = self.images(row)
        except ImageLoadError as e:
            if not self.skip_unreadable:
                raise
            return Skipped(str(e))  # data.skip_missing_images: dropped from the batch, counted, logged
        return image, self.text(j), row, j

    def collate(self, items: list) -> Batch:
        """:func:`collate_pairs` with this dataset's labels and caption vectors (a DataLoader's collate_fn)."""
        return collate_pairs(items, labels=self.labels, caption_vectors=self.caption_vectors)


class Skipped(str):
    """A training pair left out because its image could not be decoded (the message says which and why)."""


class CaptionPool:
    """Random training captions, tokenised, with the row of their image: candidates for negative mining.

    Sampling uses the global torch RNG, so a seeded run draws the same pools, and a resumed run (whose
    checkpoint restores the RNG) continues with the pools an uninterrupted run would have drawn.
    """

    def __init__(self, corpus: Corpus, text: TextSource) -> None:
        if corpus.num_captions == 0:
            raise ValueError(f"{corpus.name}: no captions to draw negatives from")
        self.corpus, self.source = corpus, text
        self._image_of = torch.from_numpy(np.asarray(corpus.caption_to_image, dtype=np.int64))

    def __len__(self) -> int:
        return self.corpus.num_captions

    def sample(self, n: int) -> torch.Tensor:
        """``n`` caption indices drawn uniformly with replacement."""
        return torch.randint(self.corpus.num_captions, (int(n),))

    def text(self, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The text inputs of the captions ``idx``: (tokens (n, T), lengths (n,)) or (features (n, D),)."""
        return collate_text([self.source(int(j)) for j in idx])

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
    """Item j = (text input, j): token ids of caption string j, or (``text``) row j of a :class:`TextSource`."""

    def __init__(self, captions: Sequence[str] | None = None, encode: Callable[[str], list[int]] | None = None,
                 *, text: TextSource | None = None) -> None:
        if (captions is None) == (text is None):
            raise ValueError("give either caption strings (with encode) or a TextSource")
        self.captions, self.encode, self.text = captions, encode, text

    def __len__(self) -> int:
        return len(self.captions) if self.captions is not None else self.text.corpus.num_captions

    def __getitem__(self, j: int):
        if self.text is not None:
            return self.text(j), j
        return torch.tensor(self.encode(self.captions[j])), j


def pad_tokens(seqs: Sequence[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    out = torch.full((len(seqs), int(lengths.max())), pad_id, dtype=torch.long)
    for k, s in enumerate(seqs):
        out[k, : len(s)] = s
    return out, lengths


def collate_text(items: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """A batch of text inputs: token-id sequences -> (padded tokens, lengths); feature rows -> (stacked,)."""
    if items and items[0].is_floating_point():
        return (torch.stack(list(items)),)
    return pad_tokens(items)


def collate_pairs(batch, *, labels: torch.Tensor | None = None,
                  caption_vectors: torch.Tensor | None = None) -> Batch:
    """A training :class:`Batch` of (image, text, row, caption index) items, with the rows' ``labels`` and the
    captions' ``caption_vectors`` when given; pairs :class:`Skipped` for an unreadable image are left out and
    listed under ``skipped`` (``images`` is None when every pair of the batch was skipped)."""
    skipped = [item for item in batch if isinstance(item, Skipped)]
    batch = [item for item in batch if not isinstance(item, Skipped)]
    if not batch:
        return Batch(None, (), torch.zeros(0, dtype=torch.long), skipped=skipped)
    images, texts, rows, caps = zip(*batch)
    rows, caps = torch.tensor(rows, dtype=torch.long), torch.tensor(caps, dtype=torch.long)
    return Batch(torch.stack(images), collate_text(texts), rows, caps, skipped=skipped,
                 labels=labels[rows] if labels is not None else None,
                 caption_vectors=caption_vectors[caps] if caption_vectors is not None else None)


def collate_images(batch):
    images, idx = zip(*batch)
    return torch.stack(images), torch.tensor(idx, dtype=torch.long)


def collate_captions(batch):
    """(text inputs tuple, indices) of a batch of :class:`CaptionDataset` items."""
    texts, idx = zip(*batch)
    return collate_text(texts), torch.tensor(idx, dtype=torch.long)


class EpochSampler(Sampler[int]):
    """A permutation that depends only on (seed, epoch), starting at position ``start``.

    Resuming mid-epoch recreates the same permutation and skips the batches already done, so a resumed
    run sees exactly the batches an uninterrupted one would.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch, self.start = n, seed, 0, 0
        self.rank, self.world, self.local_batch = 0, 1, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def shard(self, rank: int, world: int, local_batch: int) -> None:
        """Yield only process ``rank``'s part of each global batch of ``world * local_batch`` samples (a
        distributed run): its ``local_batch`` slice, and of a last, shorter batch a near-equal share, so the
        processes' batches put together are the one-process batches, in order. ``start`` stays a position in
        the global order, so a resume may change the number of processes."""
        self.rank, self.world, self.local_batch = int(rank), int(world), int(local_batch)

    def permutation(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)

    def _indices(self) -> np.ndarray:
        order = self.permutation()[self.start:]
        if self.world == 1:
            return order
        g = self.world * self.local_batch
        full = len(order) // g * g
        mine = order[:full].reshape(-1, self.world, self.local_batch)[:, self.rank].reshape(-1)
        tail = order[full:]
        if len(tail) < self.world:  # too short to give every process a sample: dropped (see num_batches)
            tail = tail[:0]
        bounds = np.linspace(0, len(tail), self.world + 1).round().astype(np.int64)
        return np.concatenate([mine, tail[bounds[self.rank]: bounds[self.rank + 1]]])

    def num_batches(self, batch_size: int) -> int:
        """Global batches in a whole epoch (``batch_size`` = the global batch)."""
        if self.world == 1:
            return -(-self.n // batch_size)
        return self.n // batch_size + (1 if self.n % batch_size >= self.world else 0)

    def __iter__(self):
        return iter(self._indices().tolist())

    def __len__(self) -> int:
        return len(self._indices()) if self.world > 1 else self.n - self.start
