"""Distributed training on CPU with gloo: 2 processes x B equal 1 process x 2B; resume across world sizes;
sharded encoding for evaluation."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as tmp

from vsekit.checkpoint import load_checkpoint
from vsekit.config import resolve_config
from vsekit.data.datasets import EpochSampler
from vsekit.train.trainer import Trainer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _overrides(out, loss: str, *extra: str) -> list[str]:
    losses = {"hinge": ["loss.name=hinge", "loss.reduction=max"], "infonce": ["loss.name=infonce"],
              "lseh": ["loss.name=lseh", "semantics.n_components=8"]}
    return [f"output_dir={out}", "seed=11", "data.format=demo", "data.num_images=80", "data.regions=grid",
            "data.val_max_images=16", "text.min_count=1", "model.embed_size=8", "model.text_encoder.word_dim=6",
            "train.batch_size=16", "train.epochs=2", "train.max_steps_per_epoch=3", "train.progress=false",
            "optim.lr=5e-3", "eval.chunk_size=8", *losses[loss], *extra]


def _worker(rank: int, world: int, port: int, overrides: list[str], resume: bool) -> None:
    os.environ.update({"WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    try:
        Trainer(resolve_config(None, overrides), resume=resume).fit()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _run(world: int, overrides: list[str], resume: bool = False) -> None:
    if world == 1:
        Trainer(resolve_config(None, overrides), resume=resume).fit()
    else:
        tmp.spawn(_worker, args=(world, _free_port(), overrides, resume), nprocs=world, join=True)


def _assert_same_weights(a, b, atol=1e-5):
    wa, wb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=1e-4, msg=k)


def test_the_sampler_shards_each_global_batch_in_order():
    one = EpochSampler(37, seed=2)
    order = list(one)
    shards = []
    for rank in range(2):
        s = EpochSampler(37, seed=2)
        s.shard(rank, 2, 4)
        shards.append(list(s))
    # global batches of 8: rank 0 takes the first 4, rank 1 the next 4; the last 5 split 2 + 3
    rebuilt = []
    for k in range(4):
        rebuilt += shards[0][4 * k: 4 * k + 4] + shards[1][4 * k: 4 * k + 4]
    rebuilt += shards[0][16:] + shards[1][16:]
    assert rebuilt == order and len(shards[0]) == 18 and len(shards[1]) == 19


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["hinge", "lseh", "infonce"])
def test_two_processes_of_b_equal_one_process_of_2b(tmp_path, cache, loss):
    _run(1, _overrides(tmp_path / "one", loss))
    _run(2, _overrides(tmp_path / "two", loss))
    _assert_same_weights(tmp_path / "one" / "last.pt", tmp_path / "two" / "last.pt")
    h1 = load_checkpoint(tmp_path / "one" / "last.pt")["history"]
    h2 = load_checkpoint(tmp_path / "two" / "last.pt")["history"]
    assert [round(h["rsum"], 6) for h in h1] == [round(h["rsum"], 6) for h in h2]  # sharded validation too
    assert np.allclose([h["train_loss"] for h in h1], [h["train_loss"] for h in h2], rtol=1e-5)
    assert not (tmp_path / "two" / "config.yaml").read_text() == ""


@pytest.mark.slow
def test_resume_with_another_number_of_processes(tmp_path, cache):
    _run(1, _overrides(tmp_path / "whole", "lseh"))
    _run(2, _overrides(tmp_path / "changed", "lseh", "train.epochs=1"))  # 2 processes, then "killed"
    _run(1, _overrides(tmp_path / "changed", "lseh"), resume=True)  # resumed in one process
    _assert_same_weights(tmp_path / "whole" / "last.pt", tmp_path / "changed" / "last.pt")


@pytest.mark.slow
def test_torchrun_trains_and_evaluates_like_one_process(tmp_path, cache):
    import json
    import subprocess
    import sys

    from vsekit.data.sources import load_split
    from vsekit.inference import Embedder

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
              str(_free_port()), "-m", "vsekit"]
    run = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("{}\n")
    done = subprocess.run([*launch, "train", str(recipe), *_overrides(run, "hinge")], env=env, text=True,
                          capture_output=True)
    assert done.returncode == 0, done.stderr[-3000:]
    _run(1, _overrides(tmp_path / "one", "hinge"))
    _assert_same_weights(tmp_path / "one" / "last.pt", run / "last.pt")
    out = tmp_path / "m.json"
    done = subprocess.run([*launch, "eval", str(run / "last.pt"), "--split", "test", "--out", str(out)], env=env,
                          text=True, capture_output=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("rsum") >= 1  # printed once, by rank 0
    sharded = json.loads(out.read_text())["metrics"]
    emb = Embedder.from_checkpoint(run / "last.pt")
    whole = emb.evaluate(load_split(emb.config.data, "test"))
    assert sharded["rsum"] == pytest.approx(whole["rsum"], abs=1e-6)
