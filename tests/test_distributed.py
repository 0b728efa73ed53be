"""Distributed training on CPU with gloo: 2 processes x B equal 1 process x 2B; resume across world sizes;
sharded encoding for evaluation."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as tmp

from vsekit.checkpoint import load_checkpoint
from vsekit.cli import main
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
def test_stages_and_objective_terms_on_two_processes_equal_one_process(tmp_path, cache):
    # DistributedDataParallel holds the objective's instance classifier, and is rebuilt when a stage unfreezes
    # the text encoder
    extra = ["objective.instance.image_weight=1.0", "objective.instance.text_weight=0.5",
             "objective.instance.dropout=0.0", "train.stages=[{epochs: 1, train: {freeze: [text_encoder]}}, {epochs: 1}]"]
    _run(1, _overrides(tmp_path / "one", "hinge", *extra))
    _run(2, _overrides(tmp_path / "two", "hinge", *extra))
    _assert_same_weights(tmp_path / "one" / "last.pt", tmp_path / "two" / "last.pt")
    assert "objective" in load_checkpoint(tmp_path / "two" / "last.pt")


@pytest.mark.slow
def test_resume_with_another_number_of_processes(tmp_path, cache):
    _run(1, _overrides(tmp_path / "whole", "lseh"))
    _run(2, _overrides(tmp_path / "changed", "lseh", "train.epochs=1"))  # 2 processes, then "killed"
    _run(1, _overrides(tmp_path / "changed", "lseh"), resume=True)  # resumed in one process
    _assert_same_weights(tmp_path / "whole" / "last.pt", tmp_path / "changed" / "last.pt")


@pytest.mark.slow
def test_torchrun_trains_and_evaluates_like_one_process(tmp_path, cache):
    import json

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


# -- sharded index builds ---------------------------------------------------------------------------------
def _blocks_worker(rank: int, world: int, port: int, out) -> None:
    """The row-list helpers on 2 gloo processes; what each process saw and got goes to ``out/<rank>.json``."""
    import json

    from vsekit.index import SearchIndexError
    from vsekit.utils import distributed as d

    os.environ.update({"WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    d.init_from_env("cpu", timeout_s=60)  # a helper that hangs fails the test in a minute
    seen = []

    def record(block):
        seen.append([list(block), d.world().size])  # the block, and the world it is encoded in (alone)
        return list(block)

    def squares(block):
        return np.asarray(record(block), dtype=np.float64)[:, None] ** 2

    def fail_on_1(block):
        if rank == 1:
            raise ValueError("unreadable image")
        return block

    def fail_on_main():
        raise SearchIndexError("no Qdrant server at the URL")

    def caught(fn) -> str:
        try:
            fn()
        except Exception as e:
            return f"{type(e).__name__}: {e}"
        return "no error"

    got = {"squares": d.map_blocks(squares, list(range(5)), np.concatenate),
           "one_item": d.map_blocks(record, ["only"], lambda parts: sum(parts, [])),
           "main": d.run_on_main(lambda: ("all of it", d.world().size), share=lambda r: r[0]),
           "block_error": caught(lambda: d.map_blocks(fail_on_1, [1, 2, 3], list)),
           "main_error": caught(lambda: d.run_on_main(fail_on_main))}
    got["squares"] = None if got["squares"] is None else got["squares"][:, 0].tolist()
    (out / f"{rank}.json").write_text(json.dumps({"seen": seen, **got}))
    d.shutdown()


def test_row_lists_are_encoded_in_blocks_gathered_on_rank_0_and_failures_reach_every_process(tmp_path):
    import json

    tmp.spawn(_blocks_worker, args=(2, _free_port(), tmp_path), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1))
    assert r0["seen"][0] == [[0, 1], 1] and r1["seen"][0] == [[2, 3, 4], 1]  # contiguous blocks, each alone
    assert r0["seen"][1] == [[], 1] and r1["seen"][1] == [["only"], 1]  # fewer items than processes
    assert r0["squares"] == [0, 1, 4, 9, 16] and r1["squares"] is None  # in order, on rank 0
    assert r0["one_item"] == ["only"] and r1["one_item"] is None
    assert r0["main"] == ["all of it", 1] and r1["main"] == "all of it"  # rank 0's result, its share elsewhere
    assert r1["block_error"] == "ValueError: unreadable image"
    assert r0["block_error"] == "PeerError: process 1 of 2 failed: ValueError: unreadable image"
    assert r0["main_error"] == "SearchIndexError: no Qdrant server at the URL"
    assert r1["main_error"] == "PeerError: process 0 of 2 failed: SearchIndexError: no Qdrant server at the URL"


WORDS = "a red blue green circle square star left right of above below big small the and".split()
MODELS = {  # tiny untrained models over (3, 6) region features: one embeds, one scores through a network
    "cosine": ["model.embed_size=8", "model.image_encoder={name: precomp}",
               "model.text_encoder={name: gru, word_dim: 6}"],
    "sgr": ["model.embed_size=8", "model.image_encoder={name: sgraf_regions}",
            "model.text_encoder={name: sgraf_words, word_dim: 6, dropout: 0.0}",
            "model.similarity={name: sgr, sim_dim: 8, sgr_step: 2}"],
}


def _tiny_collection(tmp_path, model: str):
    """A checkpoint of an untrained tiny model and a precomputed-feature folder of 9 images, 2 captions each."""
    from vsekit.checkpoint import save_checkpoint
    from vsekit.models import build_model
    from vsekit.text.vocab import Vocabulary

    rng = np.random.default_rng(0)
    data = tmp_path / "precomp"
    data.mkdir()
    np.save(data / "test_ims.npy", rng.standard_normal((9, 3, 6)).astype(np.float32))
    caps = [" ".join(rng.choice(WORDS, int(rng.integers(2, 8)))) for _ in range(18)]
    (data / "test_caps.txt").write_text("\n".join(caps) + "\n", encoding="utf-8")
    cfg = resolve_config(None, ["text.min_count=1", *MODELS[model]])
    vocab = Vocabulary.build(caps, 1)
    torch.manual_seed(0)
    net = build_model(cfg.model, vocab_size=len(vocab), feature_shape=(3, 6))
    state = {"model": net.state_dict(), "vocab": vocab.to_dict(), "config": cfg.to_dict(), "feature_shape": [3, 6]}
    return save_checkpoint(tmp_path / "m.pt", state), data, caps


def _assert_same_index(a, b, queries) -> None:
    from vsekit.index import SearchIndex

    x, y = SearchIndex.open(a, device="cpu"), SearchIndex.open(b, device="cpu")
    for key in ("fingerprint", "similarity", "dim", "num_images", "num_captions", "kind", "rerank", "sources"):
        assert x.manifest.get(key) == y.manifest.get(key), key
    assert x.data.images == y.data.images and x.data.captions == y.data.captions
    np.testing.assert_allclose(x.data.image_vectors, y.data.image_vectors, atol=1e-5)
    np.testing.assert_allclose(x.data.caption_vectors, y.data.caption_vectors, atol=1e-5)
    assert x.data.sets.keys() == y.data.sets.keys()
    for t in x.data.sets:
        np.testing.assert_array_equal(x.data.sets[t].offsets, y.data.sets[t].offsets)
        np.testing.assert_allclose(x.data.sets[t].vectors, y.data.sets[t].vectors, atol=1e-5)
    for q in queries:
        hx, hy = x.search_text(q, k=5), y.search_text(q, k=5)
        assert [h.id for h in hx] == [h.id for h in hy]
        np.testing.assert_allclose([h.score for h in hx], [h.score for h in hy], atol=1e-5)


def _vsekit_both_ways(argv_of) -> str:
    """``vsekit`` with the arguments ``argv_of(name)``: under torchrun on 2 processes with name "two", then in
    this process with name "one"; returns what torchrun printed."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
              str(_free_port()), "-m", "vsekit"]
    done = subprocess.run([*launch, *argv_of("two")], env={**os.environ, "OMP_NUM_THREADS": "1"}, text=True,
                          capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert main(argv_of("one")) == 0
    return done.stdout


@pytest.mark.parametrize("model", ["cosine", "sgr"])
def test_torchrun_index_build_and_add_equal_one_process(tmp_path, model):
    """2 processes encode a block each (9 images: 4 + 5, 18 captions: 9 + 9, in batches of 2) and rank 0
    writes: the index is the one process's. The cosine model's index is built of 5 images and grown by
    ``index add`` the same way (4 new images: 2 + 2)."""
    ckpt, data, caps = _tiny_collection(tmp_path, model)
    source = ["--data", str(data), "--split", "test", "--batch-size", "2", "--device", "cpu", "-q"]
    first = "9" if model == "sgr" else "5"
    printed = _vsekit_both_ways(lambda name: ["index", "build", str(ckpt), *source, "--max-images", first,
                                              "--out", str(tmp_path / name)])
    assert printed.count("built exact index") == 1  # by rank 0 only
    if model == "cosine":
        printed = _vsekit_both_ways(lambda name: ["index", "add", str(tmp_path / name), *source])
        assert printed.count("added 4 images (5 already in the index)") == 1
    _assert_same_index(tmp_path / "one", tmp_path / "two", caps[:4])
