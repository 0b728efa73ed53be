"""Registered objective terms and auxiliary optimizers (vsekit.losses.terms) in the one trainer."""

from __future__ import annotations

import pytest
import torch
from _configs import tiny_config
from torch import nn

from vsekit.checkpoint import load_checkpoint
from vsekit.config import resolve_config
from vsekit.data.datasets import Skipped, collate_pairs
from vsekit.errors import ConfigError
from vsekit.losses import build_loss
from vsekit.losses.labels import LabelTripletLoss
from vsekit.losses.terms import OBJECTIVE_TERMS, AuxiliaryUpdate, ObjectiveTerm
from vsekit.train.objective import Objective
from vsekit.train.trainer import Trainer


class _Critic(ObjectiveTerm):
    """A toy adversarial term: a critic learns to tell image from caption embeddings (its own optimizer);
    the model is trained to fool it (the main loss), as a GAN's generator is."""

    stage_keys = ("scale",)

    def __init__(self, embed_size: int, vocab=None, corpus=None, feature_shape=None, hidden: int = 8,
                 scale: float = 1.0) -> None:
        super().__init__()
        self.critic = nn.Sequential(nn.Linear(embed_size, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.scale = scale
        self.critic_calls = 0

    def _logits(self, out):
        return self.critic(out.image_emb).squeeze(1), self.critic(out.caption_emb).squeeze(1)

    def forward(self, out, batch):
        img, cap = self._logits(out)  # the model wants the critic to call captions images
        value = nn.functional.binary_cross_entropy_with_logits(cap, torch.ones_like(cap))
        return self.scale * value, {"critic_img": img.mean()}

    def critic_loss(self, out, batch):
        assert not out.image_emb.requires_grad and not out.caption_emb.requires_grad  # a detached copy
        self.critic_calls += 1
        img, cap = self._logits(out)
        bce = nn.functional.binary_cross_entropy_with_logits
        return bce(img, torch.ones_like(img)) + bce(cap, torch.zeros_like(cap))

    def auxiliary_updates(self):
        return [AuxiliaryUpdate("critic", self.critic, self.critic_loss)]


if "toy_critic" not in OBJECTIVE_TERMS:
    OBJECTIVE_TERMS.register("toy_critic")(_Critic)


def _cfg(out, *extra):
    return tiny_config(
        out, "seed=5", "data.num_images=80", "data.regions=grid",
        "data.val_max_images=16", "model.embed_size=8", "model.text_encoder.word_dim=6",
        "train.batch_size=16", "train.epochs=2", "train.max_steps_per_epoch=3",
        "optim.lr=1e-3", "eval.chunk_size=8", *extra)


TERM = ("objective.terms.toy_critic.weight=0.5", "objective.terms.toy_critic.optim.lr=0.01",
        "objective.terms.toy_critic.optim.betas=[0.5,0.999]")


def test_the_auxiliary_part_has_its_own_optimizer_and_steps(tmp_path, cache):
    t = Trainer(_cfg(tmp_path / "a", *TERM))
    critic = t.objective.terms["toy_critic"].critic
    main_ids = {id(p) for g in t.optim.optimizer.param_groups for p in g["params"]}
    assert not main_ids & {id(p) for p in critic.parameters()}
    aux = t.optim.aux["critic"]
    assert aux.optimizer.param_groups[0]["lr"] == 0.01 and aux.optimizer.param_groups[0]["betas"] == (0.5, 0.999)
    before = [p.detach().clone() for p in critic.parameters()]
    t.fit()
    assert t.objective.terms["toy_critic"].critic_calls == 6
    assert any(not torch.equal(a, b) for a, b in zip(before, critic.parameters()))
    assert {"toy_critic", "critic", "critic_img"} <= set(t.last_parts)


def test_a_term_at_weight_zero_is_not_built_and_an_unknown_term_is_refused(tmp_path, cache):
    t = Trainer(_cfg(tmp_path / "a", "objective.terms.toy_critic.weight=0"))
    assert "toy_critic" not in t.objective.terms and not t.optim.aux
    with pytest.raises(ConfigError, match="objective.terms.toy_critik: unknown key: not a registered objective term.*toy_critic"):
        _cfg(tmp_path / "b", "objective.terms.toy_critik.weight=1")
    with pytest.raises(ConfigError, match="objective.terms.toy_critic.hiden"):
        _cfg(tmp_path / "b", "objective.terms.toy_critic.hiden=3")
    with pytest.raises(ConfigError, match="objective.terms.toy_critic.optim"):
        _cfg(tmp_path / "b", "objective.terms.toy_critic.optim.lr=-1")


STAGES = ("train.epochs=3", "train.stages=[{name: warm, epochs: 1, objective: {terms: {toy_critic: {weight: 0}}}},"
          "{name: joint, epochs: 2, objective: {terms: {toy_critic: {weight: 0.5, scale: 2.0}}}}]")


def test_stage_switching_and_auxiliary_optimizers_resume_bit_exactly(tmp_path, cache):
    full = Trainer(_cfg(tmp_path / "a", *STAGES))
    full.fit()
    assert full.objective.terms["toy_critic"].scale == 2.0
    Trainer(_cfg(tmp_path / "b", *STAGES[1:], "train.epochs=2")).fit()  # "killed" after epoch 2 (in stage 2)
    resumed = Trainer(_cfg(tmp_path / "b", *STAGES), resume=True)
    resumed.fit()
    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    for part in ("model", "objective"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    sa, sb = a["aux_optimizers"]["critic"]["optimizer"]["state"], b["aux_optimizers"]["critic"]["optimizer"]["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k]["exp_avg"], sb[k]["exp_avg"]) for k in sa)


def test_a_fixed_option_cannot_change_between_stages(tmp_path, cache):
    cfg = _cfg(tmp_path / "a", "train.epochs=2",
               "train.stages=[{epochs: 1, objective: {terms: {toy_critic: {weight: 1}}}},"
               "{epochs: 1, objective: {terms: {toy_critic: {weight: 1, hidden: 4}}}}]")
    with pytest.raises(ConfigError, match="objective.terms.toy_critic.hidden: cannot change between training stages"):
        Trainer(cfg).fit()


def test_every_term_is_registered_and_a_built_in_one_keeps_its_own_section():
    assert {"instance", "mined", "label", "triplet", "embedding", "adversarial", "caption", "gan",
            "level_ranking"} <= set(OBJECTIVE_TERMS.names())
    with pytest.raises(ConfigError, match="built-in term with a section of its own: set objective.label"):
        resolve_config(None, ["objective.terms.label.weight=1"])
    with pytest.raises(ConfigError, match=r"^objective.mined.name: unknown mined-negative loss 'other'"):
        resolve_config(None, ["objective.mined.name=other"])


def test_the_collate_fills_one_batch_that_every_term_reads():
    items = [(torch.zeros(3), torch.tensor([4, 5]), 2, 7), (torch.ones(3), torch.tensor([6]), 0, 1)]
    labels, vectors = torch.tensor([10, 11, 12]), torch.arange(16.0).reshape(8, 2)
    b = collate_pairs(items, labels=labels, caption_vectors=vectors)
    assert b.image_ids.tolist() == [2, 0] and b.caption_idx.tolist() == [7, 1] and b.labels.tolist() == [12, 10]
    assert torch.equal(b.caption_vectors, vectors[[7, 1]]) and b.text[1].tolist() == [2, 1] and len(b) == 2
    moved = b.to("cpu")
    assert moved.text[1].device.type == "cpu" and torch.equal(moved.images, b.images)
    assert b.gather() is b  # one process: the global batch is this one
    empty = collate_pairs([Skipped("x.jpg: unreadable")])
    assert empty.images is None and empty.skipped == ["x.jpg: unreadable"] and len(empty) == 0


def test_raw_space_triplets_under_distributed_training_fail_before_the_first_step():
    hinge = build_loss("hinge")
    with pytest.raises(ConfigError, match=r"^objective.triplet.mine_in: input .* distributed training"):
        Objective(hinge, {"triplet": LabelTripletLoss(mine_in="input")}).check_distributed()
    Objective(hinge, {"triplet": LabelTripletLoss()}).check_distributed()  # mined among the gathered embeddings
