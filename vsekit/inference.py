"""Using a trained model: load a checkpoint, embed images and captions.

Search and evaluation use this module; it imports nothing from the training code.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Sequence
from dataclasses import replace
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
from vsekit.eval.metrics import BlockScorer
from vsekit.eval.protocols import EvalInputs, get_protocol
from vsekit.losses.terms import OBJECTIVE_TERMS, term_options
from vsekit.models.local_sets import LocalSets, LocalSetsWriter
from vsekit.models.vse import VSEModel, build_model
from vsekit.models.weights import restoring_weights
from vsekit.text.encoding import CaptionEncoder
from vsekit.text.vocab import Vocabulary
from vsekit.utils import distributed
from vsekit.utils.device import resolve_device
from vsekit.utils.progress import iterate


class _Rows(torch.utils.data.Dataset):
    """Rows ``rows`` of a dataset, renumbered 0..len-1 (a process's block under torchrun)."""

    def __init__(self, dataset, rows) -> None:
        self.dataset, self.rows = dataset, [int(r) for r in rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        item = self.dataset[self.rows[i]]
        return (*item[:-1], i)


class _Pictures(torch.utils.data.Dataset):
    """Item i = (PIL image i in RGB through ``transform``, i)."""

    def __init__(self, images: Sequence[Any], transform) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        image = self.images[i]
        return self.transform(image if getattr(image, "mode", "RGB") == "RGB" else image.convert("RGB")), i


class EncodeError(VsekitError, ValueError):
    """The model cannot embed this input (raw images for a feature model, strings for a text-feature model)."""


# Local sets of an evaluation larger than this go to a memory-mapped temporary file instead of RAM
IN_MEMORY_SETS_BYTES = 2 << 30
# captions per call of a similarity network when a block of pairs is scored (sorted by length first)
SCORE_CAPTION_CHUNK = 512


def caption_encoder(vocab: Vocabulary, model: VSEModel, text: Any) -> CaptionEncoder:
    """Caption -> token ids for ``model``: its text encoder's own tokenizer when it has one (BERT), else the
    vocabulary; at most ``text.max_len`` tokens, and ``text.max_tokens`` (cut with a warning). The one
    tokenizer call of training and inference (``text``: the run's ``text`` config section)."""
    return CaptionEncoder(vocab, model.text_encoder.tokenize, text.max_len, text.max_tokens)


class SetPairScorer(BlockScorer):
    """The scores of blocks of (image, caption) rows through the model's similarity network, from the stored
    local sets: the metrics' :class:`~vsekit.eval.metrics.BlockScorer` for a similarity network.

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
        self.num_images, self.num_captions = len(images), len(captions)

    def __call__(self, image_rows: torch.Tensor, caption_rows: torch.Tensor) -> torch.Tensor:
        scores = self.scores(image_rows.long().cpu().numpy(), caption_rows.long().cpu().numpy())
        return torch.from_numpy(scores).to(image_rows.device)

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
    config (text length, image transform) and, for a model that reads precomputed features, their shape.

    Two calls embed everything: :meth:`encode_texts` (caption strings, or a corpus's captions) and
    :meth:`encode_images` (a corpus's images, or PIL images); ``parts=True`` also returns the local sets a
    similarity network scores (:meth:`score_sets`)."""

    def __init__(self, model: VSEModel, vocab: Vocabulary, config: RunConfig | dict[str, Any],
                 device: str | torch.device = "auto", fingerprint: str | None = None, *,
                 feature_shape: Sequence[int] | None = None, checkpoint_path: str | None = None) -> None:
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.vocab = vocab
        self.config = validate_config(config)
        self.captions = caption_encoder(vocab, self.model, self.config.text)
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
        return cls.from_state(load_checkpoint(path), device)  # load_checkpoint checks model, vocab, config

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
        need those sets (``parts=True`` of :meth:`encode_images`, :meth:`score_sets`), not only the embeddings."""
        return self.model.learned_similarity

    @property
    def reads_features(self) -> bool:
        """True for a model over precomputed features: it cannot embed image files."""
        return bool(self.feature_shape)

    def tokenize(self, caption: str) -> list[int]:
        """Token ids of a caption (:func:`caption_encoder`)."""
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

    # -- encoding ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str] | Corpus, *, batch_size: int = 256, progress: bool = False,
                     parts: bool = False, dtype: str = "float32", spill_dir: str | Path | None = None):
        """(M, D) float32 embeddings of caption strings, or of a corpus's captions (their strings, or their
        precomputed text features), in order. ``parts``: ``(embeddings, local sets)``, the sets (the words a
        similarity network reads) stored as ``dtype`` (float32 or float16), in a memory-mapped file in
        ``spill_dir`` when given. Under torchrun (without ``parts``) each process encodes a block of rows."""
        corpus = texts if isinstance(texts, Corpus) else None
        features = corpus is not None and corpus.has_text_features
        if parts and (features or self.reads_text_features):
            raise EncodeError("a similarity network reads the words of caption strings; this model or corpus has "
                              "text feature vectors")
        if features != self.reads_text_features:
            have = "text feature vectors" if features else "caption strings"
            raise EncodeError(f"{corpus.name if corpus else 'the input'} holds {have}, which this model's text "
                              "encoder does not read (a text-feature model embeds a data set's caption_features)")
        dataset = (CaptionDataset(text=TextSource(corpus, self.tokenize)) if corpus is not None
                   else CaptionDataset(texts, self.tokenize))
        forward = self._caption_parts if parts else \
            (lambda t: (self.model.encode_captions(*text_to(t, self.device)), None))
        return self._encode(dataset, collate_captions, forward, "captions", parts=parts, shard=True,
                            batch_size=batch_size, progress=progress, dtype=dtype, spill_dir=spill_dir)

    @torch.no_grad()
    def encode_images(self, images: Corpus | Sequence[Any], *, batch_size: int = 128, num_workers: int = 0,
                      progress: bool = False, rows: Sequence[int] | None = None, parts: bool = False,
                      dtype: str = "float32", spill_dir: str | Path | None = None,
                      lock: contextlib.AbstractContextManager | None = None):
        """(N, D) float32 embeddings of a corpus's images (each image once, in row order; or its ``rows``) or of
        PIL images. ``parts``, ``dtype``, ``spill_dir``: as for :meth:`encode_texts` (the local sets are the
        image encoder's context, e.g. its regions). ``lock``: held around each forward pass only (a server's
        model lock; decoding and the transform run outside it). Under torchrun (a whole corpus, without
        ``parts``) each process encodes a block of rows."""
        corpus = images if isinstance(images, Corpus) else None
        if corpus is not None:
            source = ImageSource(corpus, None if corpus.is_precomputed else self.eval_transform())
            dataset = ImageDataset(source, rows)
        elif self.reads_features:
            raise EncodeError("this model reads precomputed features; it cannot embed images")
        else:
            dataset = _Pictures(images, self.eval_transform())
        forward = self._image_parts if parts else lambda x: (self.model.encode_images(x.to(self.device)), None)
        shard = corpus is not None and rows is None
        return self._encode(dataset, collate_images, forward, "images", parts=parts, shard=shard,
                            batch_size=batch_size, num_workers=num_workers, progress=progress, dtype=dtype,
                            spill_dir=spill_dir, lock=lock)

    def _encode(self, dataset, collate, forward, desc: str, *, parts: bool, shard: bool, batch_size: int,
                progress: bool, dtype: str, spill_dir: str | Path | None, num_workers: int = 0,
                lock: contextlib.AbstractContextManager | None = None):
        """(len(dataset), D) float32 rows from ``forward(batch) -> (embeddings, local sets or None)``; with
        ``parts``, also the local sets, appended in row order. D is what the model outputs (a two-level model's
        vectors are twice ``embed_size``)."""
        n, sets = len(dataset), LocalSetsWriter(dtype, spill_dir) if parts else None
        block = distributed.shard_rows(n) if shard and not parts else None  # all rows in one process
        if block is not None and len(block) != n:
            dataset = _Rows(dataset, block)
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate)
        out, done = None, 0
        for inputs, idx in iterate(loader, desc=desc, enabled=progress, unit="batch"):
            with lock if lock is not None else contextlib.nullcontext():
                emb, local = forward(inputs)
            emb = emb.float().cpu().numpy()
            if out is None:
                out = np.zeros((len(dataset), emb.shape[1]), dtype=np.float32)
            out[idx.numpy()] = emb
            if sets is not None:  # appended batch by batch: the loader must deliver the rows in order
                if not torch.equal(idx, torch.arange(done, done + len(idx))):
                    raise RuntimeError("the data loader delivered rows out of order")  # a bug, not user error
                sets.append(*local)
                done += len(idx)
        if out is None:
            out = np.zeros((0, self._dim()), dtype=np.float32)
        if sets is not None:
            return out, sets.finish(self._dim())
        return out if block is None else distributed.gather_rows(out, n)

    def _image_parts(self, images: torch.Tensor):
        emb, ctx = self.model.encode_image_parts(images.to(self.device))
        ctx = _context(ctx, "image")
        return emb, (ctx, torch.full((ctx.shape[0],), ctx.shape[1], dtype=torch.long))

    def _caption_parts(self, text: tuple[torch.Tensor, ...]):
        emb, ctx, lengths = self.model.encode_caption_parts(*text_to(text, self.device))
        return emb, (_context(ctx, "text"), lengths)

    def score_sets(self, image_sets: LocalSets, caption_sets: LocalSets, image_rows: Sequence[int] | None = None,
                   caption_rows: Sequence[int] | None = None) -> np.ndarray:
        """(n, m) float32 scores through the similarity network of the image sets at ``image_rows`` against
        the caption sets at ``caption_rows`` (all when None)."""
        scorer = SetPairScorer(self.model, image_sets, caption_sets, self.device, fixed_shapes=False)
        img = np.arange(len(image_sets)) if image_rows is None else np.asarray(image_rows, dtype=np.int64)
        cap = np.arange(len(caption_sets)) if caption_rows is None else np.asarray(caption_rows, dtype=np.int64)
        return scorer.scores(img, cap)

    # -- evaluation ----------------------------------------------------------------------------------------
    def evaluate(self, corpus: Corpus, protocol: str = "full", *, batch_size: int = 128,
                 chunk_size: int | None = None, progress: bool = False, return_folds: bool = False,
                 train_captions: Sequence[str] | None = None):
        """The metrics of protocol ``protocol`` (:data:`~vsekit.eval.EVAL_PROTOCOLS`: full, 1k5fold, label_map,
        eccv, semantic) of this model on ``corpus``: what ``vsekit eval``, the trainer's validation and the
        benchmarks all call; ``(metrics, folds)`` with ``return_folds``. ``train_captions``: the training
        captions, which ``semantic`` fits its LSA model on.

        A model with a similarity network is scored through the network, every (image, caption) pair (the
        same ranking code, given a :class:`SetPairScorer`); its local sets are kept in RAM, or in a
        memory-mapped temporary file when larger than :data:`IN_MEMORY_SETS_BYTES`."""
        spec = get_protocol(protocol)
        inputs = EvalInputs(corpus, self.similarity, self.learned_similarity, chunk_size=chunk_size,
                            train_captions=train_captions, semantics=self.config.semantics,
                            thresholds=tuple(self.config.eval.thresholds))
        if spec.check is not None:
            spec.check(inputs)  # before anything is encoded
        with contextlib.ExitStack() as stack:
            m, folds = spec.run(self._scored(inputs, batch_size, progress, stack))
        return (m, folds) if return_folds else m

    def _scored(self, inputs: EvalInputs, batch_size: int, progress: bool, stack: contextlib.ExitStack):
        """``inputs`` with the corpus's embeddings or, for a similarity network, a :class:`SetPairScorer` over
        its local sets."""
        corpus, opts = inputs.corpus, {"batch_size": batch_size, "progress": progress}
        if not self.learned_similarity:
            img, cap = self.encode_images(corpus, **opts), self.encode_texts(corpus, **opts)
            return replace(inputs, images=img, captions=cap)
        spill = None
        if self._sets_bytes(corpus) > IN_MEMORY_SETS_BYTES:
            spill = stack.enter_context(tempfile.TemporaryDirectory(prefix="vsekit-eval-"))
        _, images = self.encode_images(corpus, parts=True, spill_dir=spill, **opts)
        _, captions = self.encode_texts(corpus, parts=True, spill_dir=spill, **opts)
        return replace(inputs, similarity=SetPairScorer(self.model, images, captions, self.device))

    def _sets_bytes(self, corpus: Corpus) -> int:
        """About how many bytes the float32 local sets of ``corpus`` take (regions + words)."""
        regions = int(self.feature_shape[0]) if self.feature_shape and len(self.feature_shape) == 2 else 1
        words = sum(len(c.split()) + 2 for c in corpus.captions)
        return 4 * self._dim() * (corpus.num_images * regions + words)

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


def _context(ctx: torch.Tensor | None, what: str) -> torch.Tensor:
    if ctx is None or ctx.dim() != 3:
        raise EncodeError(f"the {what} encoder returns no local vectors (context) for the similarity network")
    return ctx
