"""Dual-Path CNN + instance loss: text CNN, shared classifier, hard-negative mining, stages, objective, end to end."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _configs import tiny_config

from vsekit.checkpoint import load_checkpoint
from vsekit.config import ConfigError, resolve_config, validate_config
from vsekit.inference import Embedder
from vsekit.losses import DualPathRankingLoss, InstanceLoss, mine_hard_negatives
from vsekit.models import build_model
from vsekit.models.textcnn import TextCNNEncoder
from vsekit.train.stages import StagePlan
from vsekit.train.trainer import Trainer


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared CPU the threads' waiting dominates."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


DEMO_RECIPE = Path(__file__).resolve().parents[1] / "vsekit" / "configs" / "dualpath_demo.yaml"


def tiny_textcnn(**kw) -> TextCNNEncoder:
    return TextCNNEncoder(vocab_size=40, embed_size=24, word_dim=12, width_mult=1 / 32, **kw)


# -- text CNN ----------------------------------------------------------------------------------------
def test_textcnn_shapes_and_strides():
    torch.manual_seed(0)
    enc = tiny_textcnn()
    assert [len(enc.blocks)] == [3 + 4 + 6 + 1]
    tokens = torch.randint(4, 40, (5, 9))
    lengths = torch.tensor([9, 4, 7, 2, 9])
    seen = []
    hooks = [b.register_forward_hook(lambda m, i, o: seen.append((o.shape[1], o.shape[2]))) for b in enc.blocks]
    seq = enc.sequence_features(tokens, lengths)
    for h in hooks:
        h.remove()
    widths = [8, 16, 32, 64]  # 256/512/1024/2048 at 1/32
    expected = [(widths[0], 32)] * 3 + [(widths[1], 16)] * 4 + [(widths[2], 8)] * 6 + [(widths[3], 8)]
    assert seen == expected  # 32 -> 16 -> 8: stride 2 at the first block of stages 2 and 3 only
    assert seq.shape == (5, 64, 8)
    out = enc(tokens, lengths)
    assert out.shape == (5, 24)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(5))
    out.sum().backward()
    assert enc.embed.weight.grad is not None and enc.blocks[0].conv2.weight.grad is not None


def test_textcnn_is_registered_and_builds_from_config():
    model = build_model({"embed_size": 16, "image_encoder": {"name": "cnn", "backbone": "small_cnn", "width": 4,
                                                            "head": "dualpath", "finetune": True},
                         "text_encoder": {"name": "textcnn", "word_dim": 8, "width_mult": 1 / 32}}, vocab_size=30)
    out = model.embed(torch.randn(3, 3, 32, 32), (torch.randint(4, 30, (3, 6)), torch.tensor([6, 3, 5])))
    assert out.sim.shape == (3, 3) and out.image_features.shape == out.caption_features.shape == (3, 16)
    assert (out.image_features >= 0).all()  # Dual-Path's f_img ends in ReLU
    torch.testing.assert_close(out.image_emb, F.normalize(out.image_features, dim=1))


def _placed(window: torch.Tensor, caption: torch.Tensor) -> int:
    """The offset of ``caption`` inside ``window`` (asserting it is there contiguously, zeros elsewhere)."""
    nz = torch.nonzero(window).flatten()
    start = int(nz[0])
    assert torch.equal(window[start:start + len(caption)], caption)
    assert int((window != 0).sum()) == len(caption)
    return start


def test_shift_augmentation_random_in_train_none_in_eval():
    enc = tiny_textcnn()
    caption = torch.tensor([1, 7, 8, 9, 2])
    tokens = caption.repeat(64, 1)
    lengths = torch.full((64,), 5)
    enc.train()
    torch.manual_seed(5)
    w1 = enc.window(tokens, lengths)
    offsets = [_placed(row, caption) for row in w1]
    assert len(set(offsets)) > 5 and min(offsets) >= 0 and max(offsets) <= 32 - 5
    torch.manual_seed(5)
    assert torch.equal(enc.window(tokens, lengths), w1)  # deterministic under the torch seed
    enc.eval()
    w2 = enc.window(tokens, lengths)
    assert all(_placed(row, caption) == 0 for row in w2)
    # variable lengths and padding: only the first `length` ids move; long captions are cut to the window
    tok = torch.tensor([[1, 5, 6, 2, 0, 0], [1, 9, 2, 0, 0, 0]])
    win = enc.window(tok, torch.tensor([4, 3]))
    assert win.shape == (2, 32) and torch.equal(win[0, :4], tok[0, :4]) and int((win[1] != 0).sum()) == 3
    long = torch.arange(1, 41).unsqueeze(0)
    assert torch.equal(enc.window(long, torch.tensor([40]))[0], torch.arange(1, 33))
    enc.train()
    torch.manual_seed(0)
    assert torch.equal(enc.window(long, torch.tensor([40]))[0], torch.arange(1, 33))  # no room to shift
    # eval-mode encoding does not depend on the RNG
    enc.eval()
    torch.manual_seed(1)
    a = enc(tok, torch.tensor([4, 3]))
    torch.manual_seed(2)
    torch.testing.assert_close(a, enc(tok, torch.tensor([4, 3])))


# -- instance loss -------------------------------------------------------------------------------------
def test_classifier_is_one_parameter_shared_by_both_paths():
    torch.manual_seed(0)
    loss_fn = InstanceLoss(in_dim=6, num_classes=50, dropout=0.0)
    params = list(loss_fn.parameters())
    assert len(params) == 2 and params[0] is loss_fn.classifier.weight  # one W, one b: nothing per path
    img, txt = torch.randn(4, 6), torch.randn(4, 6)
    labels = torch.tensor([1, 7, 7, 49])

    def grad_of(use_img: bool, use_txt: bool) -> torch.Tensor:
        loss_fn.zero_grad(set_to_none=True)
        l_img, l_txt = loss_fn.pair(img, txt, labels)
        (l_img * use_img + 0.1 * l_txt * use_txt).backward()
        return loss_fn.classifier.weight.grad.clone()

    g_img, g_txt, g_both = grad_of(True, False), grad_of(False, True), grad_of(True, True)
    assert g_img.abs().sum() > 0 and g_txt.abs().sum() > 0
    torch.testing.assert_close(g_both, g_img + g_txt)  # both paths' gradients land in the same tensor
    # fp32 logits even when the features are half precision
    assert loss_fn.logits(img.half()).dtype == torch.float32
    expected = F.cross_entropy(img @ loss_fn.classifier.weight.t() + loss_fn.classifier.bias, labels)
    torch.testing.assert_close(loss_fn(img, labels), expected)


# -- hard negatives and the Dual-Path ranking loss -----------------------------------------------------
def test_miner_picks_highest_scoring_caption_of_another_image():
    scores = torch.tensor([
        [0.9, 0.8, 0.1, 0.7, 0.2],   # anchor image 10: pool 0 is its own caption -> pool 1
        [0.3, 0.2, 0.6, 0.6, 0.9],   # anchor image 11: pool 4 is image 11 too -> tie 2/3 -> lowest index 2
        [0.5, 0.4, 0.3, 0.2, 0.1],   # anchor image 12: pool 0 (image 10) is the best
        [0.9, 0.1, 0.1, 0.1, 0.1],   # anchor image 10: pool 0 masked, 1..4 tie -> lowest index 1
    ])
    anchor_ids = torch.tensor([10, 11, 12, 10])
    pool_ids = torch.tensor([10, 13, 14, 15, 11])
    index, valid = mine_hard_negatives(scores, anchor_ids, pool_ids)
    assert index.tolist() == [1, 2, 0, 1] and valid.all()
    assert not (pool_ids[index] == anchor_ids).any()
    # a pool made only of the anchor's own captions gives no usable negative
    index, valid = mine_hard_negatives(torch.rand(2, 3), torch.tensor([4, 5]), torch.tensor([4, 4, 4]))
    assert valid.tolist() == [False, True]


def test_dualpath_ranking_loss_by_hand():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([[1.0, 0.0], [0.6, 0.8]])          # positives: 1.0, 0.8
    n = torch.tensor([[0.0, 1.0], [0.0, 1.0]])          # x·n: 0.0, 1.0
    z = torch.tensor([[0.0, 1.0], [1.0, 0.0]])          # y·z: 0.0, 0.6
    loss = DualPathRankingLoss(margin=1.0)
    # anchor 0: [1 - 1 + 0] + [1 - 1 + 0] = 0 ; anchor 1: [1 - .8 + 1] + [1 - .8 + .6] = 1.2 + 0.8 = 2
    torch.testing.assert_close(loss(x, y, n, z), torch.tensor((0 / 2 + 2 / 2) / 2))
    torch.testing.assert_close(loss(x, y, n, z, valid=torch.tensor([True, False])), torch.tensor(0.0))
    torch.testing.assert_close(DualPathRankingLoss(reduction="sum")(x, y, n, z), torch.tensor(1.0))


# -- the trainer: stages, objective, end to end --------------------------------------------------------
def tiny_dualpath_cfg(out, *extra, stage_epochs=(1, 1)):
    cfg = resolve_config(DEMO_RECIPE, [
        f"output_dir={out}", "seed=3", "data.num_images=120", "transform.image_size=32", "transform.resize=32",
        "data.val_max_images=20", "text.min_count=1", "model.embed_size=16", "model.image_encoder.width=4",
        "model.text_encoder.word_dim=8", "model.text_encoder.width_mult=0.03125", "objective.mined.pool_size=24",
        "train.batch_size=16", "train.max_steps_per_epoch=3", "train.progress=false", "eval.chunk_size=7",
        *extra]).to_dict()  # a plain dict the tests edit; the trainer validates it
    for stage, n in zip(cfg["train"]["stages"], stage_epochs):
        stage["epochs"] = n
    cfg["train"]["epochs"] = min(cfg["train"]["epochs"], sum(stage_epochs))
    return cfg


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _stage_two_trains_the_cnn(t, backbone, batches, before):
    """Stage II: the CNN is unfrozen at half the learning rate, the ranking term joins, and its weights move."""
    t.optim.apply_stage(1)
    assert backbone.training and all(p.requires_grad for p in backbone.parameters())
    assert {g["lr_mult"] for g in t.optim.optimizer.param_groups} == {0.5, 1.0}
    for b in batches:
        t.train_step(b)
    assert set(t.last_parts) == {"instance_image", "instance_text", "mined"}
    changed = _state(backbone)
    assert any(not torch.equal(before[k], changed[k]) for k in before if "running" not in k)


def test_stage_one_freezes_the_cnn_and_stage_two_trains_it(tmp_path, cache):
    cfg = tiny_dualpath_cfg(tmp_path / "run")
    cfg["train"]["stages"][0]["model"] = {"image_encoder": {"finetune": False}}  # the paper's stage I
    cfg["train"]["stages"][1]["optim"]["lr_mult"] = {"image_encoder.backbone": 0.5}
    t = Trainer(cfg)
    backbone = t.model.image_encoder.backbone
    before, head_before = _state(backbone), _state(t.model.image_encoder.head)
    assert any("running_mean" in k for k in before)
    batches = [b for _, b in zip(range(3), t.loader())]
    for b in batches:
        t.train_step(b)
    assert not backbone.training and t.model.image_encoder.head.training
    after = _state(backbone)
    for k in before:  # weights AND batch-norm running statistics untouched
        assert torch.equal(before[k], after[k]), k
    assert any(not torch.equal(head_before[k], v) for k, v in _state(t.model.image_encoder.head).items())
    assert set(t.last_parts) == {"instance_image", "instance_text"}

    _stage_two_trains_the_cnn(t, backbone, batches, before)
    changed = _state(backbone)
    assert any(not torch.equal(before[k], changed[k]) for k in before if "running_mean" in k)


def test_generic_freeze_prefixes_hold_bn_and_unfreeze_in_a_later_stage(tmp_path, cache):
    cfg = tiny_dualpath_cfg(tmp_path / "frz")
    cfg["train"]["stages"][0]["train"] = {"freeze": ["text_encoder.blocks", "objective.instance"]}
    t = Trainer(cfg)
    blocks, clf = t.model.text_encoder.blocks, t.objective.terms["instance"].classifier
    before, w = _state(blocks), clf.weight.detach().clone()
    for b in [b for _, b in zip(range(2), t.loader())]:
        t.train_step(b)
    assert not blocks.training and all(torch.equal(before[k], v) for k, v in _state(blocks).items())
    assert torch.equal(w, clf.weight) and not clf.weight.requires_grad
    t.optim.apply_stage(1)
    assert blocks.training and clf.weight.requires_grad
    cfg["train"]["stages"][0]["train"] = {"freeze": ["no_such_module"]}
    with pytest.raises(ValueError, match="no_such_module"):
        Trainer(cfg)


@pytest.mark.parametrize("loss", ["hinge", "lseh", "infonce"])
def test_instance_loss_combines_with_ranking_losses(tmp_path, cache, loss):
    cfg = tiny_config(
        tmp_path / loss, "seed=1", "data.num_images=120",
        "transform.image_size=32", "transform.resize=32", "data.val_max_images=20",
        "model.embed_size=16", "model.image_encoder.name=cnn", "model.image_encoder.backbone=small_cnn",
        "model.image_encoder.width=4", "model.image_encoder.finetune=true", "model.text_encoder.word_dim=8",
        f"loss.name={loss}", "objective.instance.image_weight=1.0", "objective.instance.text_weight=0.5",
        "objective.instance.dropout=0.2", "semantics.n_components=8", f"semantics.cache_dir={tmp_path / 'sem'}",
        "train.batch_size=16", "train.epochs=1", "train.max_steps_per_epoch=2")
    t = Trainer(cfg)
    assert t.objective.terms["instance"].num_classes == t.train_corpus.num_images
    names = [n for n, _ in t.optim.trainable.named_parameters()]
    assert names.count("objective.instance.classifier.weight") == 1
    result = t.fit()
    assert np.isfinite(result["best_rsum"])
    assert set(t.last_parts) == {"loss", "instance_image", "instance_text"}
    state = load_checkpoint(tmp_path / loss / "last.pt")
    assert state["objective"]["instance.classifier.weight"].shape == (t.train_corpus.num_images, 16)
    assert "stage" not in state  # no stages configured: the checkpoint keeps its old layout


def test_stage_config_errors():
    base = resolve_config(None, ["train.epochs=3"]).to_dict()
    ok = copy.deepcopy(base)
    ok["train"]["stages"] = [{"epochs": 1}, {"epochs": 2, "optim": {"lr": 0.1}}]
    plan = StagePlan(validate_config(ok))
    assert [plan.index_at(e) for e in range(4)] == [0, 1, 1, 1] and plan.config(1).optim.lr == 0.1
    assert plan.config(0).optim.lr == base["optim"]["lr"]
    for stages, match in [([{"epochs": 1}], "more than the stages"),
                          ([{"epochs": 3, "loss": {}}], r"train.stages\[0\].loss: unknown key"),
                          ([{"epochs": 3, "train": {"batch_size": 2}}], r"train.batch_size: unknown key.*freeze"),
                          ([{"epochs": 3, "model": {"embed_size": 2}}], r"model.embed_size: unknown key"),
                          ([{"epochs": 0}], r"train.stages\[0\].epochs: Input should be greater"),
                          ([{"epochs": 3, "optim": {"lrr": 2}}], r"train.stages\[0\].optim.lrr: unknown key; "
                                                                 r"did you mean train.stages\[0\].optim.lr\?")]:
        bad = copy.deepcopy(base)
        bad["train"]["stages"] = stages
        with pytest.raises(ConfigError, match=match):
            validate_config(bad)


def test_two_stage_demo_trains_end_to_end_and_resumes_exactly(tmp_path, cache):
    full = Trainer(tiny_dualpath_cfg(tmp_path / "a"))
    result = full.fit()
    state = load_checkpoint(tmp_path / "a" / "last.pt")
    assert state["stage"] == 1 and state["epoch"] == 2 and len(result["history"]) == 2
    assert np.isfinite(result["best_rsum"])
    assert state["objective"]["instance.classifier.weight"].shape[0] == full.train_corpus.num_images
    assert {g["lr"] for g in state["optimizer"]["param_groups"]} == {0.05}  # stage II rebuilt the optimizer

    Trainer(tiny_dualpath_cfg(tmp_path / "b", "train.epochs=1")).fit()  # stopped after stage I
    assert load_checkpoint(tmp_path / "b" / "last.pt")["stage"] == 0
    Trainer(tiny_dualpath_cfg(tmp_path / "b"), resume=True).fit()
    wa, wb = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    for k in wa["model"]:
        assert torch.equal(wa["model"][k], wb["model"][k]), k
    for k in wa["objective"]:
        assert torch.equal(wa["objective"][k], wb["objective"][k]), k
    assert [h["rsum"] for h in wa["history"]] == [h["rsum"] for h in wb["history"]]

    emb = Embedder.from_checkpoint(tmp_path / "a")
    vecs = emb.encode_texts(["a red circle", "two blue squares"])
    assert vecs.shape == (2, 16)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1, rtol=1e-5)


def test_a_timm_cnn_with_the_dualpath_head_is_frozen_in_stage_one_and_trained_in_stage_two(tmp_path, cache):
    """Dual-Path with a pretrained timm CNN (EfficientNet-Lite in benchmarks/pretrained_finetune.py) in place of
    ResNet-50: the timm encoder takes the Dual-Path head, and the stages freeze and unfreeze its trunk."""
    pytest.importorskip("timm")
    cfg = tiny_dualpath_cfg(tmp_path / "timm")
    cfg["model"]["image_encoder"] = {"name": "timm", "model": "test_efficientnet", "head": "dualpath",
                                     "finetune": False}
    cfg["train"]["stages"][1]["model"] = {"image_encoder": {"finetune": True}}
    cfg["train"]["stages"][1]["optim"]["lr_mult"] = {"image_encoder.backbone": 0.5}
    t = Trainer(cfg)
    enc = t.model.image_encoder
    assert not enc.normalize_backbone and isinstance(enc.head, torch.nn.Module) and hasattr(enc.head, "bn2")
    backbone = enc.backbone
    before = _state(backbone)
    batches = [b for _, b in zip(range(2), t.loader())]
    for b in batches:
        t.train_step(b)
    assert not backbone.training and all(not p.requires_grad for p in backbone.parameters())
    assert all(torch.equal(before[k], v) for k, v in _state(backbone).items())
    _stage_two_trains_the_cnn(t, backbone, batches, before)
    t.model.eval()
    with torch.no_grad():
        feats = enc.forward_features(torch.randn(3, 3, 32, 32))
    assert feats.shape == (3, 16) and (feats >= 0).all()  # Dual-Path's f_img ends in ReLU
    with pytest.raises(ValueError, match="dualpath"):
        build_model({"embed_size": 8, "image_encoder": {"name": "timm", "model": "test_efficientnet",
                                                        "head": "projector"}}, vocab_size=10)
