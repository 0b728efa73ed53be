"""The caption term: a decoder generates the batch's captions from the image side of the forward pass.

GXN's image->text "imagine" path, and VSRN's caption-generation branch, as one registered objective term.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from vsekit.data.batch import Batch
from vsekit.errors import ConfigError
from vsekit.losses.terms import OBJECTIVE_TERMS, ObjectiveTerm
from vsekit.models.decoder import CaptionDecoder, Decoded
from vsekit.text.caption_metrics import MAX_TOKEN_ID, CiderD
from vsekit.text.tokenizer import tokenize

WHERE = "objective.terms.caption"


def reference_ids(captions: list[str], caption_to_image: np.ndarray, num_images: int, vocab: Any) -> list[list[list[int]]]:
    """Per image, its reference captions as token ids for CIDEr-D: vocabulary words by their ids, and each
    word outside the vocabulary by an id of its own above the vocabulary's (so a reference keeps its real
    n-grams, and a generated ``<unk>`` matches none of them). Beyond the 16-bit id range of the metric the
    rarest such words share its last id."""
    stoi, extra = vocab.stoi, {}
    next_id = len(vocab.itos)
    docs: list[list[list[int]]] = [[] for _ in range(num_images)]
    for caption, row in zip(captions, caption_to_image.tolist()):
        ids = []
        for w in tokenize(caption):
            i = stoi.get(w)
            if i is None:
                i = extra.get(w)
                if i is None:
                    i = extra[w] = min(next_id, MAX_TOKEN_ID)
                    next_id += 1
            ids.append(i)
        docs[row].append(ids)
    return docs


@OBJECTIVE_TERMS.register("caption")
class CaptionTerm(ObjectiveTerm):
    """A caption decoder's loss on the batch, from an image vector of the forward pass.

    **What it computes.** ``mode: xe``: the mean cross-entropy per token of the batch's own caption
    (``<start>`` excluded, ``<end>`` included) under teacher forcing. ``mode: scst`` (self-critical sequence
    training, Rennie et al. 2017): for each image, ``scst_samples`` captions w^s are sampled and one greedy
    caption ŵ is decoded (decoder in eval mode, no gradient); the reward r is CIDEr-D against **all** training
    references of the image (document frequencies of the training references), and the loss is
    ``-(r(w^s) - r(ŵ)) * sum_t log p(w^s_t)`` over the tokens up to and including the end token, averaged
    over the samples. The mean sample reward and the greedy reward are logged (``scst_reward``,
    ``scst_greedy_reward``).

    **The image vector** (``condition``): ``low`` the grounded half v_l of a two-level embedding
    (``image_emb[:, embed_size:]``, GXN), ``embedding`` the whole joint-space embedding, ``features`` the
    same before its L2 normalisation, ``context`` the mean of the encoder's (B, R, D) regions (VSRN).
    ``attention: true`` lets the decoder attend to those regions at every step. ``image_dim`` and
    ``context_dim`` say how wide they are when it is not ``embed_size``. ``detach_image: true`` keeps the
    decoder's gradients out of the image encoder (GXN and VSRN let them in). ``image_norm: batch`` standardises
    the image vector over the batch before the decoder reads it (:class:`CaptionDecoder`; the GXN recipes).

    **Requirements.** Token captions (not precomputed text features); for SCST, the training corpus (the
    trainer passes it). Options ``mode``, ``scst_samples`` and ``temperature`` may change per training stage.

    Relations: the ranking terms only see embeddings; this one shapes the image side through generation.

    Example (GXN: cross-entropy first, self-critical later; VSRN: cross-entropy from attended regions)::

        objective: {terms: {caption: {weight: 1, condition: low, mode: xe}}}
        train: {stages: [{epochs: 10, objective: {terms: {caption: {weight: 1, mode: scst}}}}]}
        objective: {terms: {caption: {weight: 1, condition: context, attention: true, mode: xe}}}
    """

    stage_keys = ("mode", "scst_samples", "temperature")

    def __init__(self, embed_size: int, vocab: Any = None, corpus: Any = None, feature_shape: Any = None,
                 condition: Literal["low", "embedding", "features", "context"] = "low",
                 image_dim: int | None = None, context_dim: int | None = None, hidden: int = 512,
                 word_dim: int = 300, cell: Literal["lstm", "gru"] = "lstm", attention: bool = False,
                 inject: Literal["init", "step", "both"] = "init", dropout: float = 0.0, max_len: int = 20,
                 mode: Literal["xe", "scst"] = "xe", scst_samples: int = 1, temperature: float = 1.0,
                 detach_image: bool = False, image_norm: Literal["none", "batch"] = "none") -> None:
        super().__init__()
        if vocab is None:
            raise ConfigError(f"{WHERE}: needs the run's vocabulary (captions as words)")
        for name, value in (("max_len", max_len), ("scst_samples", scst_samples), ("hidden", hidden),
                            ("word_dim", word_dim)):
            if value < 1:
                raise ConfigError(f"{WHERE}.{name}: must be >= 1, got {value}")
        if image_norm not in ("none", "batch"):
            raise ConfigError(f"{WHERE}.image_norm: 'none' or 'batch', got {image_norm!r}")
        if temperature <= 0:
            raise ConfigError(f"{WHERE}.temperature: must be > 0, got {temperature}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"{WHERE}.dropout: must be in [0, 1), got {dropout}")
        self.embed_size, self.condition = int(embed_size), condition
        self.attention, self.detach_image = bool(attention), bool(detach_image)
        self.max_len, self.mode = int(max_len), mode
        self.scst_samples, self.temperature = int(scst_samples), float(temperature)
        self.vocab, self.corpus = vocab, corpus
        ctx_dim = int(context_dim or embed_size)
        self.decoder = CaptionDecoder(len(vocab), int(image_dim or embed_size), hidden=hidden, word_dim=word_dim,
                                      cell=cell, context_dim=ctx_dim if attention else None, inject=inject,
                                      dropout=dropout, start_id=vocab.start_id, end_id=vocab.end_id,
                                      pad_id=vocab.pad_id, image_norm=image_norm)
        self._reward: CiderD | None = None

    # -- the image side --------------------------------------------------------------------------------
    def image_inputs(self, image_emb: Tensor, image_features: Tensor | None = None,
                     image_context: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """(image vector (B, image_dim), regions (B, R, D) or None) that the decoder reads, by ``condition``."""
        ctx = image_context
        if self.condition == "low":
            if image_emb.shape[1] != 2 * self.embed_size:
                raise ConfigError(f"{WHERE}.condition: 'low' reads the grounded half of a two-level embedding "
                                  f"({2 * self.embed_size} wide), but the image embedding is {image_emb.shape[1]} "
                                  "wide; use a two-level model or condition: embedding")
            vec = image_emb[:, self.embed_size:]
        elif self.condition == "embedding":
            vec = image_emb
        elif self.condition == "features":
            if image_features is None:
                raise ValueError("condition 'features' needs the image features of the forward pass")
            vec = image_features
        else:
            if ctx is None:
                raise ConfigError(f"{WHERE}.condition: 'context' needs an image encoder that returns regions "
                                  "beside its features (a region-reasoning encoder); this one returns none")
            vec = ctx.mean(1)
        if self.attention and ctx is None:
            raise ConfigError(f"{WHERE}.attention: needs an image encoder that returns regions (a context); "
                              "this one returns none")
        if vec.shape[1] != self.decoder.image_dim:
            raise ConfigError(f"{WHERE}.image_dim: the decoder reads {self.decoder.image_dim}-d image vectors, but "
                              f"condition {self.condition!r} gives {vec.shape[1]}-d ones; set image_dim: "
                              f"{vec.shape[1]}")
        if self.attention and ctx.shape[-1] != self.decoder.context_dim:
            raise ConfigError(f"{WHERE}.context_dim: the decoder attends to {self.decoder.context_dim}-d regions, "
                              f"but the encoder's are {ctx.shape[-1]}-d; set context_dim: {ctx.shape[-1]}")
        if not self.attention:
            ctx = None
        vec = vec.float()
        ctx = ctx.float() if ctx is not None else None
        if self.detach_image:
            vec = vec.detach()
            ctx = ctx.detach() if ctx is not None else None
        return vec, ctx

    # -- the objective ---------------------------------------------------------------------------------
    def forward(self, out: Any, batch: Batch) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        vec, ctx = self.image_inputs(out.image_emb, out.image_features, out.image_context)
        if self.mode == "xe":
            if len(batch.text) != 2:
                raise ConfigError(f"{WHERE}: the captions of this data set are feature vectors; a decoder needs "
                                  "words")
            return self.decoder.xe_loss(vec, batch.text[0].to(vec.device), ctx)
        return self._scst(vec, ctx, batch.image_ids)

    @property
    def reward(self) -> CiderD:
        """CIDEr-D over the training references, built once (at the first self-critical step)."""
        if self._reward is None:
            c = self.corpus
            if c is None:
                raise ConfigError(f"{WHERE}.mode: scst needs the training corpus (its references are the reward's)")
            self._reward = CiderD(reference_ids(c.captions, c.caption_to_image, c.num_images, self.vocab))
        return self._reward

    def rewards(self, decoded: Decoded, image_rows: Tensor) -> Tensor:
        """(N,) CIDEr-D of decoded captions against all training references of their images."""
        scores = self.reward.score_documents(decoded.words(self.vocab.end_id), image_rows.cpu().numpy())
        return torch.as_tensor(scores, dtype=torch.float32, device=decoded.tokens.device)

    def _scst(self, vec: Tensor, ctx: Tensor | None, image_rows: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        k = self.scst_samples
        # the greedy baseline and the samples read the same vector: with image_norm: batch, the baseline in eval
        # mode read the running statistics and the samples the batch's, so the advantage compared captions of two
        # different inputs (issue 25)
        vec = self.decoder.normalise(vec)
        was_training = self.decoder.training
        self.decoder.eval()  # the baseline is what the model decodes at test time (no dropout)
        try:
            with torch.no_grad():
                greedy = self.decoder.greedy(vec, ctx, self.max_len, normed=True)
        finally:
            self.decoder.train(was_training)
        r_greedy = self.rewards(greedy, image_rows)
        rep_vec = vec.repeat_interleave(k, 0)
        rep_ctx = ctx.repeat_interleave(k, 0) if ctx is not None else None
        samples = self.decoder.sample(rep_vec, rep_ctx, self.max_len, self.temperature, normed=True)
        r_sample = self.rewards(samples, image_rows.repeat_interleave(k))
        advantage = r_sample - r_greedy.repeat_interleave(k)
        loss = -(advantage * samples.sequence_logprob()).mean()
        return loss, {"scst_reward": r_sample.mean(), "scst_greedy_reward": r_greedy.mean()}
