"""Using a trained text-to-image GAN (GXN's "imagine" path): captions in, sampled 64 x 64 images out.

The generator, its conditioning augmentation and the text encoder come from one checkpoint: the GAN is
rebuilt from the options of ``objective.terms.gan`` in the checkpoint's config and loaded from its
``objective`` weights. Like :mod:`vsekit.inference` this imports nothing from the training code.

Whether the images depend on the text (:meth:`Imaginer.r_precision`, AttnGAN's R-precision with R = 1): the
checkpoint's own matching model scores each generated image against its generating caption and 99 random
captions of other images; chance is 1 %.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vsekit.checkpoint import CheckpointError, load_checkpoint
from vsekit.config import RunConfig
from vsekit.data.corpus import Corpus
from vsekit.eval.generative import distractor_rows, r_precision
from vsekit.inference import Embedder, first_stage_with_term, trained_term
from vsekit.losses.gan import TextToImageGAN

TERM = "gan"
MAX_TEXTS = 32  # rows of one grid
MAX_SAMPLES = 64  # images per text


def _first_gan_stage(config: RunConfig, where: str) -> tuple[RunConfig, int, str]:
    """(config, first epoch, name) of the first training stage that gives the GAN a weight."""
    first = first_stage_with_term(config, TERM)
    if first is None:
        raise CheckpointError(f"{where}: this model was trained without a text-to-image GAN (objective.terms.gan "
                              "has no weight in any stage of its config), so it cannot imagine images; train a "
                              "recipe with the gan term, e.g. gxn_demo")
    return first


def gan_from_state(state: dict[str, Any], config: RunConfig) -> TextToImageGAN:
    """The GAN term of a loaded checkpoint, with its trained weights. A checkpoint saved before the GAN's first
    training step (``best.pt`` of a run whose retrieval peaked in the warm-up) is refused: its generator is
    the untrained one."""
    where = state.get("path", "the checkpoint")
    stage_config, start, stage = _first_gan_stage(config, where)
    epoch, batches = int(state.get("epoch", 0)), int(state.get("batches_done", 0))
    if epoch < start or (epoch == start and batches == 0):
        raise CheckpointError(f"{where}: saved after {epoch} epoch{'s' if epoch != 1 else ''}, before the GAN started training (stage "
                              f"{stage!r}, from epoch {start + 1}): its generator is untrained. Use a checkpoint "
                              "of a later epoch (last.pt)")
    return trained_term(state, TERM, stage_config, "GAN", embed_size=config.model.embed_size, vocab=None,
                        corpus=None, feature_shape=None)


class Imaginer:
    """A text encoder and a GAN generator from one checkpoint: :meth:`generate` samples images for captions."""

    def __init__(self, embedder: Embedder, gan: TextToImageGAN) -> None:
        self.embedder = embedder
        self.device = embedder.device
        self.gan = gan.to(self.device).eval()  # batch norm with its running statistics

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "auto") -> Imaginer:
        state = load_checkpoint(path)
        embedder = Embedder.from_state(state, device)
        return cls(embedder, gan_from_state(state, embedder.config))

    @property
    def image_size(self) -> int:
        return self.gan.image_size

    @torch.no_grad()
    def generate(self, texts: Sequence[str], n: int = 8, seed: int = 0) -> torch.Tensor:
        """(len(texts), n, 3, S, S) images in [0, 1] on the CPU: for each text, n draws of the conditioning
        augmentation's ε and of z, from a generator seeded with ``seed`` (the same call gives the same images)."""
        texts = list(texts)
        if not 1 <= len(texts) <= MAX_TEXTS:
            raise ValueError(f"give 1 to {MAX_TEXTS} texts, got {len(texts)}")
        if not 1 <= n <= MAX_SAMPLES:
            raise ValueError(f"n (images per text) must be in 1..{MAX_SAMPLES}, got {n}")
        return self._draw(self.embedder.encode_texts(texts), n, seed)

    def _draw(self, caption_emb: np.ndarray, n: int, seed: int) -> torch.Tensor:
        """(len(caption_emb), n, 3, S, S) images in [0, 1] on the CPU for caption embeddings."""
        t = self.gan.condition_of(torch.from_numpy(caption_emb).to(self.device)).repeat_interleave(n, dim=0)
        g = torch.Generator().manual_seed(int(seed))  # on the CPU: the same draws on every device
        z = torch.randn(t.shape[0], self.gan.z_dim, generator=g).to(self.device)
        eps = torch.randn(t.shape[0], self.gan.augment.c_dim, generator=g).to(self.device)
        images, _, _ = self.gan.generate(t, z, eps)
        s = self.image_size
        return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0).view(len(caption_emb), n, 3, s, s).cpu()

    @torch.no_grad()
    def r_precision(self, corpus: Corpus, distractors: int = 99, seed: int = 0) -> dict[str, float]:
        """AttnGAN's R-precision (R = 1) through this checkpoint's matching model: one image generated from the
        first caption of each captioned image of ``corpus``, embedded by the model's image encoder (as an image
        file would be: the evaluation transform of the PIL image), and scored against that caption and
        ``distractors`` random captions of other images. ``r_precision``: the share ranked first; ``chance``."""
        from PIL import Image

        owners = corpus.caption_to_image
        rows, first = np.unique(owners, return_index=True)
        cap_emb = self.embedder.encode_texts(corpus)
        pil = [Image.fromarray(im) for im in self._first_caption_images(cap_emb, owners, seed)]
        gen = self.embedder.encode_images(pil)
        scores = self.embedder.score(gen, cap_emb)  # (generated images, captions)
        others = distractor_rows(np.searchsorted(rows, owners), distractors, len(rows), seed)
        cols = np.concatenate([first[:, None], others], axis=1)
        picked = np.take_along_axis(scores, cols, axis=1)
        return {"r_precision": r_precision(picked), "chance": 1.0 / (distractors + 1), "num_images": int(len(rows))}

    @torch.no_grad()
    def first_caption_images(self, corpus: Corpus, seed: int = 0) -> np.ndarray:
        """(N, S, S, 3) uint8 images, one generated from the first caption of each captioned image of ``corpus``
        (in row order; the images :meth:`r_precision` scores)."""
        return self._first_caption_images(self.embedder.encode_texts(corpus), corpus.caption_to_image, seed)

    def _first_caption_images(self, cap_emb: np.ndarray, owners: np.ndarray, seed: int) -> np.ndarray:
        _, first = np.unique(owners, return_index=True)  # each captioned image's first caption
        images = self._draw(cap_emb[first], 1, seed)[:, 0]
        return (images.permute(0, 2, 3, 1).numpy() * 255.0).round().astype(np.uint8)


def image_grid(images: torch.Tensor, pad: int = 2):
    """A PIL image of a (rows, cols, 3, S, S) batch in [0, 1]: one row per text, ``pad`` black pixels
    around and between the cells; (cols·(S + pad) + pad) x (rows·(S + pad) + pad) pixels."""
    from PIL import Image

    rows, cols, _, s, _ = images.shape
    pixels = (images.permute(0, 1, 3, 4, 2).numpy() * 255.0).round().astype(np.uint8)  # (rows, cols, S, S, 3)
    cells = np.pad(pixels, ((0, 0), (0, 0), (0, pad), (0, pad), (0, 0)))  # each cell with its right/bottom border
    step = s + pad
    canvas = cells.transpose(0, 2, 1, 3, 4).reshape(rows * step, cols * step, 3)
    return Image.fromarray(np.pad(canvas, ((pad, 0), (pad, 0), (0, 0))))
