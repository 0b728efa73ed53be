"""The training objective: a weighted sum of terms computed from one forward pass (:class:`PairOutput`).

Config (``objective`` section; every weight may change per training stage)::

    objective:
      loss_weight: 1.0          # the in-batch ranking loss of the `loss:` section (any registered loss)
      instance:                 # instance loss through one classifier shared by both paths (Dual-Path)
        image_weight: 0.0
        text_weight: 0.0
        dropout: 0.0            # before the classifier
        bias: true
        num_classes: null       # null: the number of training images
        init_std: 0.001
      mined:                    # ranking with one mined hard negative caption per anchor
        name: dualpath_rank     # a MINED_LOSSES entry; its other keys go to it
        weight: 0.0
        margin: 1.0
        pool_size: 256          # random training captions scored per step to find the negatives
      label: {weight: 0.0}      # ACMR: a label classifier shared by both modalities (CE, or BCE multi-label)
      adversarial:              # ACMR: a modality discriminator behind gradient reversal
        weight: 0.0
        schedule: dann          # λ_p = 2 / (1 + exp(-γ p)) - 1 (or constant), p = training progress
      triplet:                  # ACMR: label-based triplets, hardest different-label negatives in the batch
        weight: 0.0
        margin: 0.1
        distance: sq_euclidean  # or cosine
        mine_in: embedding      # or input (raw features, as the ACMR demo)
      embedding:                # a ranking loss on the embeddings' cosine (trains a similarity network's
        weight: 0.0             # pooled embeddings, which a search index shortlists with)
        loss: {name: hinge, margin: 0.2, reduction: sum}   # any registered ranking loss

      terms:                    # registered terms by name (vsekit.losses.terms): caption decoder, GAN, ...
        caption: {weight: 1.0, ...}

A term is built when some stage gives it a non-zero weight, and computed only while its weight is non-zero.
With the defaults the objective is exactly the ``loss:`` section, as before the objective existed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vsekit.config import RunConfig
from vsekit.config.schema import MINED_POOL_SIZE, ObjectiveConfig
from vsekit.data.datasets import CaptionPool, text_to
from vsekit.errors import ConfigError
from vsekit.losses.adversarial import ModalityAdversarialLoss, dann_lambda
from vsekit.losses.base import LOSSES, MinedRankingLoss, RankingLoss
from vsekit.losses.dualpath import MINED_LOSSES, mine_hard_negatives
from vsekit.losses.instance import InstanceLoss
from vsekit.losses.labels import LabelClassifierLoss, LabelTripletLoss
from vsekit.losses.terms import OBJECTIVE_TERMS, AuxiliaryUpdate, ObjectiveTerm, TermBatch, term_options
from vsekit.models.vse import PairOutput, VSEModel


@dataclass
class MinedNegatives:
    """One mined caption per anchor: its text inputs (tokens (B, T) and lengths (B,), or features (B, D)), its
    image id (B,), and whether it is usable."""

    text: tuple[Tensor, ...]
    image_ids: Tensor
    valid: Tensor


class Objective(nn.Module):
    """Weighted terms: in-batch ranking loss, instance loss on both paths, mined-negative ranking loss.

    ``rank_loss`` is the ``loss:`` section's module (owned and checkpointed by the trainer as before);
    :attr:`terms` holds the objective's own modules (the shared classifier, the mined loss), which the
    trainer optimises and checkpoints under the name ``objective``.
    """

    def __init__(self, rank_loss: RankingLoss, instance: InstanceLoss | None = None,
                 mined: MinedRankingLoss | None = None, pool_size: int = MINED_POOL_SIZE, *,
                 label: LabelClassifierLoss | None = None, adversarial: ModalityAdversarialLoss | None = None,
                 triplet: LabelTripletLoss | None = None, embedding: RankingLoss | None = None,
                 registered: dict[str, tuple[ObjectiveTerm, dict]] | None = None) -> None:
        super().__init__()
        self.rank_loss = rank_loss
        self.terms = nn.ModuleDict()
        for name, term in (("instance", instance), ("mined", mined), ("label", label),
                           ("adversarial", adversarial), ("triplet", triplet), ("embedding", embedding)):
            if term is not None:
                self.terms[name] = term
        # registered terms (objective.terms) and the options each was built with
        self.registered: list[str] = []
        self._built_options: dict[str, dict] = {}
        for name, (term, options) in (registered or {}).items():
            if name in self.terms:
                raise ConfigError(f"objective.terms.{name}: the name of a built-in term")
            self.terms[name] = term
            self.registered.append(name)
            self._built_options[name] = options
        self.pool_size = int(pool_size)
        self.weights = ObjectiveConfig().weights()
        self.adversarial_cfg = ObjectiveConfig().adversarial
        self.progress = 0.0  # training progress in [0, 1], set by the trainer (the adversary's λ schedule)

    # -- configuration ---------------------------------------------------------------------------------
    def set_weights(self, objective_cfg: ObjectiveConfig) -> None:
        """Take the weights of one stage's ``objective`` section."""
        w = objective_cfg.weights()
        if (w["instance_image"] or w["instance_text"]) and "instance" not in self.terms:
            raise ConfigError("objective.instance has a weight but no instance term was built")
        if w["mined"] and "mined" not in self.terms:
            raise ConfigError("objective.mined has a weight but no mined term was built")
        for name in ("label", "adversarial", "triplet", "embedding"):
            if w[name] and name not in self.terms:
                raise ConfigError(f"objective.{name} has a weight but no {name} term was built")
        for name, section in objective_cfg.terms.items():
            if w[name] and name not in self.registered:
                raise ConfigError(f"objective.terms.{name} has a weight but no {name} term was built")
            if name in self.registered:
                self._set_term_stage(name, term_options(section))
        for name in self.registered:
            w.setdefault(name, 0.0)
        self.weights = w
        self.adversarial_cfg = objective_cfg.adversarial
        if "triplet" in self.terms:
            self.terms["triplet"].margin = float(objective_cfg.triplet.margin)
        # the options that may also change per stage (the rest is fixed when the terms are built)
        if "instance" in self.terms:
            self.terms["instance"].dropout.p = float(objective_cfg.instance.dropout)
        if "mined" in self.terms:
            if "margin" in objective_cfg.mined:
                self.terms["mined"].margin = float(objective_cfg.mined["margin"])
            self.pool_size = objective_cfg.mined_pool_size

    def _set_term_stage(self, name: str, options: dict) -> None:
        term = self.terms[name]
        built = self._built_options[name]
        fixed = [k for k in set(options) | set(built) if k not in term.stage_keys and options.get(k) != built.get(k)]
        if fixed:
            raise ConfigError(f"objective.terms.{name}.{sorted(fixed)[0]}: cannot change between training stages "
                              f"(only {', '.join(term.stage_keys) or 'the weight'} can)")
        term.set_stage(**{k: options[k] for k in term.stage_keys if k in options})

    def auxiliary_updates(self) -> list[AuxiliaryUpdate]:
        """The parts of the registered terms that have optimizers of their own (every built term's, whatever
        its weight now: the optimizers persist across stages like the terms)."""
        return [u for name in self.registered for u in self.terms[name].auxiliary_updates()]

    @property
    def needs_caption_vectors(self) -> bool:
        """Whether a registered term reads the LSA vectors of the batch's captions (e.g. LSEH per level)."""
        return any(getattr(self.terms[n], "requires_caption_vectors", False) for n in self.registered)

    def active(self, name: str) -> bool:
        return bool(self.weights.get(name))

    def set_epoch(self, epoch: int) -> None:
        """The run's epoch (0-based), at the start of every epoch: the schedules inside the embedding term's
        loss and the registered terms (e.g. a warm-up) follow it, as the ``loss:`` section's does."""
        for name in ("embedding", *self.registered):
            if name in self.terms:
                self.terms[name].set_epoch(epoch)

    def set_progress(self, progress: float) -> None:
        """Training progress in [0, 1] (epoch / epochs, or per step): drives the adversary's λ schedule."""
        self.progress = float(progress)

    def adversary_lambda(self) -> float:
        """λ of the gradient reversal now: the DANN schedule at the current progress, or a constant."""
        a = self.adversarial_cfg
        return a.lam * (dann_lambda(self.progress, a.gamma) if a.schedule == "dann" else 1.0)

    @property
    def mining(self) -> bool:
        """True while the mined term is on: the trainer must mine negatives before the forward pass."""
        return bool(self.weights["mined"])

    # -- mining ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def mine(self, model: VSEModel, images: Tensor, image_ids: Tensor, pool: CaptionPool,
             restore_mode: Callable[[], None]) -> MinedNegatives:
        """Hard negative captions for the batch's images, scored with the model in eval mode.

        ``pool_size`` random training captions are encoded (no batch-norm or dropout updates: eval mode, as
        the reference encodes its 256 candidates in test mode), the anchors' images too, and each anchor gets
        the most similar caption of another image. ``restore_mode`` puts the model back in training mode.
        """
        idx = pool.sample(self.pool_size)  # the global torch RNG: reproducible, and saved in checkpoints
        text = pool.text(idx)
        pool_ids = pool.image_ids(idx).to(image_ids.device)
        model.eval()
        try:
            anchors = model.encode_images(images)
            candidates = model.encode_captions(*text_to(text, images.device))
            scores = model.similarity(anchors.float(), candidates.float())
        finally:
            restore_mode()
        index, valid = mine_hard_negatives(scores, image_ids, pool_ids)
        return MinedNegatives(tuple(t[index.cpu()] for t in text), pool_ids[index], valid)

    # -- loss ------------------------------------------------------------------------------------------
    def forward(self, out: PairOutput, image_ids: Tensor, *, caption_vectors: Tensor | None = None,
                negatives: MinedNegatives | None = None, labels: Tensor | None = None,
                inputs: tuple[Tensor, Tensor] | None = None,
                batch: TermBatch | None = None, term_out: PairOutput | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """(total loss, {term: unweighted value}); ``image_ids`` are the training-corpus rows = instance labels,
        ``term_out``: the registered terms' PairOutput when ``out`` is a distributed step's gathered one (they
        read this process's rows, which their TermBatch describes).
        ``labels`` the class labels of the batch's images (label and triplet terms), ``inputs`` the raw image
        and text feature batches (triplets mined in the input space). The adversary also reports its
        accuracy and λ (``adv_accuracy``, ``adv_lambda``), which are not part of the total."""
        w = self.weights
        parts: dict[str, Tensor] = {}
        total: Tensor | None = None

        def add(name: str, weight: float, value: Tensor) -> None:
            nonlocal total
            parts[name] = value.detach()
            weighted = value if weight == 1.0 else weight * value
            total = weighted if total is None else total + weighted

        if w["loss"]:
            extra = {"caption_vectors": caption_vectors} if caption_vectors is not None else {}
            add("loss", w["loss"], self.rank_loss(out.sim.float(), image_ids, **extra))
        if w["instance_image"]:
            add("instance_image", w["instance_image"], self.terms["instance"](out.image_features, image_ids))
        if w["instance_text"]:
            add("instance_text", w["instance_text"], self.terms["instance"](out.caption_features, image_ids))
        if w["mined"]:
            if negatives is None or out.negative_emb is None:
                raise ValueError("the mined term is on but no mined negatives were encoded")
            add("mined", w["mined"], self._mined(out, image_ids, negatives))
        if (w["label"] or w["triplet"]) and labels is None:
            raise ConfigError("objective.label / objective.triplet need class labels, and the training data has none")
        if w["label"]:
            add("label", w["label"], self.terms["label"](out.image_emb, out.caption_emb, labels))
        if w["triplet"]:
            image_inputs, text_inputs = inputs if inputs is not None else (None, None)
            add("triplet", w["triplet"], self.terms["triplet"](out.image_emb, out.caption_emb, labels,
                                                               image_inputs, text_inputs))
        if w["embedding"]:
            add("embedding", w["embedding"], self._embedding(out, image_ids, caption_vectors))
        if w["adversarial"]:
            lam = self.adversary_lambda()
            adv, accuracy = self.terms["adversarial"](out.image_emb, out.caption_emb, lam)
            add("adversarial", w["adversarial"], adv)
            parts["adv_accuracy"], parts["adv_lambda"] = accuracy, adv.new_tensor(lam)
        for name in self.registered:
            if not w[name]:
                continue
            if batch is None:
                raise ValueError(f"objective term {name!r} is on but no TermBatch was given")
            value = self.terms[name](term_out if term_out is not None else out, batch)
            if isinstance(value, tuple):
                value, extra = value
                parts.update({k: v.detach() for k, v in extra.items()})
            add(name, w[name], value)
        if total is None:
            raise ConfigError("every objective weight is 0: nothing to train")
        return total, parts

    def _embedding(self, out: PairOutput, image_ids: Tensor, caption_vectors: Tensor | None) -> Tensor:
        term = self.terms["embedding"]
        if term.requires_caption_vectors and caption_vectors is None:
            raise ConfigError("objective.embedding.loss needs the LSA caption vectors, which the run computes only "
                              "for a `loss:` that needs them too (loss.name=lseh)")
        extra = {"caption_vectors": caption_vectors} if term.requires_caption_vectors else {}
        sim = out.image_emb.float() @ out.caption_emb.float().t()  # cosine: the encoders L2-normalise
        return term(sim, image_ids, **extra)

    def _mined(self, out: PairOutput, image_ids: Tensor, negatives: MinedNegatives) -> Tensor:
        b = out.image_emb.shape[0]
        shift = max(1, b // 2)  # the negative image of anchor i: the batch slot half a batch away
        neg_images = out.image_emb.roll(shift, dims=0)
        valid = negatives.valid.to(image_ids.device) & (image_ids.roll(shift) != image_ids)
        return self.terms["mined"](out.image_emb, out.caption_emb, out.negative_emb, neg_images, valid)


def build_objective(stage_configs: list[RunConfig], rank_loss: RankingLoss, *, feature_dim: int,
                    num_images: int, num_classes_of_labels: int | None = None, vocab=None, corpus=None,
                    feature_shape: tuple[int, ...] | None = None) -> Objective:
    """The objective of a run: the terms that some stage switches on, built with the options of the first such
    stage. ``num_images`` (the training corpus's) is the number of instance classes unless
    ``objective.instance.num_classes`` says otherwise.
    """
    sections = [c.objective for c in stage_configs]
    weights = [s.weights() for s in sections]
    instance = mined = None
    first = next((s for s, w in zip(sections, weights) if w["instance_image"] or w["instance_text"]), None)
    if first is not None:
        inst = first.instance
        num_classes = int(inst.num_classes or num_images)
        if num_classes < num_images:
            raise ConfigError(f"objective.instance.num_classes ({num_classes}) is less than the number of training "
                              f"images ({num_images}): every training image is a class")
        instance = InstanceLoss(feature_dim, num_classes, dropout=inst.dropout, bias=inst.bias,
                                init_std=inst.init_std)
    pool_size = sections[0].mined_pool_size
    first = next((s for s, w in zip(sections, weights) if w["mined"]), None)
    if first is not None:
        pool_size = first.mined_pool_size
        mined = MINED_LOSSES.build(first.mined_loss)
    label = adversarial = triplet = None
    first = next((s for s, w in zip(sections, weights) if w["label"]), None)
    if first is not None:
        if num_classes_of_labels is None:
            raise ConfigError("objective.label needs class labels, and the training data has none")
        label = LabelClassifierLoss(feature_dim, int(first.label.num_classes or num_classes_of_labels))
    first = next((s for s, w in zip(sections, weights) if w["adversarial"]), None)
    if first is not None:
        adversarial = ModalityAdversarialLoss(feature_dim, first.adversarial.hidden, first.adversarial.activation)
    first = next((s for s, w in zip(sections, weights) if w["triplet"]), None)
    if first is not None:
        triplet = LabelTripletLoss(first.triplet.margin, first.triplet.distance, first.triplet.mine_in)
    embedding = None
    first = next((s for s, w in zip(sections, weights) if w["embedding"]), None)
    if first is not None:
        embedding = LOSSES.build(first.embedding.loss)
        if not isinstance(embedding, RankingLoss):
            raise ConfigError(f"objective.embedding.loss {first.embedding.loss['name']!r} is not a ranking loss")
    registered: dict[str, tuple[ObjectiveTerm, dict]] = {}
    for name in dict.fromkeys(n for s in sections for n in s.terms):
        first = next((s for s in sections if s.term_weight(name)), None)
        if first is None:
            continue
        options = term_options(first.terms[name])
        term = OBJECTIVE_TERMS.build({"name": name, **options}, embed_size=feature_dim, vocab=vocab, corpus=corpus,
                                     feature_shape=feature_shape)
        if not isinstance(term, ObjectiveTerm):
            raise ConfigError(f"objective.terms.{name}: the registered factory did not build an ObjectiveTerm")
        registered[name] = (term, options)
    objective = Objective(rank_loss, instance=instance, mined=mined, pool_size=pool_size, label=label,
                          adversarial=adversarial, triplet=triplet, embedding=embedding, registered=registered)
    objective.set_weights(sections[0])
    return objective
