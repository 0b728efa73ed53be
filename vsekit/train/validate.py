"""Validation during training: the shared evaluator on the validation split, by ``eval.protocol``."""

from __future__ import annotations

import torch

from vsekit.config import RunConfig
from vsekit.data.corpus import Corpus
from vsekit.inference import Embedder
from vsekit.models.vse import VSEModel
from vsekit.text.vocab import Vocabulary


def validate(model: VSEModel, vocab: Vocabulary, cfg: RunConfig, corpus: Corpus, device: torch.device,
             train_captions: list[str] | None = None) -> dict[str, float]:
    """Retrieval metrics of ``model`` on ``corpus`` (the model is left in eval mode; the caller restores
    its training mode). Scores with the model's own similarity."""
    emb = Embedder(model, vocab, cfg, device, fingerprint="-")
    return emb.evaluate(corpus, cfg.eval.protocol, batch_size=cfg.eval.batch_size, chunk_size=cfg.eval.chunk_size,
                        train_captions=train_captions)
