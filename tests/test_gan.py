"""GXN's text-to-image path: conditioning augmentation, generator, matching-aware discriminator, the ``gan``
objective term in the trainer (its own optimizer, stages, resume) and ``vsekit imagine``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _configs import tiny_config
from PIL import Image

from vsekit.checkpoint import load_checkpoint
from vsekit.cli import main
from vsekit.config import resolve_config
from vsekit.data.batch import Batch
from vsekit.data.images import IMAGENET_MEAN, IMAGENET_STD
from vsekit.errors import ConfigError
from vsekit.losses.gan import TextToImageGAN, mismatched_partners, to_generator_range
from vsekit.losses.terms import detached
from vsekit.models import build_model
from vsekit.models.gan import (
    ConditioningAugmentation,
    ImageGenerator,
    MatchingDiscriminator,
    kl_to_standard_normal,
)
from vsekit.models.vse import PairOutput
from vsekit.train.trainer import Trainer

# -- parts -----------------------------------------------------------------------------------------------


def test_kl_matches_the_closed_form_computed_by_hand():
    mu = torch.tensor([[0.5, -1.0], [0.0, 2.0]])
    logvar = torch.tensor([[0.0, math.log(4.0)], [-1.0, 0.5]])
    # ½ (μ² + σ² − 1 − log σ²) per dimension:
    # sample 1: ½(0.25 + 1 − 1 − 0) = 0.125;  ½(1 + 4 − 1 − ln 4) = 1.3068528
    # sample 2: ½(0 + e⁻¹ − 1 + 1) = 0.1839397;  ½(4 + e^0.5 − 1 − 0.5) = 2.0743606
    per_sample = [0.125 + 1.3068528, 0.1839397 + 2.0743606]
    assert float(kl_to_standard_normal(mu, logvar, "sum")) == pytest.approx(sum(per_sample) / 2, abs=1e-6)
    assert float(kl_to_standard_normal(mu, logvar, "dim_mean")) == pytest.approx(sum(per_sample) / 4, abs=1e-6)
    assert float(kl_to_standard_normal(torch.zeros(3, 5), torch.zeros(3, 5), "sum")) == 0.0
    with pytest.raises(ValueError, match="reduction"):
        kl_to_standard_normal(mu, logvar, "mean")


def test_conditioning_augmentation_samples_the_gaussian_it_parameterises():
    ca = ConditioningAugmentation(t_dim=3, c_dim=2)
    with torch.no_grad():  # μ = (1, −2), log σ² = (log 0.25, log 4), whatever t is
        ca.fc.weight.zero_()
        ca.fc.bias.copy_(torch.tensor([1.0, -2.0, math.log(0.25), math.log(4.0)]))
    t = torch.randn(20000, 3, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    c, mu, logvar = ca(t)
    torch.testing.assert_close(mu[0], torch.tensor([1.0, -2.0]))
    assert c.mean(0).tolist() == pytest.approx([1.0, -2.0], abs=0.04)
    assert c.std(0).tolist() == pytest.approx([0.5, 2.0], rel=0.03)
    c0, _, _ = ca(t[:4], noise=torch.zeros(4, 2))
    torch.testing.assert_close(c0, mu[:4])  # ε = 0: the mean
    c1, _, _ = ca(t[:1], noise=torch.tensor([[1.0, -1.0]]))  # μ + σ·ε
    torch.testing.assert_close(c1, torch.tensor([[1.5, -4.0]]))
    c1.sum().backward()  # reparameterised: the sample is differentiable in μ and log σ²
    assert ca.fc.bias.grad.tolist() == pytest.approx([1.0, 1.0, 0.5 * 0.5 * 1.0, 0.5 * 2.0 * -1.0])


def test_generator_and_discriminator_shapes_and_range():
    torch.manual_seed(0)
    g = ImageGenerator(z_dim=5, c_dim=3, gf_dim=2, image_size=64)
    x = g(torch.randn(4, 5), torch.randn(4, 3)).detach()
    assert x.shape == (4, 3, 64, 64) and float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    assert float(x.std()) > 0  # not a constant image
    d = MatchingDiscriminator(t_dim=6, c_dim=3, df_dim=2, image_size=64)
    assert d.encode(x).shape == (4, 16, 4, 4) and d(x, torch.randn(4, 6)).shape == (4,)
    assert ImageGenerator(5, 3, 2, image_size=16)(torch.randn(2, 5), torch.randn(2, 3)).shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="power of two"):
        ImageGenerator(5, 3, 2, image_size=48)


def test_real_images_are_unnormalised_to_the_generators_range_and_resized():
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, 3, 8, 8, generator=g)  # what ToTensor gives, in [0, 1]
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    normalised = (pixels - mean) / std  # what the model's transform gives
    torch.testing.assert_close(to_generator_range(normalised, 8), pixels * 2 - 1)
    flat = (torch.full((1, 3, 32, 32), 0.75) - mean) / std  # a flat image stays flat at the GAN's size
    small = to_generator_range(flat, 16)
    assert small.shape == (1, 3, 16, 16)
    torch.testing.assert_close(small, torch.full_like(small, 0.5))


def test_mismatched_partners_are_always_of_another_image():
    partner, valid = mismatched_partners(torch.tensor([3, 3, 5, 3, 7]))
    assert partner.tolist() == [2, 2, 3, 4, 0] and valid.all()
    partner, valid = mismatched_partners(torch.tensor([1, 1, 1]))
    assert not valid.any()
    partner, valid = mismatched_partners(torch.tensor([4]))
    assert partner.shape == (1,) and not valid.any()


# -- the term --------------------------------------------------------------------------------------------

E = 4  # embed_size per level


def _term(**kw) -> TextToImageGAN:
    opts = {"z_dim": 3, "c_dim": 3, "gf_dim": 2, "df_dim": 2, "image_size": 16, **kw}
    return TextToImageGAN(embed_size=E, **opts)


def _batch(b: int = 6, ids=(0, 0, 1, 2, 3, 3)):
    g = torch.Generator().manual_seed(3)
    images = torch.randn(b, 3, 32, 32, generator=g)
    cap = torch.rand(b, 2 * E, generator=g).requires_grad_(True)
    out = PairOutput(torch.rand(b, 2 * E, generator=g), cap, torch.zeros(b, b), torch.zeros(b, 2 * E),
                     torch.zeros(b, 2 * E))
    return out, Batch(images, (torch.ones(b, 3, dtype=torch.long), torch.full((b,), 3)), torch.tensor(ids))


def test_the_discriminator_sees_matched_mismatched_and_generated_pairs():
    torch.manual_seed(0)
    term = _term()
    out, batch = _batch()
    d = term.discriminator
    encoded, scored = [], []
    encode, logits = d.encode, d.logits

    def spy_encode(images):
        code = encode(images)
        encoded.append((images, code))
        return code

    def spy_logits(code, t):
        scored.append((code, t))
        return logits(code, t)

    d.encode, d.logits = spy_encode, spy_logits
    loss, extra = term.discriminator_loss(out, batch)  # the PairOutput as is: the term detaches t itself
    assert len(encoded) == 2 and len(scored) == 3
    (real, real_code), (fake, fake_code) = encoded
    torch.testing.assert_close(real, to_generator_range(batch.images, 16))
    assert fake.shape == real.shape and not fake.requires_grad  # generated, then detached
    t_l = out.caption_emb[:, E:].detach() * math.sqrt(E)  # the condition: t_l at unit coordinate scale
    (c1, t1), (c2, t2), (c3, t3) = scored
    assert c1 is real_code and torch.equal(t1, t_l)  # real image + its caption
    assert c3 is fake_code and torch.equal(t3, t_l)  # generated image + the caption it was made from
    # real image + the caption of another image of the batch: every slot has one here
    partner, valid = mismatched_partners(batch.image_ids)
    assert valid.all() and torch.equal(c2, real_code) and torch.equal(t2, t_l[partner])
    assert (batch.image_ids[partner] != batch.image_ids).all()
    assert set(extra) == {"d_real_acc", "d_wrong_acc", "d_fake_acc"}
    loss.backward()
    assert out.caption_emb.grad is None  # nothing reaches the text encoder from D's loss
    assert all(p.grad is None for m in (term.generator, term.augment) for p in m.parameters())
    assert all(p.grad is not None for p in d.parameters())


def test_max_pairs_sends_only_the_first_pairs_through_both_players():
    torch.manual_seed(0)
    term = _term(max_pairs=3)
    out, batch = _batch()  # 6 pairs, images of rows (0, 0, 1, 2, 3, 3)
    seen = []
    logits = term.discriminator.logits
    term.discriminator.logits = lambda code, t: seen.append((code.shape[0], t)) or logits(code, t)
    term.discriminator_loss(out, batch)
    assert [n for n, _ in seen] == [3, 3, 3]  # real, mismatched (every one of the 3 has a partner), generated
    t_l = out.caption_emb[:3, E:].detach() * math.sqrt(E)
    assert torch.equal(seen[0][1], t_l) and torch.equal(seen[1][1], t_l[[2, 2, 0]])
    seen.clear()
    value, _ = term(out, batch)
    value.backward()
    assert [n for n, _ in seen] == [3]
    grad = out.caption_emb.grad
    assert grad[:3, E:].abs().sum() > 0 and not grad[3:].any()
    with pytest.raises(ConfigError, match="max_pairs"):
        _term(max_pairs=1)


def test_mismatch_weight_zero_and_all_same_image_batches_skip_the_wrong_pairs():
    torch.manual_seed(0)
    out, batch = _batch(ids=(5, 5, 5, 5, 5, 5))  # nothing to mismatch with
    _, extra = _term().discriminator_loss(out, batch)
    assert "d_wrong_acc" not in extra
    out, batch = _batch()
    _, extra = _term(mismatch_weight=0.0).discriminator_loss(out, batch)
    assert "d_wrong_acc" not in extra


def test_one_discriminator_step_lowers_its_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    term = _term()
    out, batch = _batch()
    frozen = detached(out)
    opt = torch.optim.SGD(term.discriminator.parameters(), lr=0.05)
    torch.manual_seed(7)  # the same fakes before and after the step
    before, _ = term.discriminator_loss(frozen, batch)
    opt.zero_grad()
    before.backward()
    opt.step()
    torch.manual_seed(7)
    after, _ = term.discriminator_loss(frozen, batch)
    assert float(after.detach()) < float(before.detach())


def test_the_generator_loss_reaches_the_grounded_text_encoder_only():
    torch.manual_seed(0)
    model = build_model({"embed_size": E, "similarity": "two_level_order", "use_abs": True,
                         "image_encoder": {"name": "two_level", "encoder": {"name": "precomp"}},
                         "text_encoder": {"name": "two_level", "encoder": {"name": "gru", "word_dim": 5}}},
                        vocab_size=20, feature_shape=(4, 10))
    out = model.embed(torch.randn(3, 4, 10), (torch.randint(1, 20, (3, 6)), torch.tensor([6, 4, 2])))
    term = _term()
    images = torch.randn(3, 3, 16, 16)
    value, extra = term(out, Batch(images, (), torch.arange(3)))
    t_l = out.caption_emb[:, E:].detach()
    torch.testing.assert_close(term.condition_of(out.caption_emb).detach(), t_l * math.sqrt(E))
    kl = kl_to_standard_normal(*term.augment(t_l * math.sqrt(E))[1:], "dim_mean")
    assert float(extra["gan_kl"]) == pytest.approx(float(kl.detach()), abs=1e-6)
    torch.testing.assert_close(value.detach(), extra["gan_adv"] + 2.0 * extra["gan_kl"])
    value.backward()
    low, high = model.text_encoder.low, model.text_encoder.high
    assert low.rnn.weight_ih_l0.grad is not None and low.rnn.weight_ih_l0.grad.abs().sum() > 0  # shapes t_l
    assert all(p.grad is None or not p.grad.any() for p in high.parameters())  # t_h is not the condition
    assert all(p.grad is not None for m in (term.generator, term.augment) for p in m.parameters())


def test_the_condition_must_fit_the_embedding():
    out, batch = _batch()
    with pytest.raises(ConfigError, match="condition: 'embedding'.*use condition: low"):
        _term(condition="embedding")(out, batch)
    single = PairOutput(out.image_emb[:, :E], out.caption_emb[:, :E], out.sim, out.image_features[:, :E],
                        out.caption_features[:, :E])
    with pytest.raises(ConfigError, match="condition: 'low'.*use condition: embedding"):
        _term()(single, batch)
    value, _ = _term(condition="embedding")(single, batch)
    assert value.shape == ()


def test_precomputed_features_are_refused():
    with pytest.raises(ConfigError, match="objective.terms.gan: .*needs image pixels.*precomputed"):
        _term(feature_shape=(36, 3))


# -- in the trainer --------------------------------------------------------------------------------------

GAN = "{weight: 0.5, z_dim: 4, c_dim: 4, gf_dim: 2, df_dim: 2, image_size: 16, optim: {lr: 0.002, betas: [0.5, 0.999]}}"


def _cfg(out, *extra):
    return tiny_config(
        out, "seed=5", "data.num_images=60", "data.val_max_images=12",
        "model.embed_size=4", "model.similarity=two_level_order", "model.use_abs=true",
        "model.image_encoder={name: two_level, encoder: {name: cnn, backbone: small_cnn, pretrained: false, "
        "finetune: true, width: 4}}",
        "model.text_encoder={name: two_level, encoder: {name: gru, word_dim: 6}}",
        "transform.image_size=32", "transform.resize=32", "train.batch_size=12", "train.epochs=2",
        "train.max_steps_per_epoch=2", "optim.lr=1e-3", "eval.chunk_size=8", *extra)


def test_in_the_trainer_d_has_its_own_optimizer_and_g_is_in_the_main_one(tmp_path, cache):
    t = Trainer(_cfg(tmp_path / "a", f"objective.terms.gan={GAN}"))
    gan = t.objective.terms["gan"]
    main_ids = {id(p) for g in t.optim.optimizer.param_groups for p in g["params"]}
    assert not main_ids & {id(p) for p in gan.discriminator.parameters()}
    assert {id(p) for m in (gan.generator, gan.augment) for p in m.parameters()} <= main_ids
    opt = t.optim.aux["discriminator"].optimizer
    assert opt.param_groups[0]["lr"] == 0.002 and opt.param_groups[0]["betas"] == (0.5, 0.999)
    before = [p.detach().clone() for p in gan.discriminator.parameters()]
    t.fit()
    assert any(not torch.equal(a, b) for a, b in zip(before, gan.discriminator.parameters()))
    # D's loss and accuracies are logged beside the generator's loss
    assert {"gan", "gan_adv", "gan_kl", "discriminator", "d_real_acc", "d_wrong_acc", "d_fake_acc"} <= set(t.last_parts)


def test_a_stage_lr_mult_does_not_reach_the_discriminators_optimizer(tmp_path, cache):
    """The stage's optim.lr_mult names parameters of the model; the discriminator's optimizer is built over
    the stage's optim, and must neither fail on those names nor take their multipliers."""
    t = Trainer(_cfg(tmp_path / "a", f"objective.terms.gan={GAN}", "optim.lr_mult={objective.gan: 0.5}"))
    assert {g["lr"] for g in t.optim.aux["discriminator"].optimizer.param_groups} == {0.002}
    gen = {id(p) for p in t.objective.terms["gan"].generator.parameters()}
    assert all(g["lr"] == 5e-4 for g in t.optim.optimizer.param_groups if gen & {id(p) for p in g["params"]})


STAGES = ("train.epochs=3", f"objective.terms.gan={GAN}",
          "train.stages=[{name: warm, epochs: 1, objective: {terms: {gan: {weight: 0}}}},"
          "{name: joint, epochs: 2}]")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("full")
    full = Trainer(_cfg(out, *STAGES))
    full.fit()
    assert "discriminator" in full.last_parts and full.optim.stage == 1
    return load_checkpoint(out / "last.pt")


@pytest.mark.parametrize("killed_after", [1, 2])  # at the stage switch, and inside the joint stage
def test_warm_up_then_joint_resumes_bit_exactly(uninterrupted, killed_after, tmp_path, cache):
    killed = Trainer(_cfg(tmp_path / "b", *STAGES[1:], f"train.epochs={killed_after}"))
    gan = killed.objective.terms["gan"]
    before = [p.detach().clone() for p in gan.parameters()]
    killed.fit()
    if killed_after == 1:  # the warm-up alone: the GAN is off, neither D nor G takes a step
        assert all(torch.equal(a, b) for a, b in zip(before, gan.parameters()))
        assert "gan" not in killed.last_parts and "discriminator" not in killed.last_parts
    Trainer(_cfg(tmp_path / "b", *STAGES), resume=True).fit()
    a, b = uninterrupted, load_checkpoint(tmp_path / "b" / "last.pt")
    for part in ("model", "objective"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    sa, sb = (s["aux_optimizers"]["discriminator"]["optimizer"]["state"] for s in (a, b))
    assert sa and sa.keys() == sb.keys()
    assert all(torch.equal(sa[k][m], sb[k][m]) for k in sa for m in ("exp_avg", "exp_avg_sq"))


def test_the_trainer_refuses_a_gan_on_precomputed_features(tmp_path, cache):
    cfg = resolve_config(None, [f"output_dir={tmp_path}", "data.format=demo", "data.num_images=60", "data.regions=grid",
                                "model.embed_size=4", f"objective.terms.gan={GAN}"])
    with pytest.raises(ConfigError, match="needs image pixels.*precomputed image features"):
        Trainer(cfg)


def test_gan_options_are_checked_by_name():
    with pytest.raises(ConfigError, match="objective.terms.gan.z_dimm: unknown key; did you mean .*z_dim"):
        resolve_config(None, ["objective.terms.gan={weight: 1, z_dimm: 3}"])
    with pytest.raises(ConfigError, match="objective.terms.gan.condition"):
        resolve_config(None, ["objective.terms.gan={weight: 1, condition: high}"])


def test_gxn_recipes_warm_up_the_embedding_then_train_the_gan_with_the_ranking_loss():
    from vsekit.cli.common import recipe_path
    from vsekit.train.stages import StagePlan

    for name in ("gxn_demo", "gxn_coco", "gxn_f30k"):
        plan = StagePlan(resolve_config(recipe_path(name), ["output_dir=/nonexistent"]))
        first, last = plan.configs()[0].objective, plan.configs()[-1].objective
        assert first.term_weight("gan") == 0 and last.term_weight("gan") > 0, name
        assert first.term_weight("level_ranking") == last.term_weight("level_ranking") == 1.0, name
        optim = last.terms["gan"]["optim"]
        assert tuple(optim["betas"]) == (0.5, 0.999), name


# -- vsekit imagine --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("gan-run")
    Trainer(_cfg(out / "gan", f"objective.terms.gan={GAN}", "train.epochs=1")).fit()
    Trainer(_cfg(out / "plain", "train.epochs=1", "train.max_steps_per_epoch=1")).fit()
    Trainer(_cfg(out / "warm", *STAGES[1:], "train.epochs=1", "train.max_steps_per_epoch=1")).fit()
    return out


def _grid(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_imagine_writes_a_grid_deterministic_for_a_seed(trained, tmp_path, capsys):
    ckpt = str(trained / "gan" / "last.pt")
    texts = ["a red circle", "two blue squares left of a star"]
    paths = [tmp_path / f"{k}.png" for k in range(3)]
    for p, seed in zip(paths, (1, 1, 2)):
        assert main(["imagine", ckpt, *texts, "--n", "3", "--seed", str(seed), "--out", str(p), "--device", "cpu"]) == 0
    assert "wrote" in capsys.readouterr().out
    a, b, c = (_grid(p) for p in paths)
    assert a.shape == (2 * (16 + 2) + 2, 3 * (16 + 2) + 2, 3)  # rows = texts, 16 x 16 cells, 2-pixel borders
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a[0].max() == 0 and a[:, 0].max() == 0  # the border
    cell = a[2:18, 2:18]
    assert cell.std() > 0 and not np.array_equal(cell, a[2:18, 20:36])  # two samples of one text differ


def test_imagine_refuses_a_checkpoint_without_a_gan_and_bounds_its_input(trained, tmp_path, capsys):
    out = str(tmp_path / "x.png")
    assert main(["imagine", str(trained / "plain" / "last.pt"), "a red circle", "--out", out]) == 2
    assert "trained without a text-to-image GAN" in capsys.readouterr().err
    assert main(["imagine", str(trained / "warm" / "last.pt"), "a red circle", "--out", out]) == 2
    assert "saved after 1 epoch, before the GAN started training (stage 'joint', from epoch 2)" in capsys.readouterr().err
    ckpt = str(trained / "gan" / "last.pt")
    assert main(["imagine", ckpt, "a red circle", "--n", "65", "--out", out]) == 2
    assert "at most 64" in capsys.readouterr().err
    assert main(["imagine", ckpt, *["a circle"] * 33, "--out", out]) == 2
    assert "at most 32 texts" in capsys.readouterr().err
