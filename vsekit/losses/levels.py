"""Terms that apply a registered ranking loss to the embeddings: per embedding level (GXN:
``L = L_rank(v_h, t_h) + L_rank(v_l, t_l)``), or on their cosine (``objective.embedding``)."""

from __future__ import annotations

from typing import Annotated, Any

from torch import Tensor

from vsekit.data.batch import Batch
from vsekit.errors import ConfigError
from vsekit.losses.base import LOSSES, RankingLoss
from vsekit.losses.terms import OBJECTIVE_TERMS, ObjectiveTerm
from vsekit.models.similarity import SIMILARITIES
from vsekit.models.twolevel import level_similarities
from vsekit.registry import Component


@OBJECTIVE_TERMS.register("level_ranking")
class LevelRankingLoss(ObjectiveTerm):
    """The sum over levels of a ranking loss on each level's own similarity matrix.

    A two-level model (``model.image_encoder.name: two_level``) ranks by ``s = s_h + s_l``; GXN trains each
    level with its own hardest negatives, which this term does: ``loss`` (any ``LOSSES`` spec, default VSE++'s
    max of hinges at GXN's margin 0.05) on ``similarity(v_h, t_h)`` plus the same on ``(v_l, t_l)``. With
    ``objective.loss_weight: 0`` it replaces the ranking loss on the summed score; LSEH works here too (the
    batch's caption vectors are passed on).

    Example::

        objective: {loss_weight: 0, terms: {level_ranking: {weight: 1, loss: {name: hinge, margin: 0.05}}}}
    """

    def __init__(self, embed_size: int, vocab: Any = None, corpus: Any = None, feature_shape: Any = None,
                 loss: Annotated[dict[str, Any] | None, Component(LOSSES, default="hinge")] = None,
                 similarity: str = "order", levels: int = 2) -> None:
        super().__init__()
        spec = loss or {"name": "hinge", "margin": 0.05, "reduction": "max"}  # validated with the config
        if similarity not in SIMILARITIES:
            raise ConfigError(f"objective.terms.level_ranking.similarity: unknown similarity {similarity!r}")
        if levels < 1:
            raise ConfigError(f"objective.terms.level_ranking.levels: must be >= 1, got {levels}")
        self.loss = LOSSES.build(spec)
        self.similarity, self.levels = similarity, int(levels)
        self.requires_caption_vectors = bool(getattr(self.loss, "requires_caption_vectors", False))

    def set_epoch(self, epoch: int) -> None:
        self.loss.set_epoch(epoch)  # e.g. hinge_warmup: the sum of hinges first, then the max

    def forward(self, out: Any, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        sims = level_similarities(self.similarity, out.image_emb.float(), out.caption_emb.float(), self.levels)
        extra = {"caption_vectors": batch.caption_vectors} if self.requires_caption_vectors else {}
        values = [self.loss(s, batch.image_ids, **extra) for s in sims]
        total = values[0]
        for v in values[1:]:
            total = total + v
        return total, {f"level{k}_rank": v.detach() for k, v in enumerate(values)}


@OBJECTIVE_TERMS.register("embedding")
class EmbeddingRankingTerm(ObjectiveTerm):
    """``loss`` (a registered ranking loss) on ``image_emb @ caption_emb.T`` (cosine: the encoders L2-normalise),
    beside the ``loss:`` section on the model's own scores. For a model with a similarity network (SGRAF), whose
    loss trains only the network's scores, this is what trains the pooled embeddings that a search index
    shortlists with (``vsekit.index``)."""

    global_batch = True

    def __init__(self, embed_size: Any = None, vocab: Any = None, corpus: Any = None, feature_shape: Any = None,
                 loss: dict[str, Any] | None = None) -> None:
        super().__init__()
        spec = loss or {"name": "hinge", "margin": 0.2, "reduction": "sum"}
        self.loss = LOSSES.build(spec)
        if not isinstance(self.loss, RankingLoss):
            raise ConfigError(f"objective.embedding.loss {spec['name']!r} is not a ranking loss")
        self.requires_caption_vectors = self.loss.requires_caption_vectors

    def set_epoch(self, epoch: int) -> None:
        self.loss.set_epoch(epoch)

    def forward(self, out: Any, batch: Batch) -> Tensor:
        extra = {"caption_vectors": batch.caption_vectors} if self.requires_caption_vectors else {}
        return self.loss(out.image_emb.float() @ out.caption_emb.float().t(), batch.image_ids, **extra)
