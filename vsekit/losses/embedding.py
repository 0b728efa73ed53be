"""The objective's term ``embedding``: a ranking loss on the cosine similarities of the embeddings.

Beside the ``loss:`` section on the model's own scores. For a model with a similarity network (SGRAF), whose
loss trains only the network's scores, this is what trains the pooled embeddings that a search index
shortlists with (``vsekit.index``). Config: ``objective.embedding: {weight, loss: <any LOSSES spec>}``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from vsekit.data.batch import Batch
from vsekit.errors import ConfigError
from vsekit.losses.base import LOSSES, RankingLoss
from vsekit.losses.terms import OBJECTIVE_TERMS, ObjectiveTerm


@OBJECTIVE_TERMS.register("embedding")
class EmbeddingRankingTerm(ObjectiveTerm):
    """``loss`` (a registered ranking loss) on ``image_emb @ caption_emb.T`` (cosine: the encoders L2-normalise)."""

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
