"""Fixtures shared by several test modules."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# tests never download: pretrained weights come only from caches a test prepares (vsekit.models.weights)
os.environ["VSEKIT_OFFLINE"] = "1"

# The model of the index, search and serve tests: small enough to train in seconds on CPU, trained long enough
# (60 epochs of 24 images, InfoNCE, high LR) to tell the 8 training images of the index apart: measured R@1
# 0.93-0.98, R@3 1.0 (seeds 0, 1).
MODEL_OVERRIDES = [
    "data.num_images=30", "transform.image_size=32", "transform.resize=32", "data.val_max_images=20",
    "model.embed_size=128", "model.image_encoder.width=8", "model.text_encoder.word_dim=64",
    "loss={name: infonce}", "optim.lr=3e-3", "optim.lr_decay_every=100",
    "train.epochs=60", "train.progress=false", "train.batch_size=32", "seed=0",
]
RECIPE = Path(__file__).resolve().parents[1] / "vsekit" / "configs" / "demo_vsepp.yaml"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private ``$VSEKIT_CACHE`` (demo sets, LSA vectors) for one test module."""
    root = tmp_path_factory.mktemp("vsekit-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("VSEKIT_CACHE", str(root))
    yield root
    mp.undo()


@pytest.fixture(scope="module")
def mp():
    """A module-wide MonkeyPatch with torch on one thread (tiny models, one-query calls: a second thread
    only adds contention)."""
    m = pytest.MonkeyPatch()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield m
    torch.set_num_threads(threads)
    m.undo()


def trained_checkpoint(tmp_path_factory: pytest.TempPathFactory, mp: pytest.MonkeyPatch) -> Path:
    """Train the test model once per session (other test modules find it in the session's base temp)."""
    from vsekit.config import resolve_config
    from vsekit.train.trainer import Trainer

    root = tmp_path_factory.getbasetemp() / "index-model"
    mp.setenv("VSEKIT_CACHE", str(root / "cache"))
    ckpt = root / "run" / "last.pt"
    if not ckpt.is_file():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # a tiny model: one thread is faster, and far faster on a busy machine
        try:
            cfg = resolve_config(RECIPE, [f"output_dir={root / 'run'}", *MODEL_OVERRIDES])
            Trainer(cfg).fit()
        finally:
            torch.set_num_threads(threads)
    return ckpt


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, mp) -> Path:
    """The trained test model's checkpoint (:func:`trained_checkpoint`)."""
    return trained_checkpoint(tmp_path_factory, mp)


@pytest.fixture(scope="module")
def emb(ckpt):
    """The trained test model on the CPU."""
    from vsekit.inference import Embedder

    return Embedder.from_checkpoint(ckpt, device="cpu")
