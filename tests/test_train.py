"""The training loop end to end on a tiny demo set: checkpoints, exact resume, CLI verbs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _configs import tiny_config

from vsekit.checkpoint import load_checkpoint
from vsekit.train.trainer import Trainer


def tiny_cfg(out, *extra):
    return tiny_config(
        out, "seed=3", "data.num_images=120", "transform.image_size=32", "transform.resize=32",
        "data.val_max_images=20", "model.embed_size=16", "model.image_encoder.name=cnn",
        "model.image_encoder.backbone=small_cnn", "model.image_encoder.width=4", "model.image_encoder.finetune=true",
        "model.text_encoder.word_dim=8", "train.batch_size=16", "train.epochs=2", "train.max_steps_per_epoch=5",
        "optim.lr=1e-3", "optim.lr_decay_every=1", "eval.chunk_size=7", *extra,
    )


def _weights(path):
    return load_checkpoint(path)["model"]


def test_train_writes_checkpoints_config_and_log(tmp_path, cache):
    cfg = tiny_cfg(tmp_path / "run")
    result = Trainer(cfg).fit()
    out = tmp_path / "run"
    assert (out / "last.pt").is_file() and (out / "best.pt").is_file() and (out / "config.yaml").is_file()
    state = load_checkpoint(out / "last.pt")
    for key in ("model", "optimizer", "scheduler", "rng", "epoch", "step", "vocab", "config"):
        assert key in state
    assert state["epoch"] == 2 and state["step"] == 10
    assert state["config"]["model"]["embed_size"] == 16
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-3 * 0.01)  # decayed twice
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in records if r["kind"] == "val"]
    assert [r["epoch"] for r in vals] == [0, 1] and all("rsum" in r for r in vals)
    assert result["best_rsum"] == max(r["rsum"] for r in vals)


def test_resume_after_epoch_equals_uninterrupted(tmp_path, cache):
    full = Trainer(tiny_cfg(tmp_path / "a"))
    full.fit()
    Trainer(tiny_cfg(tmp_path / "b", "train.epochs=1")).fit()  # "killed" after epoch 1
    Trainer(tiny_cfg(tmp_path / "b"), resume=True).fit()
    wa, wb = _weights(tmp_path / "a" / "last.pt"), _weights(tmp_path / "b" / "last.pt")
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    ha = load_checkpoint(tmp_path / "a" / "last.pt")["history"]
    hb = load_checkpoint(tmp_path / "b" / "last.pt")["history"]
    assert [h["rsum"] for h in ha] == [h["rsum"] for h in hb]


def test_resume_mid_epoch_equals_uninterrupted(tmp_path, cache):
    Trainer(tiny_cfg(tmp_path / "a")).fit()

    cfg = tiny_cfg(tmp_path / "b", "train.checkpoint_every_steps=1")
    t = Trainer(cfg)
    real_step, calls = t.train_step, {"n": 0}

    def dying_step(batch):
        calls["n"] += 1
        if calls["n"] == 8:  # killed during epoch 2, after 7 steps were checkpointed
            raise KeyboardInterrupt
        return real_step(batch)

    t.train_step = dying_step
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    state = load_checkpoint(tmp_path / "b" / "last.pt")
    assert (state["epoch"], state["batches_done"]) == (1, 2)
    Trainer(cfg, resume=True).fit()
    wa, wb = _weights(tmp_path / "a" / "last.pt"), _weights(tmp_path / "b" / "last.pt")
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_resume_without_checkpoint_is_clear(tmp_path, cache):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Trainer(tiny_cfg(tmp_path / "none"), resume=True)


@pytest.mark.parametrize("loss", ["hinge", "hinge_warmup", "infonce", "lseh"])
def test_every_loss_trains(tmp_path, cache, loss):
    cfg = tiny_cfg(tmp_path / loss, "train.epochs=1", "train.max_steps_per_epoch=2", "semantics.n_components=8",
                   f"semantics.cache_dir={tmp_path / 'sem'}")
    cfg.loss = {"name": loss}
    result = Trainer(cfg).fit()
    assert np.isfinite(result["best_rsum"])


def test_order_similarity_trains(tmp_path, cache):
    cfg = tiny_cfg(tmp_path / "order", "model.similarity=order", "model.use_abs=true", "train.epochs=1")
    assert np.isfinite(Trainer(cfg).fit()["best_rsum"])


def test_cpu_bf16_runs_the_step_under_bfloat16_autocast(tmp_path, cache):
    """train.cpu_bf16: the forward pass runs under CPU bfloat16 autocast (a linear layer's output is bfloat16),
    the loss and the weights stay float32 and finite, and the loss falls as in float32; off by default."""
    seen = []

    def spy(module, args, output):
        seen.append((torch.is_autocast_enabled("cpu"), output.dtype))

    losses = {}
    for bf16 in (False, True):
        tr = Trainer(tiny_cfg(tmp_path / str(bf16), "train.epochs=1", "train.max_steps_per_epoch=8",
                              f"train.cpu_bf16={str(bf16).lower()}"))
        linear = next(m for m in tr.model.modules() if isinstance(m, torch.nn.Linear))
        handle = linear.register_forward_hook(spy)
        batches = [b for _, b in zip(range(2), tr.loader())]
        losses[bf16] = [tr.train_step(b) for b in batches * 4]
        handle.remove()
        assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in tr.model.parameters())
    assert seen[0] == (False, torch.float32) and seen[-1] == (True, torch.bfloat16)
    for values in losses.values():  # the same two batches four times: fitted in either precision
        assert all(np.isfinite(values)) and values[-1] < values[0]


def test_init_from_loads_weights(tmp_path, cache):
    Trainer(tiny_cfg(tmp_path / "s1", "train.epochs=1")).fit()
    t = Trainer(tiny_cfg(tmp_path / "s2", f"train.init_from={tmp_path / 's1' / 'last.pt'}"))
    w = _weights(tmp_path / "s1" / "last.pt")
    for k, v in t.model.state_dict().items():
        assert torch.equal(v.cpu(), w[k]), k


def test_cli_train_eval_encode(tmp_path, cache, capsys):
    from vsekit.cli import main

    out = tmp_path / "cli"
    args = [f"output_dir={out}", "data.num_images=150", "transform.image_size=32", "transform.resize=32",
            "data.val_max_images=20", "model.embed_size=16", "model.image_encoder.width=4",
            "model.text_encoder.word_dim=8", "train.epochs=1", "train.max_steps_per_epoch=3",
            "train.progress=false", "train.batch_size=16"]
    assert main(["train", "demo_vsepp", *args]) == 0
    assert main(["eval", str(out), "--split", "test", "--out", str(tmp_path / "res.json")]) == 0
    printed = capsys.readouterr().out
    assert "rsum" in printed
    res = json.loads((tmp_path / "res.json").read_text())
    assert set(res["metrics"]) >= {"i2t_r1", "t2i_r10", "rsum"}
    assert main(["eval", str(out / "best.pt"), "--split", "test", "--protocol", "1k5fold"]) == 0
    caps = tmp_path / "caps.txt"
    caps.write_text("a red circle\ntwo blue squares\n")
    assert main(["encode", str(out), "--captions", str(caps), "--out", str(tmp_path / "c.npy")]) == 0
    c = np.load(tmp_path / "c.npy")
    assert c.shape == (2, 16)
    np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1, rtol=1e-5)
    assert main(["encode", str(out), "--images", "demo", "--split", "val", "--out", str(tmp_path / "i.npy")]) == 0
    assert np.load(tmp_path / "i.npy").shape[1] == 16
    assert (tmp_path / "i.ids.txt").read_text().count("\n") == np.load(tmp_path / "i.npy").shape[0]


def test_cli_errors_are_clear(tmp_path, capsys):
    from vsekit.cli import main

    assert main(["eval", str(tmp_path / "missing.pt")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["train", "no_such_recipe"]) == 2
    assert "no recipe" in capsys.readouterr().err
    bad = tmp_path / "r.yaml"
    bad.write_text("optim: {lr: 1}\n")
    assert main(["train", str(bad), "optim.lrr=3"]) == 2
    assert "optim.lrr" in capsys.readouterr().err
