"""Building what a training run needs from its config: data, vocabulary, model, loss, objective, semantics."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vsekit.config import RunConfig
from vsekit.data.corpus import Corpus
from vsekit.data.datasets import CaptionPool, EpochSampler, ImageSource, PairDataset, TextSource
from vsekit.data.images import AugmentConfig
from vsekit.data.sources import load_split
from vsekit.errors import ConfigError, first_line
from vsekit.inference import caption_encoder
from vsekit.losses import build_loss
from vsekit.losses.base import RankingLoss
from vsekit.models.frozen_cache import FrozenOutputs
from vsekit.models.vse import VSEModel, build_model
from vsekit.models.weights import restoring_weights
from vsekit.semantics import fit_or_load_caption_vectors
from vsekit.text.vocab import Vocabulary
from vsekit.train.objective import Objective, build_objective
from vsekit.train.stages import StagePlan
from vsekit.utils.distributed import World

log = logging.getLogger("vsekit.train")


@dataclass
class TrainingRun:
    """The parts of a run, built once; the trainer drives them."""

    cfg: RunConfig
    train_corpus: Corpus
    val_corpus: Corpus
    vocab: Vocabulary
    feature_shape: tuple[int, ...] | None
    model: VSEModel
    loss_fn: RankingLoss
    plan: StagePlan
    objective: Objective
    dataset: PairDataset
    sampler: EpochSampler
    labels: torch.Tensor | None  # class labels of the training images (row-indexed), when a term needs them
    text_feature_dim: int | None  # size of precomputed text features, when the data ships text as vectors

    def state_dict(self) -> dict[str, Any]:
        """The weights (model, loss, and the objective's terms when it has any) and what rebuilds the model."""
        state = {"model": self.model.state_dict(), "loss": self.loss_fn.state_dict(), "vocab": self.vocab.to_dict(),
                 "config": self.cfg.to_dict(), "text_feature_dim": self.text_feature_dim,
                 "feature_shape": list(self.feature_shape) if self.feature_shape else None}
        if len(self.objective.terms):  # only runs that use them carry these
            state["objective"] = self.objective.terms.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.loss_fn.load_state_dict(state["loss"])
        if len(self.objective.terms):
            self.objective.terms.load_state_dict(state["objective"])

    def init_from(self, state: dict[str, Any]) -> None:
        """Start from a checkpoint's weights (``train.init_from``: e.g. VSE++ FT stage 2)."""
        self.model.load_state_dict(state["model"])
        if len(self.objective.terms) and "objective" in state:
            self.objective.terms.load_state_dict(state["objective"])
        log.info("initialised the model from %s", state["path"])

    def shard(self, world: World, local_batch_size: int) -> None:
        """Under torchrun: each process draws its share of every batch, and the objective must allow it."""
        if not world.distributed:
            return
        self.sampler.shard(world.rank, world.size, local_batch_size)
        self.objective.check_distributed()
        if self.model.learned_similarity:
            raise ConfigError("distributed training gathers embeddings across processes; a learned similarity "
                              "(model.similarity with parameters) needs its encoders' contexts gathered, which "
                              "vsekit does not do yet: train it in one process")


def caption_vectors(cfg: RunConfig, corpus: Corpus) -> torch.Tensor:
    """The LSA vectors of the training captions (fitted once per caption set, then cached)."""
    s = cfg.semantics
    vecs = fit_or_load_caption_vectors(corpus.captions, corpus.caption_ids, s.cache_path(), **s.lsa_params())
    return torch.from_numpy(np.array(vecs, dtype=np.float32))  # a writable copy


def check_image_size(model: VSEModel, image_size: int) -> None:
    """One forward pass of two blank images of ``transform.image_size`` through the image encoder, before any
    data is loaded: a size the network cannot take (each stride and pooling halves it; a 1-pixel image leaves
    nothing for the last ones) is a :class:`ConfigError` naming the key, not a torch error at the first step."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model.encode_images(torch.zeros(2, 3, image_size, image_size))
    except RuntimeError as e:
        raise ConfigError(f"transform.image_size={image_size}: the image encoder cannot take images of this size "
                          f"({first_line(e)}); use a larger transform.image_size") from None
    except Exception as e:  # noqa: BLE001 - an encoder this probe cannot call alone: the first step will say
        log.debug("image size probe skipped: %s: %s", type(e).__name__, e)
    finally:
        model.train(was_training)


def no_frozen_cache_under_random_augmentation(model: VSEModel, augment: AugmentConfig) -> None:
    """A frozen image network keeps its output per image (:mod:`vsekit.models.frozen_cache`); under random crops
    or colour jitter no image reaches it twice, so that cache would only fill memory: off for this run."""
    why = [w for w, on in (("random crops", augment.crop != "center"), ("colour jitter", augment.color_jitter > 0))
           if on]
    if not why:
        return
    for m in model.image_encoder.modules():
        if isinstance(m, FrozenOutputs) and m.cache_bytes:
            m.cache_bytes = 0
            if not m.finetune:
                log.info("model.image_encoder: the frozen network's outputs are not kept per image: transform.augment "
                         "has %s, so no image repeats (crop: center and color_jitter: 0 make frozen epochs cheap)",
                         " and ".join(why))


def build_run(cfg: RunConfig, weights_from: dict[str, Any] | None = None) -> TrainingRun:
    """Everything but the optimizer (which belongs to a training stage). ``weights_from`` is a checkpoint
    whose vocabulary the run must keep (a resumed run, or ``train.init_from``)."""
    data = cfg.data
    train_corpus = load_split(data, data.train_split)
    val_corpus = load_split(data, data.val_split, data.val_max_images)
    vocab = (Vocabulary.from_dict(weights_from["vocab"]) if weights_from is not None
             else Vocabulary.build(train_corpus.captions, cfg.text.min_count, cfg.text.max_tokens))
    shape = tuple(int(x) for x in train_corpus.features.shape[1:]) if train_corpus.is_precomputed else None
    text_dim = int(train_corpus.caption_features.shape[1]) if train_corpus.has_text_features else None
    # a run that continues a checkpoint takes its weights, not the encoders' initial weights files
    with restoring_weights() if weights_from is not None else contextlib.nullcontext():
        model = build_model(cfg.model, vocab_size=len(vocab), itos=vocab.itos, feature_shape=shape,
                            text_feature_dim=text_dim)
    loss_fn = build_loss(cfg.loss)
    if not isinstance(loss_fn, RankingLoss):
        raise ConfigError(f"loss {cfg.loss['name']!r} is not a RankingLoss; the trainer needs one")
    plan = StagePlan(cfg)
    objective = build_objective(plan.configs(), loss_fn, feature_dim=cfg.model.embed_size, vocab=vocab,
                                corpus=train_corpus, feature_shape=shape)
    if "mined" in objective.terms and model.similarity_name != "cosine":
        raise ConfigError("objective.mined scores pairs by cosine; it needs model.similarity: cosine")

    vectors = None
    if (loss_fn.requires_caption_vectors and any(c.objective.loss_weight for c in plan.configs())) or \
            objective.needs_caption_vectors:
        vectors = caption_vectors(cfg, train_corpus)

    encode = caption_encoder(vocab, model, cfg.text)  # the tokenizer of inference too
    if encode.hook is not None and len(train_corpus.captions):
        encode(train_corpus.captions[0])  # a missing tokenizer fails here, not in a loader worker

    transform = None if train_corpus.is_precomputed else cfg.transform.build(train=True)
    if transform is not None:
        check_image_size(model, cfg.transform.image_size)
        no_frozen_cache_under_random_augmentation(model, cfg.transform.augment)
    text = TextSource(train_corpus, encode)
    if "mined" in objective.terms:
        objective.terms["mined"].pool = CaptionPool(train_corpus, text)
    labels = None
    if objective.needs_labels:
        if train_corpus.labels is None:
            raise ConfigError(f"{train_corpus.name}: objective.label / objective.triplet need class labels, and "
                              "this data set has none (a 'label' column, Karpathy 'label' fields, label files)")
        labels = torch.from_numpy(np.asarray(train_corpus.labels, dtype=np.int64))
    images = ImageSource(train_corpus, transform, cache_bytes=data.image_cache_mb << 20)
    dataset = PairDataset(train_corpus, text, images, sample=data.sample, seed=cfg.seed,
                          skip_unreadable=data.skip_missing_images, labels=labels, caption_vectors=vectors)
    if cfg.train.batch_size > len(dataset):
        log.warning("train.batch_size (%d) is more than the %d training pairs of %s: every step is one batch of "
                    "the whole set, and memory grows with it; lower train.batch_size", cfg.train.batch_size,
                    len(dataset), train_corpus.name)
    sampler = EpochSampler(len(dataset), cfg.seed)
    return TrainingRun(cfg, train_corpus, val_corpus, vocab, shape, model, loss_fn, plan, objective, dataset,
                       sampler, labels, text_dim)
