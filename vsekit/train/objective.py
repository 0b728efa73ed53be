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
from vsekit.data.datasets import CaptionPool
from vsekit.errors import ConfigError
from vsekit.losses.base import MinedRankingLoss, RankingLoss
from vsekit.losses.dualpath import MINED_LOSSES, mine_hard_negatives
from vsekit.losses.instance import InstanceLoss
from vsekit.models.vse import PairOutput, VSEModel


@dataclass
class MinedNegatives:
    """One mined caption per anchor: tokens (B, T), lengths (B,), its image id (B,), and whether it is usable."""

    tokens: Tensor
    lengths: Tensor
    image_ids: Tensor
    valid: Tensor


class Objective(nn.Module):
    """Weighted terms: in-batch ranking loss, instance loss on both paths, mined-negative ranking loss.

    ``rank_loss`` is the ``loss:`` section's module (owned and checkpointed by the trainer as before);
    :attr:`terms` holds the objective's own modules (the shared classifier, the mined loss), which the
    trainer optimises and checkpoints under the name ``objective``.
    """

    def __init__(self, rank_loss: RankingLoss, instance: InstanceLoss | None = None,
                 mined: MinedRankingLoss | None = None, pool_size: int = MINED_POOL_SIZE) -> None:
        super().__init__()
        self.rank_loss = rank_loss
        self.terms = nn.ModuleDict()
        if instance is not None:
            self.terms["instance"] = instance
        if mined is not None:
            self.terms["mined"] = mined
        self.pool_size = int(pool_size)
        self.weights = {"loss": 1.0, "instance_image": 0.0, "instance_text": 0.0, "mined": 0.0}

    # -- configuration ---------------------------------------------------------------------------------
    def set_weights(self, objective_cfg: ObjectiveConfig) -> None:
        """Take the weights of one stage's ``objective`` section."""
        w = objective_cfg.weights()
        if (w["instance_image"] or w["instance_text"]) and "instance" not in self.terms:
            raise ConfigError("objective.instance has a weight but no instance term was built")
        if w["mined"] and "mined" not in self.terms:
            raise ConfigError("objective.mined has a weight but no mined term was built")
        self.weights = w
        # the options that may also change per stage (the rest is fixed when the terms are built)
        if "instance" in self.terms:
            self.terms["instance"].dropout.p = float(objective_cfg.instance.dropout)
        if "mined" in self.terms:
            if "margin" in objective_cfg.mined:
                self.terms["mined"].margin = float(objective_cfg.mined["margin"])
            self.pool_size = objective_cfg.mined_pool_size

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
        tokens, lengths = pool.tokens(idx)
        pool_ids = pool.image_ids(idx).to(image_ids.device)
        model.eval()
        try:
            anchors = model.encode_images(images)
            candidates = model.encode_captions(tokens.to(images.device), lengths)
            scores = model.similarity(anchors.float(), candidates.float())
        finally:
            restore_mode()
        index, valid = mine_hard_negatives(scores, image_ids, pool_ids)
        return MinedNegatives(tokens[index.cpu()], lengths[index.cpu()], pool_ids[index], valid)

    # -- loss ------------------------------------------------------------------------------------------
    def forward(self, out: PairOutput, image_ids: Tensor, *, caption_vectors: Tensor | None = None,
                negatives: MinedNegatives | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """(total loss, {term: unweighted value}); ``image_ids`` are the training-corpus rows = instance labels."""
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
        if total is None:
            raise ConfigError("every objective weight is 0: nothing to train")
        return total, parts

    def _mined(self, out: PairOutput, image_ids: Tensor, negatives: MinedNegatives) -> Tensor:
        b = out.image_emb.shape[0]
        shift = max(1, b // 2)  # the negative image of anchor i: the batch slot half a batch away
        neg_images = out.image_emb.roll(shift, dims=0)
        valid = negatives.valid.to(image_ids.device) & (image_ids.roll(shift) != image_ids)
        return self.terms["mined"](out.image_emb, out.caption_emb, out.negative_emb, neg_images, valid)


def build_objective(stage_configs: list[RunConfig], rank_loss: RankingLoss, *, feature_dim: int,
                    num_images: int) -> Objective:
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
    objective = Objective(rank_loss, instance=instance, mined=mined, pool_size=pool_size)
    objective.set_weights(sections[0])
    return objective
