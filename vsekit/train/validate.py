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


def summary(metrics: dict[str, float]) -> str:
    """The validation in a few words for the log: rsum and R@1, or mAP for a label-based protocol."""
    if "rsum" in metrics:
        return f"val rsum {metrics['rsum']:.2f} (R@1 i2t {metrics['i2t_r1']:.1f} t2i {metrics['t2i_r1']:.1f})"
    return f"val mAP {metrics['map_avg']:.4f} (i2t {metrics['i2t_map']:.4f}, t2i {metrics['t2i_map']:.4f})"
