"""Captions from a trained model: the decoder of a checkpoint's caption term, on images or data-set rows.

A run trained with ``objective.terms.caption`` saves the decoder with the objective's state
(``state["objective"]``, under ``caption.``); this module rebuilds it from the checkpoint's config, encodes
images with the checkpoint's model and decodes greedily or by beam search. Like :mod:`vsekit.inference`,
it imports nothing from the training code.

Caption quality (:meth:`Captioner.evaluate`): BLEU-1..4 (corpus) and CIDEr-D of one caption per image against
that image's references, with CIDEr-D's document frequencies taken from the references of the evaluated
split, as the COCO caption evaluation does (training uses the training references instead).

Whether the captions depend on the image (:meth:`Captioner.dependence`): the share of distinct captions, the
same scores for the nearest-neighbour captioning baseline (each image gets the first caption of its nearest
training image under this model's image embedding; a decoder that does not beat it is not using the image),
and caption -> image retrieval through the model with each generated caption as the query.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from vsekit.checkpoint import CheckpointError, load_checkpoint
from vsekit.data.corpus import Corpus
from vsekit.data.datasets import ImageDataset, ImageSource, collate_images
from vsekit.eval.generative import diagonal_recall, nearest_rows
from vsekit.inference import Embedder, EncodeError, first_stage_with_term, trained_term
from vsekit.losses.caption import CaptionTerm
from vsekit.text.caption_metrics import caption_scores, distinct_share
from vsekit.utils.progress import iterate

TERM = "caption"


class Captioner:
    """A checkpoint's model and caption decoder: image -> caption string."""

    def __init__(self, embedder: Embedder, term: CaptionTerm) -> None:
        self.embedder = embedder
        self.term = term.to(embedder.device).eval()
        self.vocab = embedder.vocab

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "auto") -> Captioner:
        state = load_checkpoint(path)
        embedder = Embedder.from_state(state, device)
        first = first_stage_with_term(embedder.config, TERM)
        if first is None:
            raise CheckpointError(f"{state['path']}: this checkpoint has no caption decoder (its run never "
                                  "switched on objective.terms.caption); train with a caption term, e.g. the "
                                  "gxn_* recipes")
        term = trained_term(state, TERM, first[0], "caption decoder", embed_size=embedder.config.model.embed_size,
                            vocab=embedder.vocab, corpus=None, feature_shape=embedder.feature_shape)
        return cls(embedder, term)

    @property
    def device(self) -> torch.device:
        return self.embedder.device

    @property
    def reads_features(self) -> bool:
        return self.embedder.reads_features

    @torch.no_grad()
    def caption_batch(self, images: torch.Tensor, *, beam_size: int = 1, max_len: int | None = None,
                      length_norm: float = 0.0) -> list[str]:
        """Captions of a batch of model inputs (pixels or feature rows)."""
        encoder = self.embedder.model.image_encoder
        feats, context = encoder.forward_parts(images.to(self.device))
        vec, ctx = self.term.image_inputs(encoder.finish(feats), feats, context)
        decoded = self.term.decoder.decode(vec, ctx, beam_size=beam_size, max_len=max_len or self.term.max_len,
                                           length_norm=length_norm)
        return [self.vocab.decode(w) for w in decoded.words(self.vocab.end_id)]

    def caption_pil_images(self, images: Sequence, *, batch_size: int = 64, **decode: Any) -> list[str]:
        """Captions of PIL images (RGB); raw-image models only."""
        if self.reads_features:
            raise EncodeError("this model reads precomputed image features; it cannot caption image files: "
                              "caption rows of a data set instead (vsekit caption CKPT --data SPEC --split test "
                              "--rows 0,1,2)")
        tf = self.embedder.eval_transform()
        out: list[str] = []
        for a in range(0, len(images), batch_size):
            out += self.caption_batch(torch.stack([tf(im) for im in images[a: a + batch_size]]), **decode)
        return out

    def caption_corpus(self, corpus: Corpus, rows: Sequence[int] | None = None, *, batch_size: int = 64,
                       progress: bool = False, **decode: Any) -> list[str]:
        """Captions of a corpus's images (``rows``, default all), in that order."""
        source = ImageSource(corpus, None if corpus.is_precomputed else self.embedder.eval_transform())
        ds = ImageDataset(source, rows)
        loader = DataLoader(ds, batch_size=batch_size, collate_fn=collate_images)
        out: list[str] = [""] * len(ds)
        for images, idx in iterate(loader, desc="captions", enabled=progress, unit="batch"):
            for i, c in zip(idx.tolist(), self.caption_batch(images, **decode)):
                out[i] = c
        return out

    def evaluate(self, corpus: Corpus, *, batch_size: int = 64, progress: bool = False,
                 **decode: Any) -> dict[str, float]:
        """BLEU-1..4 and CIDEr-D of one caption per image of ``corpus`` (images without a reference are left
        out) against the image's references; CIDEr-D's document frequencies from these references."""
        rows = captioned_rows(corpus)
        captions = self.caption_corpus(corpus, rows.tolist(), batch_size=batch_size, progress=progress, **decode)
        return reference_scores(corpus, rows, captions)

    def dependence(self, corpus: Corpus, train: Corpus, **decode: Any) -> dict[str, Any]:
        """Does the decoder read the image? On the captioned images of ``corpus``: ``distinct`` (the share of
        distinct captions), ``decoder`` (BLEU / CIDEr-D of the decoder's captions), ``nearest_neighbour`` (the
        same of the baseline that gives each image the first caption of its nearest ``train`` image by cosine of
        the model's image embeddings), ``retrieval`` (R@1/5/10 of caption -> image search through the model,
        each generated caption the query for its own image among the corpus's images)."""
        rows = captioned_rows(corpus)
        captions = self.caption_corpus(corpus, rows.tolist(), **decode)
        emb = self.embedder.encode_images(corpus, rows=rows.tolist())
        train_rows = captioned_rows(train)
        first = first_captions(train)
        nearest = nearest_rows(emb, self.embedder.encode_images(train, rows=train_rows.tolist()))
        baseline = [first[train_rows[j]] for j in nearest]
        scores = self.embedder.score(emb, self.embedder.encode_texts(captions))  # (images, captions)
        return {"num_images": int(len(rows)), "distinct": distinct_share(captions),
                "decoder": reference_scores(corpus, rows, captions),
                "nearest_neighbour": reference_scores(corpus, rows, baseline),
                "retrieval": diagonal_recall(scores.T), "examples": captions[:5]}


def captioned_rows(corpus: Corpus) -> np.ndarray:
    """The rows of the images that have at least one caption."""
    return np.flatnonzero(corpus.captions_per_image() > 0)


def first_captions(corpus: Corpus) -> dict[int, str]:
    """Each captioned image's first caption, by image row."""
    first: dict[int, str] = {}
    for caption, row in zip(corpus.captions, corpus.caption_to_image.tolist()):
        first.setdefault(row, caption)
    return first


def reference_scores(corpus: Corpus, rows: np.ndarray, captions: Sequence[str]) -> dict[str, float]:
    """BLEU-1..4 and CIDEr-D of ``captions`` (one per image of ``rows``) against those images' references."""
    refs: list[list[str]] = [[] for _ in range(corpus.num_images)]
    for caption, row in zip(corpus.captions, corpus.caption_to_image.tolist()):
        refs[row].append(caption)
    return {**caption_scores(list(captions), [refs[r] for r in rows]), "num_images": int(len(rows))}
