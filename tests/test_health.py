"""Training health: diagnostics, the collapse detector and its actions, the wall-clock budget, augmentation
options and the from-scratch model options (backbone_norm, GRU mean pooling)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_train import tiny_cfg
from torchvision import transforms

from vsekit.checkpoint import load_checkpoint
from vsekit.data.images import build_transform
from vsekit.inference import Embedder
from vsekit.losses import build_loss
from vsekit.models.image import CNNImageEncoder
from vsekit.models.text import GRUTextEncoder
from vsekit.train.monitor import (
    CollapseDetector,
    TrainingCollapsed,
    batch_diagnostics,
    collapse_value,
    mean_pairwise_cosine,
)
from vsekit.train.trainer import Trainer


# -- diagnostics ------------------------------------------------------------------------------------------
def test_mean_pairwise_cosine_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 5, generator=g)
    u = F.normalize(x, dim=1)
    brute = sum(float(u[i] @ u[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    assert float(mean_pairwise_cosine(x)) == pytest.approx(brute, abs=1e-6)
    assert float(mean_pairwise_cosine(torch.ones(4, 3))) == pytest.approx(1.0, abs=1e-6)
    assert math.isnan(float(mean_pairwise_cosine(torch.ones(1, 3))))


def test_batch_diagnostics_match_loops():
    g = torch.Generator().manual_seed(1)
    img, cap = F.normalize(torch.randn(5, 4, generator=g), dim=1), F.normalize(torch.randn(5, 4, generator=g), dim=1)
    ids = torch.tensor([0, 1, 1, 2, 3])  # slots 1 and 2: two captions of one image
    sim = img @ cap.T
    d = batch_diagnostics(sim, img, cap, ids)
    hard = []
    for i in range(5):
        hard.append(max(float(sim[i, j]) for j in range(5) if ids[j] != ids[i]))  # image i ranks captions
        hard.append(max(float(sim[j, i]) for j in range(5) if ids[j] != ids[i]))  # caption i ranks images
    assert d["pos_sim"] == pytest.approx(float(sim.diagonal().mean()), abs=1e-6)
    assert d["hardest_neg_sim"] == pytest.approx(sum(hard) / len(hard), abs=1e-6)
    assert d["image_mean_cos"] == pytest.approx(float(mean_pairwise_cosine(img)), abs=1e-6)


@pytest.mark.parametrize("spec, expected", [
    ({"name": "hinge", "margin": 0.2, "reduction": "max"}, 2 * 6 * 0.2),
    ({"name": "hinge", "margin": 0.2, "reduction": "sum"}, 2 * 6 * 5 * 0.2),
    ({"name": "hinge", "margin": 0.2, "reduction": "sum", "mask": "same_image"}, 2 * (30 - 2) * 0.2),
    ({"name": "infonce"}, math.log(6)),  # equal logits: cross-entropy log(B) both ways, whatever the temperature
])
def test_collapse_value_is_the_loss_of_a_constant_similarity(spec, expected):
    ids = torch.tensor([0, 1, 1, 2, 3, 4])
    loss = build_loss(spec)
    value = collapse_value(loss, torch.randn(6, 6), ids)
    assert value == pytest.approx(expected, rel=1e-6)


def test_detector_fires_on_a_collapsed_batch_and_not_on_a_healthy_one():
    loss = build_loss({"name": "hinge", "margin": 0.2, "reduction": "max"})
    b, dim = 32, 16
    ids = torch.arange(b)
    # collapsed: every embedding at (almost) one point
    point = F.normalize(torch.randn(1, dim), dim=1)
    img = F.normalize(point + 1e-4 * torch.randn(b, dim), dim=1)
    cap = F.normalize(point + 1e-4 * torch.randn(b, dim), dim=1)
    # healthy: positives aligned, negatives spread
    base = F.normalize(torch.randn(b, dim), dim=1)
    h_img, h_cap = base, F.normalize(base + 0.1 * torch.randn(b, dim), dim=1)
    for emb, fires in (((img, cap), True), ((h_img, h_cap), False)):
        sim = emb[0] @ emb[1].T
        d = batch_diagnostics(sim, emb[0], emb[1], ids)
        cv = collapse_value(loss, sim, ids)
        assert cv == pytest.approx(2 * b * 0.2)
        det = CollapseDetector(patience=3)
        fired = [det.update(float(loss(sim, ids)), cv, d["image_mean_cos"], d["caption_mean_cos"]) for _ in range(3)]
        assert fired == [False, False, fires]
    # a healthy step resets the streak
    det = CollapseDetector(patience=2)
    assert not det.update(2 * b * 0.2, 2 * b * 0.2, 0.1, 0.1)
    assert not det.update(1.0, 2 * b * 0.2, 0.1, 0.1)
    assert not det.update(2 * b * 0.2, 2 * b * 0.2, 0.1, 0.1)


# -- the trainer's actions ----------------------------------------------------------------------------------
ALWAYS = ["train.collapse.patience=2", "train.collapse.max_mean_cos=-2.0"]  # every step counts as collapsed


def _records(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_fallback_switches_to_sum_and_lowers_the_lr(tmp_path, cache):
    run = tmp_path / "fb"
    cfg = tiny_cfg(run, *ALWAYS, "train.collapse.action=fallback", "train.collapse.max_fallbacks=1",
                   "train.epochs=1", "train.max_steps_per_epoch=3", "optim.lr_decay_every=null")
    t = Trainer(cfg)
    assert t.loss_fn.reduction == "max"
    t.fit()
    events = [r for r in _records(run) if r["kind"] == "collapse"]
    assert events[0]["action"] == "fallback" and events[0]["step"] == 2
    assert events[0]["sum_of_hinges_until_epoch"] == 2 and events[0]["lr"] == pytest.approx(1e-4)
    assert t.loss_fn.reduction_now("max") == "sum"  # epoch 0 < 2
    state = load_checkpoint(run / "last.pt")
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-4)
    assert state["monitor"]["sum_until_epoch"] == 2
    # restored on resume
    t2 = Trainer(cfg, resume=True)  # the same config: a resume may not change the schedule
    assert t2.loss_fn.sum_until_epoch == 2 and len(t2.health.detector.events) == 1


# the loss pinned at its collapse value, the embeddings spread: a suspected collapse, judged by validation
PINNED = ["train.collapse.patience=2", "train.collapse.loss_tol=1e9", "train.collapse.max_mean_cos=1.0",
          "train.collapse.action=fallback", "optim.lr_decay_every=null", "train.epochs=3",
          "train.max_steps_per_epoch=3"]


def _chance(t):
    from vsekit.eval.chance import chance_rsum

    return chance_rsum(t.val_corpus.caption_to_image, t.val_corpus.num_images)


def _scripted_validation(t, values):
    """Replace the trainer's validation by a script of rsum values, one per epoch."""
    it = iter(values)

    def fake():
        v = next(it)
        return {"rsum": v, "i2t_r1": 0.0, "t2i_r1": 0.0}

    t.validate = fake


def test_a_pinned_loss_while_validation_rises_is_a_plateau_not_a_collapse(tmp_path, cache):
    run = tmp_path / "plateau"
    t = Trainer(tiny_cfg(run, *PINNED))
    floor = 3 * _chance(t)  # about 3 x 150 on 20 images of 5 captions
    _scripted_validation(t, [floor + 1, floor + 2, floor + 3])  # learning from the first validation
    t.fit()
    events = [r for r in _records(run) if r["kind"] == "collapse"]
    assert [e["action"] for e in events] == ["none", "none", "none"]  # one suspicion per epoch, each dismissed
    assert events[1]["best_before"] == floor + 1 and events[1]["validation"] == floor + 2
    assert t.loss_fn.reduction_now("max") == "max" and t.optim.base_lr() == pytest.approx(1e-3)


def test_a_pinned_loss_without_progress_falls_back_after_the_validation(tmp_path, cache):
    run = tmp_path / "stalled"
    t = Trainer(tiny_cfg(run, *PINNED))
    floor = 3 * _chance(t)
    _scripted_validation(t, [floor + 10, floor, floor])  # epoch 2 falls below epoch 1's best
    t.fit()
    events = [r for r in _records(run) if r["kind"] == "collapse"]
    assert [e["action"] for e in events][:2] == ["none", "fallback"]
    fb = events[1]
    assert fb["epoch"] == 1 and fb["validation"] == floor and fb["best_before"] == floor + 10
    assert fb["sum_of_hinges_until_epoch"] == 3 and fb["lr"] == pytest.approx(1e-4)  # decided at epoch 2's end


def test_a_first_validation_near_chance_confirms_the_collapse(tmp_path, cache):
    run = tmp_path / "chance"
    t = Trainer(tiny_cfg(run, *PINNED, "train.collapse.action=stop"))
    _scripted_validation(t, [3 * _chance(t) - 1])  # no earlier validation, and under 3 x chance
    with pytest.raises(TrainingCollapsed, match="collapse"):
        t.fit()
    assert [r["action"] for r in _records(run) if r["kind"] == "collapse"] == ["stop"]
    assert load_checkpoint(run / "last.pt")["epoch"] == 1  # the epoch it validated is kept


def test_a_suspected_collapse_survives_a_resume(tmp_path, cache):
    run = tmp_path / "resume"
    t = Trainer(tiny_cfg(run, *PINNED, "train.epochs=1", "train.max_steps_per_epoch=3"))
    t.health.detector.update(1.0, 1.0, 0.1, 0.1)
    t.health.detector.pending = {"epoch": 0, "step": 2, "loss": 1.0, "collapse_value": 1.0, "image_mean_cos": 0.1,
                          "caption_mean_cos": 0.1, "best_before": 12.5}
    t.save("last.pt")
    t2 = Trainer(tiny_cfg(run, *PINNED, "train.epochs=1", "train.max_steps_per_epoch=3"), resume=True)
    assert t2.health.detector.pending == t.health.detector.pending and t2.health.detector.streak == 1


def test_stop_action_saves_and_says_what_to_change(tmp_path, cache, capsys):
    from vsekit.cli import main

    run = tmp_path / "stop"
    with pytest.raises(TrainingCollapsed, match="warmup"):
        Trainer(tiny_cfg(run, *ALWAYS, "train.collapse.action=stop")).fit()
    assert load_checkpoint(run / "last.pt")["step"] == 2
    rc = main(["train", str(tmp_path / "none.yaml")] if False else [
        "train", "demo_vsepp", f"output_dir={tmp_path / 'cli'}", "data.num_images=60", "transform.image_size=32",
        "transform.resize=32", "data.val_max_images=10", "model.embed_size=16", "model.image_encoder.width=4",
        "model.text_encoder.word_dim=8", "train.batch_size=8", "train.progress=false", *ALWAYS,
        "train.collapse.action=stop"])
    assert rc == 3
    assert "collapsed" in capsys.readouterr().err


def test_warn_action_only_logs(tmp_path, cache):
    run = tmp_path / "warn"
    a = Trainer(tiny_cfg(run, *ALWAYS, "train.collapse.action=warn"))
    a.fit()
    assert {r["action"] for r in _records(run) if r["kind"] == "collapse"} == {"warn"}
    b = Trainer(tiny_cfg(tmp_path / "off", "train.collapse.action=off"))
    b.fit()
    wa, wb = load_checkpoint(run / "last.pt")["model"], load_checkpoint(tmp_path / "off" / "last.pt")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # warning changes nothing


def test_epoch_diagnostics_are_logged(tmp_path, cache):
    run = tmp_path / "diag"
    Trainer(tiny_cfg(run, "train.log_every=1")).fit()
    recs = _records(run)
    val = [r for r in recs if r["kind"] == "val"][0]
    for k in ("train_pos_sim", "train_hardest_neg_sim", "train_image_mean_cos", "train_caption_mean_cos"):
        assert -1.0 <= val[k] <= 1.0
    step = [r for r in recs if r["kind"] == "train"][0]
    assert step["collapse_value"] == pytest.approx(2 * 16 * 0.2)


# -- wall-clock budget --------------------------------------------------------------------------------------
def test_max_minutes_stops_with_a_valid_checkpoint(tmp_path, cache):
    run = tmp_path / "time"
    result = Trainer(tiny_cfg(run, "train.max_minutes=0.0001")).fit()
    assert result["stopped_by"] == "max_minutes"
    state = load_checkpoint(run / "last.pt")
    assert state["epoch"] == 0 and state["elapsed_s"] > 0
    vals = [r for r in _records(run) if r["kind"] == "val"]
    assert vals and vals[0]["partial_epoch"] is True
    emb = Embedder.from_checkpoint(run / "best.pt")
    assert emb.encode_texts(["a red circle"]).shape == (1, 16)


def test_time_stop_then_resume_equals_uninterrupted(tmp_path, cache, monkeypatch):
    Trainer(tiny_cfg(tmp_path / "a")).fit()
    cfg = tiny_cfg(tmp_path / "b", "train.max_minutes=60")
    t = Trainer(cfg)
    monkeypatch.setattr(Trainer, "out_of_time", lambda self: self.step >= 7)  # budget ends in epoch 2
    assert t.fit()["stopped_by"] == "max_minutes"
    state = load_checkpoint(tmp_path / "b" / "last.pt")
    assert (state["epoch"], state["batches_done"]) == (1, 2)
    monkeypatch.setattr(Trainer, "out_of_time", lambda self: False)
    Trainer(cfg, resume=True).fit()
    wa, wb = load_checkpoint(tmp_path / "a" / "last.pt")["model"], load_checkpoint(tmp_path / "b" / "last.pt")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_max_minutes_must_be_positive(tmp_path, cache):
    with pytest.raises(ValueError, match="max_minutes"):
        Trainer(tiny_cfg(tmp_path / "x", "train.max_minutes=0"))


# -- augmentation -------------------------------------------------------------------------------------------
def _types(tf):
    return [type(t) for t in tf.transforms]


def test_default_augmentation_is_vsepp():
    tf = build_transform(True, 64)
    crop = tf.transforms[0]
    assert isinstance(crop, transforms.RandomResizedCrop) and crop.scale == (0.08, 1.0)
    assert crop.ratio == pytest.approx((0.75, 4 / 3))
    assert transforms.RandomHorizontalFlip in _types(tf) and transforms.ColorJitter not in _types(tf)


def test_each_augmentation_option_changes_the_transform():
    crop = build_transform(True, 64, augment={"scale": [0.8, 1.0], "ratio": [1.0, 1.0]}).transforms[0]
    assert (crop.scale, crop.ratio) == ((0.8, 1.0), (1.0, 1.0))
    assert transforms.RandomHorizontalFlip not in _types(build_transform(True, 64, augment={"hflip": False}))
    jitter = build_transform(True, 64, augment={"color_jitter": 0.4}).transforms[2]
    assert isinstance(jitter, transforms.ColorJitter) and jitter.brightness == (0.6, 1.4)
    rnd = build_transform(True, 64, resize=72, augment={"crop": "random"})
    assert _types(rnd)[:2] == [transforms.Resize, transforms.RandomCrop] and rnd.transforms[0].size == 72
    # crop=center without flips is exactly the evaluation transform
    im = Image.radial_gradient("L").convert("RGB").resize((80, 50))
    same = build_transform(True, 32, resize=40, augment={"crop": "center", "hflip": False})
    assert torch.equal(same(im), build_transform(False, 32, resize=40)(im))


def test_square_resize_keeps_the_whole_image():
    im = Image.new("RGB", (100, 50), (255, 255, 255))
    im.paste((255, 0, 0), (0, 0, 10, 50))  # a red strip at the far left
    square = build_transform(False, 32, resize_policy="square")(im)
    cropped = build_transform(False, 32)(im)
    assert square.shape == cropped.shape == (3, 32, 32)
    # red has no green: the green channel of a red pixel normalises far below 0, white's far above
    assert square[1, 16, 0] < -1.0  # the strip survives a square resize ...
    assert cropped[1].min() > 1.0  # ... but not the short-side resize + centre crop


@pytest.mark.parametrize("augment, match", [
    ({"scal": [0.5, 1.0]}, "transform.augment.scal"),
    ({"crop": "zoom"}, "transform.augment.crop"),
    ({"scale": [0.5, 1.5]}, "at most 1.0"),
    ({"scale": [0.9, 0.5]}, "transform.augment.scale"),
    ({"hflip": "maybe"}, "transform.augment.hflip"),
    ({"color_jitter": 2}, "transform.augment.color_jitter"),
])
def test_bad_augmentation_options_name_the_key(augment, match):
    with pytest.raises(ValueError, match=match):
        build_transform(True, 64, augment=augment)


def test_augmentation_reaches_the_trainer(tmp_path, cache):
    t = Trainer(tiny_cfg(tmp_path / "aug", "transform.augment.crop=center", "transform.augment.hflip=false"))
    tf = t.dataset.images.transform
    assert transforms.RandomResizedCrop not in _types(tf) and transforms.RandomHorizontalFlip not in _types(tf)


# -- model options for training from scratch -------------------------------------------------------------------
def test_backbone_norm_option():
    torch.manual_seed(0)
    x = torch.randn(3, 3, 32, 32)
    on = CNNImageEncoder(embed_size=8, backbone="small_cnn", width=4).eval()
    off = CNNImageEncoder(embed_size=8, backbone="small_cnn", width=4, backbone_norm=False).eval()
    off.load_state_dict(on.state_dict())
    feats = on.backbone(x)
    assert torch.allclose(on.forward_features(x), on.head(F.normalize(feats, dim=1)), atol=1e-6)
    assert torch.allclose(off.forward_features(x), off.head(feats), atol=1e-6)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_gru_mean_pooling_matches_unpadded_loop(bidirectional):
    torch.manual_seed(0)
    enc = GRUTextEncoder(vocab_size=20, embed_size=6, word_dim=5, bidirectional=bidirectional, pooling="mean")
    tokens = torch.tensor([[3, 4, 5, 6], [7, 8, 0, 0], [9, 0, 0, 0]])
    lengths = torch.tensor([4, 2, 1])
    got = enc.forward_features(tokens, lengths)
    for i, n in enumerate(lengths.tolist()):
        out, _ = enc.rnn(enc.embed(tokens[i: i + 1, :n]))
        if bidirectional:
            out = (out[..., :6] + out[..., 6:]) / 2
        assert torch.allclose(got[i], out[0].mean(0), atol=1e-6)
    with pytest.raises(ValueError, match="pooling"):
        GRUTextEncoder(vocab_size=5, pooling="max")


def test_scratch_small_recipe_trains(tmp_path, cache):
    from _configs import small_recipe_config

    cfg = small_recipe_config("scratch_small", tmp_path / "scratch", "data.format=demo", "data.num_images=120",
                              "data.val_max_images=20", "train.batch_size=16", "train.epochs=1",
                              "train.max_steps_per_epoch=3")
    t = Trainer(cfg)
    types = _types(t.dataset.images.transform)
    assert transforms.RandomResizedCrop not in types and transforms.RandomCrop not in types
    assert t.model.text_encoder.pooling == "mean" and t.model.text_encoder.bidirectional
    assert (cfg.loss["name"], cfg.loss["mask"]) == ("infonce", "same_image")
    assert t.fit()["best_rsum"] > 0


# -- non-finite steps and unreadable images met in training --------------------------------------------------
def test_a_nonfinite_loss_is_skipped_reported_and_stops_the_run(tmp_path, cache):
    from vsekit.errors import TrainingDiverged

    run = tmp_path / "nan"
    t = Trainer(tiny_cfg(run, "train.epochs=1", "train.max_steps_per_epoch=4", "train.max_nonfinite_steps=3",
                         "train.log_every=1"))
    real = t.objective.forward
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        loss, parts = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] >= 2 else loss), parts

    t.objective.forward = poisoned
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    with pytest.raises(TrainingDiverged, match="3 steps in a row had a non-finite loss"):
        t.fit()
    recs = _records(run)
    bad = [r for r in recs if r["kind"] == "nonfinite"]
    assert [r["step"] for r in bad] == [2, 3, 4] and bad[0]["captions"]
    state = load_checkpoint(run / "last.pt")
    assert state["step"] == 4 and state["monitor"]["nonfinite"] == [3, 3]
    after = t.model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed  # step 1 trained ...
    t2 = Trainer(tiny_cfg(tmp_path / "one", "train.epochs=1", "train.max_steps_per_epoch=1"))
    t2.fit()
    for k in after:  # ... and steps 2-4 changed nothing: the same weights as a 1-step run
        if "running" not in k and "num_batches" not in k:
            assert torch.equal(after[k], t2.model.state_dict()[k]), k


def test_unreadable_images_met_in_training_are_skipped_when_asked(tmp_path, cache):
    t = Trainer(tiny_cfg(tmp_path / "skip", "train.epochs=1", "train.max_steps_per_epoch=3",
                         "data.skip_missing_images=true"))
    victim = t.train_corpus.image_paths[int(t.train_corpus.caption_to_image[t.sampler.permutation()[0]])]
    victim.write_bytes(victim.read_bytes()[:60])  # header intact, pixels cut: passes the header check
    t.fit()
    val = [r for r in _records(tmp_path / "skip") if r["kind"] == "val"][0]
    assert val["skipped_images"] == 1
    t3 = Trainer(tiny_cfg(tmp_path / "raise", "train.epochs=1", "train.max_steps_per_epoch=3",
                          "data.check_images=false"))
    from vsekit.data.images import ImageLoadError

    with pytest.raises(ImageLoadError, match=victim.name):
        t3.fit()
