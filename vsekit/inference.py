"""Using a trained model: load a checkpoint, embed images and captions.

Search and evaluation use this module; it imports nothing from the training code.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from vsekit.checkpoint import CheckpointError, load_checkpoint, model_fingerprint
from vsekit.data.corpus import Corpus
from vsekit.data.datasets import (
    CaptionDataset,
    ImageDataset,
    ImageSource,
    collate_captions,
    collate_images,
)
from vsekit.models.vse import VSEModel, build_model
from vsekit.text.vocab import Vocabulary
from vsekit.utils.device import resolve_device


def _progress(iterable, enabled: bool, desc: str, total: int | None = None):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False)


class Embedder:
    """A model plus what it needs to turn raw inputs into joint-space embeddings."""

    def __init__(self, model: VSEModel, vocab: Vocabulary, config: dict[str, Any],
                 device: str | torch.device = "auto", fingerprint: str | None = None) -> None:
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.vocab, self.config = vocab, config
        self.max_len = config.get("text", {}).get("max_len")
        self._fingerprint = fingerprint

    @property
    def fingerprint(self) -> str:
        """Hash of the model weights (computed once, on first use)."""
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model.state_dict())
        return self._fingerprint

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "auto") -> Embedder:
        state = load_checkpoint(path)
        vocab = Vocabulary.from_dict(state["vocab"])
        config = state["config"]
        model = build_model(config["model"], vocab_size=len(vocab), itos=None,
                            feature_shape=tuple(state["feature_shape"]) if state.get("feature_shape") else None)
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as e:
            raise CheckpointError(f"{state['path']}: its weights do not fit the model its config describes "
                                  f"(saved by another vsekit version?): {str(e).splitlines()[0]}") from None
        emb = cls(model, vocab, config, device, fingerprint=state.get("fingerprint"))
        emb.checkpoint_path = state["path"]
        emb.feature_shape = state.get("feature_shape")
        return emb

    @property
    def similarity(self) -> str:
        return self.model.similarity_name

    def encode_tokens(self, caption: str) -> list[int]:
        return self.vocab.encode(caption, self.max_len)

    def eval_transform(self):
        from vsekit.data.images import build_transform

        d = self.config.get("data", {})
        return build_transform(train=False, image_size=int(d.get("image_size", 224)), resize=d.get("resize"),
                               resize_policy=d.get("resize_policy", "short_side"))

    @torch.no_grad()
    def encode_captions(self, captions: Sequence[str], batch_size: int = 256, progress: bool = False) -> np.ndarray:
        """(M, D) float32 embeddings of caption strings, in input order."""
        loader = DataLoader(CaptionDataset(captions, self.encode_tokens), batch_size=batch_size,
                            collate_fn=collate_captions)
        out = np.zeros((len(captions), self._dim()), dtype=np.float32)
        for tok, lengths, idx in _progress(loader, progress, "captions"):
            out[idx.numpy()] = self.model.encode_captions(tok.to(self.device), lengths).float().cpu().numpy()
        return out

    @torch.no_grad()
    def encode_corpus_images(self, corpus: Corpus, batch_size: int = 128, num_workers: int = 0,
                             progress: bool = False, rows: Sequence[int] | None = None) -> np.ndarray:
        """(N, D) embeddings of the corpus's images (each image once), in row order."""
        source = ImageSource(corpus, None if corpus.is_precomputed else self.eval_transform())
        ds = ImageDataset(source, rows)
        loader = DataLoader(ds, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_images)
        out = np.zeros((len(ds), self._dim()), dtype=np.float32)
        for images, idx in _progress(loader, progress, "images"):
            out[idx.numpy()] = self.model.encode_images(images.to(self.device)).float().cpu().numpy()
        return out

    @torch.no_grad()
    def encode_pil_images(self, images: Sequence, batch_size: int = 64) -> np.ndarray:
        """Embeddings of PIL images (already RGB); raw-image models only."""
        if self.feature_shape:
            raise ValueError("this model reads precomputed features; it cannot embed raw images")
        tf = self.eval_transform()
        outs = []
        for a in range(0, len(images), batch_size):
            batch = torch.stack([tf(im) for im in images[a: a + batch_size]]).to(self.device)
            outs.append(self.model.encode_images(batch).float().cpu().numpy())
        return np.concatenate(outs) if outs else np.zeros((0, self._dim()), dtype=np.float32)

    def encode_corpus(self, corpus: Corpus, batch_size: int = 128, progress: bool = False):
        return (self.encode_corpus_images(corpus, batch_size, progress=progress),
                self.encode_captions(corpus.captions, batch_size, progress=progress))

    feature_shape: list[int] | None = None

    def _dim(self) -> int:
        return int(self.config["model"].get("embed_size", 1024))
