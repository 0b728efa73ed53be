"""Using a trained model: load a checkpoint, embed images and captions.

Search and evaluation use this module; it imports nothing from the training code.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from vsekit.checkpoint import CheckpointError, load_checkpoint, model_fingerprint
from vsekit.config import RunConfig, validate_config
from vsekit.config.resolve import stage_configs
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
from vsekit.losses.terms import OBJECTIVE_TERMS, term_options
from vsekit.models.base import caption_tokenizer
from vsekit.models.local_sets import LocalSets, LocalSetsWriter
from vsekit.models.vse import VSEModel, build_model
from vsekit.models.weights import restoring_weights
from vsekit.text.encoding import CaptionEncoder
from vsekit.text.vocab import Vocabulary
from vsekit.utils import distributed
from vsekit.utils.device import resolve_device
from vsekit.utils.progress import iterate


class _Rows(torch.utils.data.Dataset):
    """Rows ``rows`` of a caption dataset, renumbered 0..len-1 (a process's block under torchrun)."""

    def __init__(self, dataset, rows) -> None:
        self.dataset, self.rows = dataset, [int(r) for r in rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        item = self.dataset[self.rows[i]]
        return (*item[:-1], i)


class EncodeError(VsekitError, ValueError):
    """The model cannot embed this input (raw images for a feature model, strings for a text-feature model)."""


# Local sets of an evaluation larger than this go to a memory-mapped temporary file instead of RAM
IN_MEMORY_SETS_BYTES = 2 << 30
# captions per call of a similarity network when a block of pairs is scored (sorted by length first)
SCORE_CAPTION_CHUNK = 512


def row_handles(n: int) -> np.ndarray:
    """(n, 1) float64 row numbers: what :func:`vsekit.eval.retrieval_metrics` is given in place of embeddings
    for a similarity network, whose :class:`SetPairScorer` looks the rows up in the stored local sets
    (exact for any n below 2**53)."""
    return np.arange(n, dtype=np.float64)[:, None]


class SetPairScorer:
    """``scorer(image_rows (R, 1), caption_rows (C, 1)) -> (R, C)``: the scores of a block of (image, caption)
    pairs through the model's similarity network, from the stored local sets; the rows are numbers (see
    :func:`row_handles`), so the metrics' blocked ranking code runs unchanged on top.

    Captions are scored :data:`SCORE_CAPTION_CHUNK` at a time, sorted by length (each call pads to its own
    longest caption only). ``fixed_shapes`` (the default): every pair is scored bitwise the same whatever
    block it is in, as the metrics' exactness needs (:class:`~vsekit.models.similarity.SimilarityNetwork`).
    """

    def __init__(self, model: VSEModel, images: LocalSets, captions: LocalSets, device: torch.device, *,
                 fixed_shapes: bool = True) -> None:
        if not model.learned_similarity:
            raise EncodeError("a SetPairScorer needs a model with a similarity network")
        if len(images) and len(set(images.lengths.tolist())) > 1:
            raise EncodeError("the image contexts have different numbers of regions; a similarity network here "
                              "takes the same number for every image")
        self.model, self.images, self.captions = model, images, captions
        self.device, self.fixed_shapes = device, fixed_shapes

    @torch.no_grad()
    def __call__(self, image_rows: torch.Tensor, caption_rows: torch.Tensor) -> torch.Tensor:
        img = image_rows.reshape(len(image_rows), -1)[:, 0].long().cpu().numpy()
        cap = caption_rows.reshape(len(caption_rows), -1)[:, 0].long().cpu().numpy()
        return torch.from_numpy(self.scores(img, cap)).to(image_rows.device)

    @torch.no_grad()
    def scores(self, image_rows: np.ndarray, caption_rows: np.ndarray) -> np.ndarray:
        """(len(image_rows), len(caption_rows)) float32 scores."""
        out = np.empty((len(image_rows), len(caption_rows)), dtype=np.float32)
        if out.size == 0:
            return out
        regions, _ = self.images.padded(image_rows, device=self.device)
        order = np.argsort(self.captions.lengths[caption_rows], kind="stable")
        for s in range(0, len(order), SCORE_CAPTION_CHUNK):
            cols = order[s: s + SCORE_CAPTION_CHUNK]
            words, lengths = self.captions.padded(caption_rows[cols], device=self.device)
            sim = self.model.similarity(regions, words, lengths, fixed_shapes=self.fixed_shapes)
            out[:, cols] = sim.float().cpu().numpy()
        return out


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
        text = self.config.text  # captions cut to text.max_len, and to text.max_tokens with a warning
        self.captions = CaptionEncoder(vocab, caption_tokenizer(self.model.text_encoder), text.max_len,
                                       text.max_tokens)
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
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "auto") -> Embedder:
        """The model of a checkpoint (a ``.pt`` file or a run folder), opened without running code."""
        state = load_checkpoint(path)  # checks for the model, vocab and config
        return cls.from_state(state, device)

    @classmethod
    def from_state(cls, state: dict[str, Any], device: str | torch.device = "auto") -> Embedder:
        """The model of a checkpoint already read by :func:`~vsekit.checkpoint.load_checkpoint` (a caller that
        also needs its other parts, e.g. ``vsekit imagine`` the GAN's weights, reads the file once)."""
        where = state.get("path", "the checkpoint")
        vocab = Vocabulary.from_dict(state["vocab"])
        try:
            config = validate_config(state["config"])
        except ConfigError as e:
            raise CheckpointError(f"{where}: its config is not valid for this vsekit: {e}") from None
        shape = tuple(state["feature_shape"]) if state.get("feature_shape") else None
        with restoring_weights():  # the checkpoint's weights, not the encoders' initial weights files
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
    def learned_similarity(self) -> bool:
        """True for a model whose similarity is a network over the local sets (regions, words): its scores
        need those sets (:meth:`encode_corpus_image_parts`, :meth:`score_sets`), not only the embeddings."""
        return self.model.learned_similarity

    @property
    def reads_features(self) -> bool:
        """True for a model over precomputed features: it cannot embed image files."""
        return bool(self.feature_shape)

    def encode_tokens(self, caption: str) -> list[int]:
        """Token ids of a caption: the text encoder's own tokenizer when it has one (BERT), else the vocabulary;
        at most ``text.max_len`` tokens, and at most ``text.max_tokens`` (cut with a warning)."""
        return self.captions(caption)

    def known_words(self, caption: str) -> int:
        """How many tokens of ``caption`` the model knows as words (0: only punctuation, unknown words or
        invisible characters)."""
        return self.captions.known_words(caption)

    def eval_transform(self):
        return self.config.transform.build(train=False)

    def score(self, image_emb: torch.Tensor | np.ndarray, caption_emb: torch.Tensor | np.ndarray) -> np.ndarray:
        """(N, M) scores of images against captions by the model's own similarity."""
        if self.learned_similarity:
            raise EncodeError(f"this model scores pairs with the {self.similarity!r} similarity network, from the "
                              "local sets of both sides, not from embeddings: use score_sets")
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
        n = len(dataset)
        rows = distributed.shard_rows(n)  # all rows in one process; a block of them under torchrun
        if len(rows) != n:
            dataset = _Rows(dataset, rows)
        loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_captions)
        batches = iterate(loader, desc="captions", enabled=progress, unit="batch")
        out = self._fill(len(rows), ((self.model.encode_captions(*text_to(text, self.device)), idx)
                                     for text, idx in batches))
        return distributed.gather_rows(out, n)

    @torch.no_grad()
    def encode_corpus_images(self, corpus: Corpus, batch_size: int = 128, num_workers: int = 0,
                             progress: bool = False, rows: Sequence[int] | None = None) -> np.ndarray:
        """(N, D) embeddings of the corpus's images (each image once), in row order."""
        source = ImageSource(corpus, None if corpus.is_precomputed else self.eval_transform())
        if rows is None and distributed.world().distributed:  # under torchrun: a block of rows each, gathered
            n = corpus.num_images
            local = self.encode_corpus_images(corpus, batch_size, num_workers, progress,
                                              rows=distributed.shard_rows(n).tolist())
            return distributed.gather_rows(local, n)
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

    # -- local sets (models with a similarity network) -----------------------------------------------------
    @torch.no_grad()
    def encode_corpus_image_parts(self, corpus: Corpus, batch_size: int = 128, num_workers: int = 0,
                                  progress: bool = False, rows: Sequence[int] | None = None, *,
                                  dtype: str = "float32",
                                  spill_dir: str | Path | None = None) -> tuple[np.ndarray, LocalSets]:
        """(N, D) embeddings and the local sets (the image encoder's context, e.g. its regions) of the corpus's
        images, in row order, from one pass. ``dtype``: how the sets are stored (float32 or float16);
        ``spill_dir``: write them to a memory-mapped file there instead of RAM."""
        source = ImageSource(corpus, None if corpus.is_precomputed else self.eval_transform())
        ds = ImageDataset(source, rows)
        loader = DataLoader(ds, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_images)
        out = np.zeros((len(ds), self._dim()), dtype=np.float32)
        writer = LocalSetsWriter(dtype, spill_dir)
        done = 0
        for images, idx in iterate(loader, desc="images", enabled=progress, unit="batch"):
            emb, ctx = self.model.encode_image_parts(images.to(self.device))
            _check_in_order(idx, done)
            out[idx.numpy()] = emb.float().cpu().numpy()
            ctx = _context(ctx, "image")
            writer.append(ctx, torch.full((ctx.shape[0],), ctx.shape[1], dtype=torch.long))
            done += len(idx)
        return out, writer.finish(self._dim())

    @torch.no_grad()
    def encode_caption_parts(self, captions: Sequence[str], batch_size: int = 256, progress: bool = False, *,
                             dtype: str = "float32") -> tuple[np.ndarray, LocalSets]:
        """(M, D) embeddings and local sets (the words) of caption strings, in input order."""
        if self.reads_text_features:
            raise EncodeError("this model reads precomputed text features, not caption strings")
        return self._encode_text_parts(CaptionDataset(captions, self.encode_tokens), batch_size, progress, dtype, None)

    @torch.no_grad()
    def encode_corpus_caption_parts(self, corpus: Corpus, batch_size: int = 256, progress: bool = False, *,
                                    dtype: str = "float32",
                                    spill_dir: str | Path | None = None) -> tuple[np.ndarray, LocalSets]:
        """(M, D) embeddings and local sets of a corpus's captions, in corpus order."""
        if self.reads_text_features or corpus.has_text_features:
            raise EncodeError("a similarity network reads the words of caption strings; this model or corpus has "
                              "text feature vectors")
        return self._encode_text_parts(CaptionDataset(text=TextSource(corpus, self.encode_tokens)), batch_size,
                                       progress, dtype, spill_dir)

    def _encode_text_parts(self, dataset: CaptionDataset, batch_size: int, progress: bool, dtype: str,
                           spill_dir: str | Path | None) -> tuple[np.ndarray, LocalSets]:
        loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_captions)
        out = np.zeros((len(dataset), self._dim()), dtype=np.float32)
        writer = LocalSetsWriter(dtype, spill_dir)
        done = 0
        for text, idx in iterate(loader, desc="captions", enabled=progress, unit="batch"):
            emb, ctx, lengths = self.model.encode_caption_parts(*text_to(text, self.device))
            _check_in_order(idx, done)
            out[idx.numpy()] = emb.float().cpu().numpy()
            writer.append(_context(ctx, "text"), lengths)
            done += len(idx)
        return out, writer.finish(self._dim())

    def score_sets(self, image_sets: LocalSets, caption_sets: LocalSets, image_rows: Sequence[int] | None = None,
                   caption_rows: Sequence[int] | None = None) -> np.ndarray:
        """(n, m) float32 scores through the similarity network of the image sets at ``image_rows`` against
        the caption sets at ``caption_rows`` (all when None)."""
        scorer = SetPairScorer(self.model, image_sets, caption_sets, self.device, fixed_shapes=False)
        img = np.arange(len(image_sets)) if image_rows is None else np.asarray(image_rows, dtype=np.int64)
        cap = np.arange(len(caption_sets)) if caption_rows is None else np.asarray(caption_rows, dtype=np.int64)
        return scorer.scores(img, cap)

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
        similarity when it is cosine or euclidean (else cosine).

        A model with a similarity network is scored through the network, every (image, caption) pair (the
        same ranking code, given row numbers and a :class:`SetPairScorer`); its local sets are kept in RAM, or
        in a memory-mapped temporary file when larger than :data:`IN_MEMORY_SETS_BYTES`."""
        with contextlib.ExitStack() as stack:
            return self._evaluate(corpus, protocol, batch_size, chunk_size, progress, return_folds, train_captions,
                                  stack)

    def _evaluate(self, corpus: Corpus, protocol: str, batch_size: int, chunk_size: int | None, progress: bool,
                  return_folds: bool, train_captions: Sequence[str] | None, stack: contextlib.ExitStack):
        from vsekit.eval import label_metrics, retrieval_metrics

        if protocol == "eccv":
            from vsekit.eval.eccv import coco_ids_from_corpus, eccv_metrics

            ids = coco_ids_from_corpus(corpus)  # COCO 5K test only (checked before encoding); its 25,000 captions
        if protocol == "label_map" and self.learned_similarity:
            raise EncodeError(f"protocol 'label_map' ranks by distances between embeddings; this model scores pairs "
                              f"with the {self.similarity!r} similarity network (use full, 1k5fold, semantic or eccv)")
        img, cap, similarity = self._scored_inputs(corpus, batch_size, progress, stack)
        if protocol == "semantic":
            from vsekit.eval.semantic import lsa_vectors_for, semantic_metrics

            if train_captions is None:
                raise EncodeError("protocol 'semantic' needs the training captions (the LSA model is fitted on "
                                  "them, as LSEH's)")
            s = self.config.semantics  # fitted once per caption set, in LSEH's cache
            vectors = lsa_vectors_for(train_captions, corpus.captions, cache_dir=s.cache_path(), **s.lsa_params())
            e = self.config.eval
            m = retrieval_metrics(img, cap, corpus.caption_to_image, protocol="full", similarity=similarity,
                                  chunk_size=chunk_size)
            m.update(semantic_metrics(img, cap, corpus.caption_to_image, vectors, thresholds=tuple(e.thresholds),
                                      similarity=similarity))
            return (m, [m]) if return_folds else m
        if protocol == "eccv":
            rows = ids.caption_rows
            m = retrieval_metrics(img, cap[rows], corpus.caption_to_image[rows], protocol="full",
                                  similarity=similarity, chunk_size=chunk_size)
            m.update(eccv_metrics(img, cap[rows], ids.image_cocoids, ids.caption_ids, similarity=similarity))
            m["eccv_map_at_r"] = (m["eccv_i2t_map_at_r"] + m["eccv_t2i_map_at_r"]) / 2
            return (m, [m]) if return_folds else m
        if protocol == "label_map":
            if corpus.labels is None:
                raise EncodeError(f"{corpus.name} has no class labels: protocol 'label_map' needs them")
            metric = self.similarity if self.similarity in ("cosine", "euclidean") else "cosine"
            m = label_metrics(img, cap, corpus.labels, corpus.caption_labels(), metric=metric)
            return (m, [m]) if return_folds else m
        return retrieval_metrics(img, cap, corpus.caption_to_image, protocol=protocol, similarity=similarity,
                                 chunk_size=chunk_size, return_folds=return_folds)

    def _scored_inputs(self, corpus: Corpus, batch_size: int, progress: bool, stack: contextlib.ExitStack):
        """(image inputs, caption inputs, similarity) for the metrics: the embeddings and the similarity's name,
        or, for a similarity network, row numbers and a :class:`SetPairScorer` over the corpus's local sets."""
        if not self.learned_similarity:
            img, cap = self.encode_corpus(corpus, batch_size=batch_size, progress=progress)
            return img, cap, self.similarity
        spill = None
        if self._sets_bytes(corpus) > IN_MEMORY_SETS_BYTES:
            spill = stack.enter_context(tempfile.TemporaryDirectory(prefix="vsekit-eval-"))
        _, images = self.encode_corpus_image_parts(corpus, batch_size, progress=progress, spill_dir=spill)
        _, captions = self.encode_corpus_caption_parts(corpus, batch_size, progress=progress, spill_dir=spill)
        scorer = SetPairScorer(self.model, images, captions, self.device)
        return row_handles(len(images)), row_handles(len(captions)), scorer

    def _sets_bytes(self, corpus: Corpus) -> int:
        """About how many bytes the float32 local sets of ``corpus`` take (regions + words)."""
        regions = int(self.feature_shape[0]) if self.feature_shape and len(self.feature_shape) == 2 else 1
        words = sum(len(c.split()) + 2 for c in corpus.captions)
        return 4 * self._dim() * (corpus.num_images * regions + words)

    def encode_corpus(self, corpus: Corpus, batch_size: int = 128, progress: bool = False):
        return (self.encode_corpus_images(corpus, batch_size, progress=progress),
                self.encode_corpus_captions(corpus, batch_size, progress=progress))

    def _dim(self) -> int:
        """The size of the model's embeddings: ``embed_size`` per level (two-level models have two)."""
        return self.config.model.embed_size * self.model.image_encoder.levels


# -- objective terms a checkpoint carries (a caption decoder, a GAN) ------------------------------------------
def first_stage_with_term(config: RunConfig, name: str) -> tuple[RunConfig, int, str] | None:
    """(config, first epoch, name) of the first training stage that gives objective term ``name`` a weight, or
    None when no stage does. A term is built with that stage's options (they cannot change between stages)."""
    start, stages = 0, config.train.stages
    for k, cfg in enumerate(stage_configs(config) or [config]):
        if cfg.objective.term_weight(name):
            return cfg, start, (stages[k].name or f"stage{k + 1}") if stages else "main"
        start += stages[k].epochs if stages else 0
    return None


def trained_term(state: dict[str, Any], name: str, stage_config: RunConfig, what: str, **build: Any):
    """Objective term ``name`` built with its options in ``stage_config`` (the factory's other arguments in
    ``build``) and loaded with the checkpoint's ``objective`` weights; ``what`` names it in errors."""
    where = state.get("path", "the checkpoint")
    try:
        term = OBJECTIVE_TERMS.build({"name": name, **term_options(stage_config.objective.terms[name])}, **build)
    except ConfigError as e:
        raise CheckpointError(f"{where}: its {what} options are not valid for this vsekit: {e}") from None
    prefix = f"{name}."
    weights = {k[len(prefix):]: v for k, v in (state.get("objective") or {}).items() if k.startswith(prefix)}
    if not weights:
        raise CheckpointError(f"{where}: its config has a {what} but the file holds no {what} weights")
    try:
        term.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"{where}: its {what} weights do not fit the {what} its config describes: "
                              f"{str(e).splitlines()[0]}") from None
    return term


def _check_in_order(idx: torch.Tensor, done: int) -> None:
    """Local sets are appended batch by batch: the loader must deliver the rows in order."""
    if not torch.equal(idx, torch.arange(done, done + len(idx))):
        raise RuntimeError("the data loader delivered rows out of order")  # a bug, not a user error


def _context(ctx: torch.Tensor | None, what: str) -> torch.Tensor:
    if ctx is None or ctx.dim() != 3:
        raise EncodeError(f"the {what} encoder returns no local vectors (context) for the similarity network")
    return ctx
