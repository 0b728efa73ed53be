"""Measures of whether GXN's generative paths depend on their input (issue 25), on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from vsekit.eval.generative import diagonal_recall, distractor_rows, nearest_rows, r_precision
from vsekit.text.caption_metrics import distinct_share


def test_distinct_share_counts_captions_after_tokenising():
    assert distinct_share(["a red circle .", "A red  circle .", "a blue square", "two stars"]) == 3 / 4
    assert distinct_share(["woman"] * 5) == 1 / 5
    with pytest.raises(ValueError, match="no captions"):
        distinct_share([])


def test_diagonal_recall_by_hand_and_ties_count_against():
    scores = np.array([[0.9, 0.1, 0.2],    # query 0: its image first           -> rank 0
                       [0.8, 0.5, 0.1],    # query 1: one image above it        -> rank 1
                       [0.7, 0.6, 0.3]])   # query 2: two above                 -> rank 2
    assert diagonal_recall(scores, ks=(1, 2, 3)) == pytest.approx({"r1": 100 / 3, "r2": 200 / 3, "r3": 100.0})
    # a decoder writing one caption for every image: identical rows, all tied -> nothing ranked first
    assert diagonal_recall(np.ones((4, 4)), ks=(1, 4)) == {"r1": 0.0, "r4": 100.0}
    with pytest.raises(ValueError, match=">= 3 columns"):
        diagonal_recall(np.ones((3, 2)))


def test_r_precision_by_hand():
    scores = np.array([[0.5, 0.1, 0.2, 0.3],   # true first
                       [0.2, 0.1, 0.3, 0.0],   # a distractor above
                       [0.4, 0.4, 0.0, 0.0],   # a tie is a miss
                       [1.0, 0.9, 0.9, 0.9]])  # true first
    assert r_precision(scores) == 0.5
    with pytest.raises(ValueError, match="at least one distractor"):
        r_precision(np.ones((2, 1)))


def test_nearest_rows_by_cosine_not_distance():
    keys = np.array([[1.0, 0.0], [10.0, 10.0], [0.0, 1.0]])
    queries = np.array([[0.9, 0.1], [0.2, 0.2], [0.0, 3.0]])
    assert nearest_rows(queries, keys).tolist() == [0, 1, 2]  # [0.2, 0.2] is nearest to [10, 10] in angle


def test_distractors_are_captions_of_other_images_and_seeded():
    owners = np.array([0, 0, 1, 1, 2, 2, 3])
    d = distractor_rows(owners, 3, 4, seed=0)
    assert d.shape == (4, 3)
    for i, row in enumerate(d):
        assert len(set(row)) == 3 and not (owners[row] == i).any()
    assert np.array_equal(d, distractor_rows(owners, 3, 4, seed=0))
    with pytest.raises(ValueError, match="needs 6 captions of other images"):
        distractor_rows(owners, 6, 4)


# -- the mechanics: the generative paths read what tells their inputs apart ----------------------------------
def _cone(n: int, d: int, spread: float, seed: int = 0):
    """n order-embedding-like vectors: non-negative, unit, in a narrow cone (mean pairwise cosine ~0.997)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    common = torch.rand(d, generator=g)
    return torch.nn.functional.normalize((common + spread * torch.randn(n, d, generator=g)).abs(), dim=1)


def test_a_decoder_reading_a_narrow_cone_tells_its_images_apart_with_image_norm():
    """Four images whose vectors share 99.7 % of their direction, each with its own caption: after 300 steps the
    decoder with ``image_norm: batch`` writes each image's caption. (Reading the raw vectors, as before issue 25,
    it wrote one caption for all four.)"""
    import torch

    from vsekit.models.decoder import CaptionDecoder

    images = _cone(4, 32, 0.03)
    captions = torch.tensor([[1, 3, 4 + k, 8 + k, 2] for k in range(4)])  # <start> w w' w'' <end>
    torch.manual_seed(0)
    dec = CaptionDecoder(12, 32, hidden=16, word_dim=8, inject="both", image_norm="batch")
    opt = torch.optim.Adam(dec.parameters(), lr=5e-3)
    for _ in range(300):
        idx = torch.randint(4, (16,))
        loss = dec.xe_loss(images[idx], captions[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        got = dec.eval().greedy(images, max_len=5).tokens
    assert got.tolist() == captions[:, 1:].tolist()


def test_image_norm_makes_the_initial_state_depend_on_the_residual_not_the_common_direction():
    import torch

    from vsekit.models.decoder import CaptionDecoder

    images = _cone(64, 32, 0.03)
    spread = {}
    for norm in ("none", "batch"):
        torch.manual_seed(0)
        dec = CaptionDecoder(12, 32, hidden=16, word_dim=8, image_norm=norm)
        with torch.no_grad():
            h = dec.start(images)["h"]
        spread[norm] = float(h.std(0).mean() / h.abs().mean())
    assert spread["batch"] > 10 * spread["none"]
    with pytest.raises(ValueError, match="image_norm"):
        CaptionDecoder(12, 32, image_norm="layer")


def test_the_gan_condition_standardised_over_the_batch():
    import torch

    from vsekit.errors import ConfigError
    from vsekit.losses.gan import TextToImageGAN

    caps = torch.cat([torch.rand(32, 8), _cone(32, 8, 0.03)], dim=1)  # [t_h | t_l], t_l in a narrow cone
    scaled = TextToImageGAN(embed_size=8, z_dim=4, c_dim=4, gf_dim=2, df_dim=2, image_size=16)
    batch = TextToImageGAN(embed_size=8, z_dim=4, c_dim=4, gf_dim=2, df_dim=2, image_size=16, condition_norm="batch")
    t = batch.condition_of(caps)
    torch.testing.assert_close(t.mean(0), torch.zeros(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(t.std(0, unbiased=False), torch.ones(8), atol=0.05, rtol=0)  # BN eps
    s = scaled.condition_of(caps)
    assert float((s - s.mean(0)).norm(dim=1).mean() / s.norm(dim=1).mean()) < 0.1  # the old read: the common part
    with pytest.raises(ConfigError, match="condition_norm"):
        TextToImageGAN(embed_size=8, condition_norm="layer")


def test_gxn_recipes_normalise_both_conditions_and_the_demo_trains_on_whole_unflipped_images():
    from vsekit.cli.common import recipe_path
    from vsekit.config import resolve_config

    for recipe in ("gxn_demo", "gxn_f30k", "gxn_coco", "gxn_scratch_small"):
        terms = resolve_config(recipe_path(recipe), []).objective.terms
        assert terms["caption"]["image_norm"] == "batch" and terms["gan"]["condition_norm"] == "batch", recipe
    aug = resolve_config(recipe_path("gxn_demo"), []).transform.augment
    assert aug.crop == "center" and not aug.hflip


# -- the measures on a trained checkpoint ---------------------------------------------------------------------
def test_dependence_and_r_precision_of_a_trained_checkpoint(tmp_path, cache):
    from _configs import TINY_TWO_LEVEL, tiny_config

    from vsekit.captioning import Captioner
    from vsekit.data.sources import load_split
    from vsekit.imagine import Imaginer
    from vsekit.train.trainer import Trainer

    cfg = tiny_config(
        tmp_path, *TINY_TWO_LEVEL, "objective.terms.caption={weight: 1, hidden: 8, word_dim: 4, max_len: 6, "
        "image_norm: batch}",
        "objective.terms.gan={weight: 1, z_dim: 4, c_dim: 4, gf_dim: 2, df_dim: 2, image_size: 16, "
        "condition_norm: batch}")
    Trainer(cfg).fit()
    test, train = load_split(cfg.data, "test"), load_split(cfg.data, "train")
    dep = Captioner.from_checkpoint(tmp_path / "last.pt", device="cpu").dependence(test, train)
    n = dep["num_images"]
    assert n == test.num_images and 1 / n <= dep["distinct"] <= 1
    assert set(dep["retrieval"]) == {"r1", "r5", "r10"} and 0 <= dep["retrieval"]["r1"] <= dep["retrieval"]["r10"] <= 100
    for side in ("decoder", "nearest_neighbour"):
        assert 0 <= dep[side]["cider_d"] and dep[side]["num_images"] == n
    # the baseline's captions are training captions: its BLEU-1 against the test references is well above 0
    assert dep["nearest_neighbour"]["bleu1"] > 0.3
    rp = Imaginer.from_checkpoint(tmp_path / "last.pt", device="cpu").r_precision(test, distractors=9)
    assert rp["chance"] == 0.1 and rp["num_images"] == n and 0 <= rp["r_precision"] <= 1
