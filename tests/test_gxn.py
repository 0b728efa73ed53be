"""GXN's Look/Match part: two-level order embeddings, their summed score and the per-level ranking loss."""

from __future__ import annotations

import torch

from vsekit.config import resolve_config
from vsekit.data.batch import Batch
from vsekit.losses import LOSSES
from vsekit.losses.levels import LevelRankingLoss
from vsekit.models import SIMILARITIES, build_model
from vsekit.models.vse import PairOutput


def _order_brute(v: torch.Tensor, t: torch.Tensor) -> float:
    """-|| max(0, t - v) ||_2, one pair, coordinate by coordinate."""
    return -sum(max(0.0, float(tk) - float(vk)) ** 2 for vk, tk in zip(v, t)) ** 0.5


def test_two_level_order_is_the_sum_of_both_levels_brute_force():
    g = torch.Generator().manual_seed(0)
    img, cap = torch.rand(3, 8, generator=g), torch.rand(4, 8, generator=g)
    sim = SIMILARITIES.get("two_level_order")(img, cap)
    assert sim.shape == (3, 4)
    for i in range(3):
        for j in range(4):
            want = _order_brute(img[i, :4], cap[j, :4]) + _order_brute(img[i, 4:], cap[j, 4:])
            assert abs(float(sim[i, j]) - want) < 1e-5


def test_two_level_encoders_normalise_each_level_and_are_non_negative():
    torch.manual_seed(0)
    model = build_model({"embed_size": 6, "similarity": "two_level_order", "use_abs": True,
                         "image_encoder": {"name": "two_level", "encoder": {"name": "precomp"}},
                         "text_encoder": {"name": "two_level", "encoder": {"name": "gru", "word_dim": 5}}},
                        vocab_size=20, feature_shape=(4, 10))
    img, cap, sim = model(torch.randn(5, 4, 10), torch.randint(1, 20, (5, 7)), torch.tensor([7, 3, 5, 2, 1]))
    assert img.shape == cap.shape == (5, 12) and sim.shape == (5, 5)
    assert (img >= 0).all() and (cap >= 0).all()
    for x in (img, cap):
        torch.testing.assert_close(x[:, :6].norm(dim=1), torch.ones(5))
        torch.testing.assert_close(x[:, 6:].norm(dim=1), torch.ones(5))
    # the two text levels are separate GRUs; the image levels share the encoder but have their own head rows
    assert model.text_encoder.high.rnn.weight_ih_l0.data_ptr() != model.text_encoder.low.rnn.weight_ih_l0.data_ptr()
    sim.sum().backward()
    assert model.text_encoder.low.embed.weight.grad is not None and model.image_encoder.inner.head.weight.grad is not None


def test_a_two_level_text_encoder_keeps_its_inner_encoders_tokenizer(monkeypatch):
    from vsekit.models.text import GRUTextEncoder

    spec = {"embed_size": 6, "similarity": "two_level_order",
            "image_encoder": {"name": "two_level", "encoder": {"name": "precomp"}},
            "text_encoder": {"name": "two_level", "encoder": {"name": "gru", "word_dim": 5}}}
    assert build_model(spec, vocab_size=20, feature_shape=(4, 10)).text_encoder.tokenize is None
    monkeypatch.setattr(GRUTextEncoder, "tokenize", lambda self, caption, max_len=None: [len(caption)],
                        raising=False)
    hook = build_model(spec, vocab_size=20, feature_shape=(4, 10)).text_encoder.tokenize
    assert hook is not None and hook("a red circle") == [12]  # the inner encoder's pieces, not the vocabulary's


def test_level_ranking_is_the_loss_of_each_level_summed():
    torch.manual_seed(1)
    img, cap = torch.rand(6, 8).abs(), torch.rand(6, 8).abs()
    ids = torch.arange(6)
    term = LevelRankingLoss(embed_size=4, loss={"name": "hinge", "margin": 0.05})
    out = PairOutput(img, cap, torch.zeros(6, 6), img, cap)
    value, parts = term(out, Batch(img, (cap,), ids))
    order = SIMILARITIES.get("order")
    hinge = LOSSES.build({"name": "hinge", "margin": 0.05, "reduction": "max"})
    want = hinge(order(img[:, :4], cap[:, :4]), ids) + hinge(order(img[:, 4:], cap[:, 4:]), ids)
    torch.testing.assert_close(value, want)
    assert set(parts) == {"level0_rank", "level1_rank"}


def test_level_ranking_passes_the_epoch_to_its_loss_for_a_warm_up():
    torch.manual_seed(2)
    img, cap = torch.rand(6, 8).abs(), torch.rand(6, 8).abs()
    ids = torch.arange(6)
    term = LevelRankingLoss(embed_size=4, loss={"name": "hinge_warmup", "margin": 0.05, "warmup_epochs": 1})
    out = PairOutput(img, cap, torch.zeros(6, 6), img, cap)
    order = SIMILARITIES.get("order")
    for epoch, reduction in ((0, "sum"), (1, "max")):
        term.set_epoch(epoch)
        hinge = LOSSES.build({"name": "hinge", "margin": 0.05, "reduction": reduction})
        want = hinge(order(img[:, :4], cap[:, :4]), ids) + hinge(order(img[:, 4:], cap[:, 4:]), ids)
        torch.testing.assert_close(term(out, Batch(img, (cap,), ids))[0], want)


def test_gxn_embedding_demo_recipe_resolves_and_trains_a_step(tmp_path, cache):
    from vsekit.cli.common import recipe_path
    from vsekit.train.trainer import Trainer

    cfg = resolve_config(recipe_path("gxn_demo"), [f"output_dir={tmp_path}", "data.num_images=60",
                                                   "data.val_max_images=12", "train.epochs=2",
                                                   "train.max_steps_per_epoch=2", "train.progress=false",
                                                   "train.stages=[]", "objective.terms={}",
                                                   "objective.terms.level_ranking.weight=1",
                                                   "objective.terms.level_ranking.loss={name: hinge_warmup, "
                                                   "margin: 0.05, warmup_epochs: 1}"])
    t = Trainer(cfg)
    t.fit()
    assert "level_ranking" in t.last_parts and t.model.similarity_name == "two_level_order"
    assert t.objective.terms["level_ranking"].loss.epoch == 1  # the trainer's epoch reached the term's loss
