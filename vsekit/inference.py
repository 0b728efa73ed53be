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
from vsekit.config import RunConfig, validate_config
from vsekit.data.corpus import Corpus
from vsekit.data.datasets import (
    CaptionDataset,
    ImageDataset,
    ImageSource,
    TextSource,
    collate_captions,
    collate_images,
    text_to,
)
from vsekit.errors import ConfigError, VsekitError
from vsekit.models.vse import VSEModel, build_model
from vsekit.text.vocab import Vocabulary
from vsekit.utils.device import resolve_device
from vsekit.utils.progress import iterate


class EncodeError(VsekitError, ValueError):
    """The model cannot embed this input (raw images for a feature model, strings for a text-feature model)."""


class Embedder:
    """A model plus what it needs to turn raw inputs into joint-space embeddings: the vocabulary, the
    config (text length, image transform) and, for a model that reads precomputed features, their shape."""

    def __init__(self, model: VSEModel, vocab: Vocabulary, config: RunConfig | dict[str, Any],
                 device: str | torch.device = "auto", fingerprint: str | None = None, *,
                 feature_shape: Sequence[int] | None = None, checkpoint_path: str | None = None) -> None:
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.vocab = vocab
        self.config = validate_config(config)
        self.max_len = self.config.text.max_len
        self.feature_shape = list(feature_shape) if feature_shape else None
        self.checkpoint_path = checkpoint_path
        self._fingerprint = fingerprint

    @property
    def fingerprint(self) -> str:
        """Hash of the model weights (computed once, on first use)."""
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model.state_dict())
        return self._fingerprint

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "auto", *,
                        allow_legacy: bool = False) -> Embedder:
        """The model of a checkpoint (a ``.pt`` file or a run folder), opened without running code;
        ``allow_legacy=True`` also opens an older checkpoint that holds pickled objects (trusted files only)."""
        state = load_checkpoint(path, allow_legacy=allow_legacy)  # checks for the model, vocab and config
        return cls.from_state(state, device)

    @classmethod
    def from_state(cls, state: dict[str, Any], device: str | torch.device = "auto") -> Embedder:
        """The model of an opened checkpoint (:func:`~vsekit.checkpoint.load_checkpoint`'s dict)."""
        where = state.get("path", "the checkpoint")
        vocab = Vocabulary.from_dict(state["vocab"])
        try:
            config = validate_config(state["config"])
        except ConfigError as e:
            raise CheckpointError(f"{where}: its config is not valid for this vsekit: {e}") from None
        shape = tuple(state["feature_shape"]) if state.get("feature_shape") else None
        model = build_model(config.model, vocab_size=len(vocab), itos=None, feature_shape=shape,
                            text_feature_dim=state.get("text_feature_dim"))
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as e:
            raise CheckpointError(f"{where}: its weights do not fit the model its config describes "
                                  f"(saved by another vsekit version?): {str(e).splitlines()[0]}") from None
        return cls(model, vocab, config, device, fingerprint=state.get("fingerprint"), feature_shape=shape,
                   checkpoint_path=state.get("path"))

    @property
    def similarity(self) -> str:
        return self.model.similarity_name

    @property
    def reads_features(self) -> bool:
        """True for a model over precomputed features: it cannot embed image files."""
        return bool(self.feature_shape)

    def encode_tokens(self, caption: str) -> list[int]:
        return self.vocab.encode(caption, self.max_len)

    def eval_transform(self):
        return self.config.transform.build(train=False)

    def score(self, image_emb: torch.Tensor | np.ndarray, caption_emb: torch.Tensor | np.ndarray) -> np.ndarray:
        """(N, M) scores of images against captions by the model's own similarity."""
        img = torch.as_tensor(np.asarray(image_emb, dtype=np.float32))
        cap = torch.as_tensor(np.asarray(caption_emb, dtype=np.float32))
        with torch.no_grad():
            return self.model.similarity(img, cap).numpy()

    @property
    def reads_text_features(self) -> bool:
        """True for a model over precomputed text features: it embeds a data set's text vectors, not strings."""
        return self.model.reads_text_features

    @torch.no_grad()
    def encode_captions(self, captions: Sequence[str], batch_size: int = 256, progress: bool = False) -> np.ndarray:
        """(M, D) float32 embeddings of caption strings, in input order."""
        if self.reads_text_features:
            raise EncodeError("this model reads precomputed text features (the data set's caption_features), "
                              "not caption strings: encode a data set's captions with encode_corpus_captions")
        return self._encode_text(CaptionDataset(captions, self.encode_tokens), batch_size, progress)

    @torch.no_grad()
    def encode_corpus_captions(self, corpus: Corpus, batch_size: int = 256, progress: bool = False) -> np.ndarray:
        """(M, D) embeddings of a corpus's captions: their strings, or their precomputed text features."""
        if self.reads_text_features != corpus.has_text_features:
            have = "text feature vectors" if corpus.has_text_features else "caption strings"
            raise EncodeError(f"{corpus.name} holds {have}, which this model's text encoder does not read")
        return self._encode_text(CaptionDataset(text=TextSource(corpus, self.encode_tokens)), batch_size, progress)

    def _encode_text(self, dataset: CaptionDataset, batch_size: int, progress: bool) -> np.ndarray:
        loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_captions)
        batches = iterate(loader, desc="captions", enabled=progress, unit="batch")
        return self._fill(len(dataset), ((self.model.encode_captions(*text_to(text, self.device)), idx)
                                         for text, idx in batches))

    @torch.no_grad()
    def encode_corpus_images(self, corpus: Corpus, batch_size: int = 128, num_workers: int = 0,
                             progress: bool = False, rows: Sequence[int] | None = None) -> np.ndarray:
        """(N, D) embeddings of the corpus's images (each image once), in row order."""
        source = ImageSource(corpus, None if corpus.is_precomputed else self.eval_transform())
        ds = ImageDataset(source, rows)
        loader = DataLoader(ds, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_images)
        batches = iterate(loader, desc="images", enabled=progress, unit="batch")
        return self._fill(len(ds), ((self.model.encode_images(images.to(self.device)), idx) for images, idx in batches))

    def _fill(self, n: int, batches) -> np.ndarray:
        """(n, D) float32 rows from (embeddings, row indices) batches; D is what the model outputs (a
        two-level model's vectors are twice ``embed_size``)."""
        out = None
        for emb, idx in batches:
            emb = emb.float().cpu().numpy()
            if out is None:
                out = np.zeros((n, emb.shape[1]), dtype=np.float32)
            out[idx.numpy()] = emb
        return out if out is not None else np.zeros((0, self._dim()), dtype=np.float32)

    @torch.no_grad()
    def encode_pil_images(self, images: Sequence, batch_size: int = 64) -> np.ndarray:
        """Embeddings of PIL images (already RGB); raw-image models only."""
        if self.reads_features:
            raise ValueError("this model reads precomputed features; it cannot embed raw images")
        tf = self.eval_transform()
        outs = []
        for a in range(0, len(images), batch_size):
            batch = torch.stack([tf(im) for im in images[a: a + batch_size]]).to(self.device)
            outs.append(self.model.encode_images(batch).float().cpu().numpy())
        return np.concatenate(outs) if outs else np.zeros((0, self._dim()), dtype=np.float32)

    def evaluate(self, corpus: Corpus, protocol: str = "full", *, batch_size: int = 128,
                 chunk_size: int | None = None, progress: bool = False, return_folds: bool = False,
                 train_captions: Sequence[str] | None = None):
        """The field's metrics of this model on ``corpus``: what ``vsekit eval``, the trainer's validation and
        the benchmarks all call. ``"semantic"`` (any data set; ``train_captions`` needed): the exact-pair metrics
        beside R@K, mAP@R and R-Precision where a caption (image) also counts when its LSA semantics are close to
        a ground-truth caption's, per ``eval.thresholds`` (:mod:`vsekit.eval.semantic`). ``"eccv"`` (COCO 5K test): the exact-pair 5K metrics beside mAP@R, R-Precision
        and R@1 with ECCV Caption positives and R@K with CxC positives (:mod:`vsekit.eval.eccv`).
        ``"full"`` / ``"1k5fold"``: recall, medr, meanr, rsum of the exact pairs
        (:func:`vsekit.eval.retrieval_metrics`), scored by the model's own similarity. ``"label_map"``: label
        relevance (:func:`vsekit.eval.label_metrics`), mAP, mAP@50, precision@K, ranked by the model's
        similarity when it is cosine or euclidean (else cosine)."""
        from vsekit.eval import label_metrics, retrieval_metrics

        if protocol == "eccv":
            from vsekit.eval.eccv import coco_ids_from_corpus, eccv_metrics

            ids = coco_ids_from_corpus(corpus)  # COCO 5K test only (checked before encoding); its 25,000 captions
        img, cap = self.encode_corpus(corpus, batch_size=batch_size, progress=progress)
        if protocol == "semantic":
            from vsekit.eval.semantic import lsa_vectors_for, semantic_metrics

            if train_captions is None:
                raise EncodeError("protocol 'semantic' needs the training captions (the LSA model is fitted on "
                                  "them, as LSEH's)")
            s = self.config.semantics  # fitted once per caption set, in LSEH's cache
            vectors = lsa_vectors_for(train_captions, corpus.captions, cache_dir=s.cache_path(), **s.lsa_params())
            e = self.config.eval
            m = retrieval_metrics(img, cap, corpus.caption_to_image, protocol="full", similarity=self.similarity,
                                  chunk_size=chunk_size)
            m.update(semantic_metrics(img, cap, corpus.caption_to_image, vectors, thresholds=tuple(e.thresholds),
                                      similarity=self.similarity))
            return (m, [m]) if return_folds else m
        if protocol == "eccv":
            rows = ids.caption_rows
            m = retrieval_metrics(img, cap[rows], corpus.caption_to_image[rows], protocol="full",
                                  similarity=self.similarity, chunk_size=chunk_size)
            m.update(eccv_metrics(img, cap[rows], ids.image_cocoids, ids.caption_ids, similarity=self.similarity))
            m["eccv_map_at_r"] = (m["eccv_i2t_map_at_r"] + m["eccv_t2i_map_at_r"]) / 2
            return (m, [m]) if return_folds else m
        if protocol == "label_map":
            if corpus.labels is None:
                raise EncodeError(f"{corpus.name} has no class labels: protocol 'label_map' needs them")
            metric = self.similarity if self.similarity in ("cosine", "euclidean") else "cosine"
            m = label_metrics(img, cap, corpus.labels, corpus.caption_labels(), metric=metric)
            return (m, [m]) if return_folds else m
        return retrieval_metrics(img, cap, corpus.caption_to_image, protocol=protocol, similarity=self.similarity,
                                 chunk_size=chunk_size, return_folds=return_folds)

    def encode_corpus(self, corpus: Corpus, batch_size: int = 128, progress: bool = False):
        return (self.encode_corpus_images(corpus, batch_size, progress=progress),
                self.encode_corpus_captions(corpus, batch_size, progress=progress))

    def _dim(self) -> int:
        """The size of the model's embeddings: ``embed_size`` per level (two-level models have two)."""
        return self.config.model.embed_size * int(getattr(self.model.image_encoder, "levels", 1))
