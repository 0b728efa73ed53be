"""GXN's text-to-image path: a conditional GAN whose generator loss shapes the caption embedding.

Registered as the objective term ``gan`` (``objective.terms.gan``).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from vsekit.data.batch import Batch
from vsekit.data.images import IMAGENET_MEAN, IMAGENET_STD
from vsekit.errors import ConfigError
from vsekit.losses.terms import OBJECTIVE_TERMS, AuxiliaryUpdate, ObjectiveTerm
from vsekit.models.gan import (
    KL_REDUCTIONS,
    ConditioningAugmentation,
    ImageGenerator,
    MatchingDiscriminator,
    kl_to_standard_normal,
)

WHERE = "objective.terms.gan"


def to_generator_range(images: Tensor, size: int) -> Tensor:
    """The model's image batch (B, 3, H, W), normalised by the transform with the ImageNet mean and std, as
    the generator's images: the normalisation undone (x·std + mean, back in [0, 1]), mapped to [-1, 1]
    (tanh's range), resized to ``size`` x ``size`` (bilinear, antialiased) when it is not that already."""
    mean = images.new_tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
    x = (images.float() * std + mean) * 2.0 - 1.0
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.clamp(-1.0, 1.0)


def mismatched_partners(image_ids: Tensor) -> tuple[Tensor, Tensor]:
    """For each batch slot i, the first slot j after it (cyclically) whose image is another one, and whether
    one exists: (partner (B,), valid (B,)). Captions of the same image are never a mismatch."""
    b = image_ids.shape[0]
    dev = image_ids.device
    if b < 2:
        return torch.zeros(b, dtype=torch.long, device=dev), torch.zeros(b, dtype=torch.bool, device=dev)
    rows = torch.arange(b, device=dev)
    cand = (rows[:, None] + torch.arange(1, b, device=dev)[None, :]) % b  # (B, B-1): i+1, i+2, ...
    differs = image_ids[cand] != image_ids[:, None]
    first = differs.to(torch.uint8).argmax(dim=1)  # the first True (0 when there is none)
    return cand[rows, first], differs.any(dim=1)


@OBJECTIVE_TERMS.register("gan")
class TextToImageGAN(ObjectiveTerm):
    """GXN's "imagine, text to image": generate an image from the caption embedding, against a
    matching-aware discriminator, so that the generator's loss shapes the embedding.

    Computes, with t the caption's condition (``condition: low``: the grounded half t_l of a two-level caption
    embedding; ``embedding``: the whole embedding of a single-level model; read at unit coordinate scale, see
    :meth:`condition_of`):

    - conditioning augmentation ĉ ~ N(μ(t), diag σ²(t)) (:class:`~vsekit.models.gan.ConditioningAugmentation`);
    - the generator loss (this term's value, non-saturating)
      ``L_G = −log D(G(z, ĉ), t) + kl_weight · KL(N(μ, σ²) ‖ N(0, I))``, z ~ N(0, I) of ``z_dim``, with
      gradients into G, the conditioning augmentation and the text encoder (t is not detached; D's own
      parameters are not in the main optimizer);
    - the discriminator's loss (the auxiliary update ``discriminator``, its own optimizer via
      ``objective.terms.gan.optim``, on a detached forward pass, stepped before the generator loss):
      ``L_D = −log D(x, t) − w·log(1 − D(x, t')) − (1 − w)·log(1 − D(G(z, ĉ), t))`` with x the batch's real
      images, t' the condition of a caption of *another* image of the batch (:func:`mismatched_partners`), the
      generated images detached, and w = ``mismatch_weight`` (0.5: GAN-CLS / StackGAN's split).

    References: Gu et al., "Look, Imagine and Match", CVPR 2018 (the path); Zhang et al., StackGAN, ICCV 2017
    (stage I: conditioning augmentation, the generator and discriminator shapes, λ_KL = 2); Reed et al.,
    "Generative adversarial text to image synthesis", ICML 2016 (the matching-aware discriminator).

    Requirements: image pixels (``Batch.images`` is the model's input batch (B, 3, H, W), normalised by
    the transform; it is converted by :func:`to_generator_range`) -- precomputed features are refused. The
    batch's ``image_ids`` tell which captions belong to the same image.

    ``max_pairs``: only the first so many pairs of each batch go through the GAN (both players), to bound its
    cost on a CPU; null: the whole batch.

    Logged beside the term: ``gan_adv`` (−log D of the fakes), ``gan_kl``, and from the discriminator's step
    ``d_real_acc`` (matched real pairs called real), ``d_wrong_acc`` (mismatched pairs called fake),
    ``d_fake_acc`` (generated pairs called fake).

    Example::

        objective:
          terms:
            gan: {weight: 1.0, condition: low, gf_dim: 16, df_dim: 16, max_pairs: 32,
                  optim: {lr: 2.0e-4, betas: [0.5, 0.999]}}
    """

    def __init__(self, embed_size: int, vocab: Any = None, corpus: Any = None, feature_shape: Any = None,
                 condition: Literal["low", "embedding"] = "low", z_dim: int = 100, c_dim: int = 128,
                 gf_dim: int = 64, df_dim: int = 64, kl_weight: float = 2.0,
                 kl_reduction: Literal["dim_mean", "sum"] = "dim_mean", mismatch_weight: float = 0.5,
                 image_size: int = 64, max_pairs: int | None = None,
                 condition_norm: Literal["scale", "batch"] = "scale") -> None:
        super().__init__()
        if feature_shape is not None:
            raise ConfigError(f"{WHERE}: the text-to-image GAN needs image pixels to discriminate, but the training "
                              f"data are precomputed image features (shape {tuple(feature_shape)}); train it on "
                              "image files, or drop the term")
        for key, value in (("z_dim", z_dim), ("c_dim", c_dim), ("gf_dim", gf_dim), ("df_dim", df_dim)):
            if value < 1:
                raise ConfigError(f"{WHERE}.{key}: must be >= 1, got {value}")
        if image_size < 8 or image_size & (image_size - 1):
            raise ConfigError(f"{WHERE}.image_size: must be a power of two >= 8 (e.g. 64), got {image_size}")
        if not 0.0 <= mismatch_weight <= 1.0:
            raise ConfigError(f"{WHERE}.mismatch_weight: must be in [0, 1], got {mismatch_weight}")
        if kl_weight < 0:
            raise ConfigError(f"{WHERE}.kl_weight: must be >= 0, got {kl_weight}")
        if max_pairs is not None and max_pairs < 2:
            raise ConfigError(f"{WHERE}.max_pairs: must be >= 2 (or null: the whole batch), got {max_pairs}")
        if condition_norm not in ("scale", "batch"):
            raise ConfigError(f"{WHERE}.condition_norm: 'scale' or 'batch', got {condition_norm!r}")
        if kl_reduction not in KL_REDUCTIONS:
            raise ConfigError(f"{WHERE}.kl_reduction: one of {', '.join(KL_REDUCTIONS)}, got {kl_reduction!r}")
        self.embed_size, self.condition = int(embed_size), condition
        self.z_dim, self.image_size = int(z_dim), int(image_size)
        self.kl_weight, self.kl_reduction, self.mismatch_weight = float(kl_weight), kl_reduction, float(mismatch_weight)
        self.max_pairs = max_pairs
        self.condition_scale = math.sqrt(self.embed_size)
        if condition_norm == "batch":
            self.condition_norm = torch.nn.BatchNorm1d(self.embed_size, affine=False)
        self.augment = ConditioningAugmentation(self.embed_size, c_dim)
        self.generator = ImageGenerator(z_dim, c_dim, gf_dim, image_size)
        self.discriminator = MatchingDiscriminator(self.embed_size, c_dim, df_dim, image_size)

    # -- pieces ----------------------------------------------------------------------------------------
    def condition_of(self, caption_emb: Tensor) -> Tensor:
        """The text condition t of caption embeddings (B, D): t_l, or the whole embedding, times √embed_size.

        The embedding has unit norm, so its coordinates are about 1/√d: read as it is, the linear layers of the
        CA and of D (default initialisation, made for inputs of unit scale) turn it into codes of a few hundredths,
        buried under the CA's unit noise, and neither player sees the text for hundreds of steps (measured on the
        demo set: D's accuracy on mismatched pairs stayed near 0). Scaled by √d its coordinates are of unit scale.
        With ``condition_norm: batch`` each coordinate is standardised over the batch instead (batch norm without
        affine parameters): the embeddings of different captions share most of their direction (order
        embeddings in a narrow cone), and scaled as a whole only 12 % of the CA code's variance came from the
        text on the demo set, the rest from its noise."""
        width, e = caption_emb.shape[-1], self.embed_size
        if self.condition == "low":
            if width != 2 * e:
                raise ConfigError(f"{WHERE}.condition: 'low' reads the grounded half of a two-level caption "
                                  f"embedding (2 x {e} wide), but the model's caption embeddings are {width} wide; "
                                  "use condition: embedding for a single-level model")
            return self._normalised(caption_emb[..., e:].float())
        if width != e:
            raise ConfigError(f"{WHERE}.condition: 'embedding' reads a caption embedding of model.embed_size ({e}), "
                              f"but the model's are {width} wide; use condition: low for a two-level model")
        return self._normalised(caption_emb.float())

    def _normalised(self, t: Tensor) -> Tensor:
        return self.condition_norm(t) if hasattr(self, "condition_norm") else t * self.condition_scale

    def generate(self, t: Tensor, z: Tensor | None = None,
                 noise: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(images (B, 3, S, S) in [-1, 1], μ, log σ²) for conditions t; ``z`` and the augmentation's
        ``noise`` are drawn when not given."""
        c, mu, logvar = self.augment(t, noise)
        if z is None:
            z = torch.randn(t.shape[0], self.z_dim, device=t.device, dtype=c.dtype)
        return self.generator(z, c), mu, logvar

    def _pairs(self, n: int) -> slice:
        """The batch slots the GAN uses: the first ``max_pairs`` (a batch is a random sample already)."""
        return slice(0, n if self.max_pairs is None else min(n, self.max_pairs))

    def real_images(self, batch: Batch) -> Tensor:
        images = batch.images[self._pairs(batch.images.shape[0])]
        if images.dim() != 4 or images.shape[1] != 3:
            raise ConfigError(f"{WHERE}: needs the batch's images as pixels (B, 3, H, W), got shape "
                              f"{tuple(images.shape)}")
        return to_generator_range(images, self.image_size)

    # -- the two losses --------------------------------------------------------------------------------
    def forward(self, out: Any, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        cap = out.caption_emb
        t = self.condition_of(cap[self._pairs(cap.shape[0])])
        fake, mu, logvar = self.generate(t)
        logits = self.discriminator(fake, t)
        adv = F.softplus(-logits).mean()  # −log σ(logit): non-saturating
        kl = kl_to_standard_normal(mu, logvar, self.kl_reduction)
        return adv + self.kl_weight * kl, {"gan_adv": adv.detach(), "gan_kl": kl.detach()}

    def discriminator_loss(self, out: Any, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """The matching-aware discriminator's loss on real/matched, real/mismatched and generated pairs."""
        cap = out.caption_emb
        pairs = self._pairs(cap.shape[0])
        t = self.condition_of(cap[pairs]).detach()
        real = self.real_images(batch)
        with torch.no_grad():
            fake, _, _ = self.generate(t)
        d = self.discriminator
        code = d.encode(real)
        real_logits = d.logits(code, t)
        loss = F.softplus(-real_logits).mean()
        extra = {"d_real_acc": (real_logits > 0).float().mean()}
        partner, valid = mismatched_partners(batch.image_ids[pairs])
        w = self.mismatch_weight
        if w > 0 and bool(valid.any()):
            wrong_logits = d.logits(code[valid], t[partner[valid]])
            loss = loss + w * F.softplus(wrong_logits).mean()
            extra["d_wrong_acc"] = (wrong_logits < 0).float().mean()
        fake_logits = d(fake, t)
        loss = loss + (1.0 - w) * F.softplus(fake_logits).mean()
        extra["d_fake_acc"] = (fake_logits < 0).float().mean()
        return loss, {k: v.detach() for k, v in extra.items()}

    def auxiliary_updates(self) -> list[AuxiliaryUpdate]:
        return [AuxiliaryUpdate("discriminator", self.discriminator, self.discriminator_loss)]
