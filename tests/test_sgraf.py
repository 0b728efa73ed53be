"""SGRAF (SGR, SAF) and the learned-similarity plumbing: the network's shapes and gradients, pair scores that do
not depend on what else is in the batch or on padding, evaluation equal to a brute-force double loop over pairs,
the two-stage index (inner-product shortlist, network rerank), checkpoints, and every ranking loss on top."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from vsekit.checkpoint import save_checkpoint
from vsekit.config import resolve_config
from vsekit.data.corpus import Corpus
from vsekit.errors import ConfigError
from vsekit.index import (
    SearchIndex,
    SearchIndexError,
    add_to_index,
    build_index,
    read_manifest,
    remove_from_index,
)
from vsekit.inference import Embedder
from vsekit.losses import LOSSES, build_loss
from vsekit.models import build_model
from vsekit.models.local_sets import LocalSets, LocalSetsWriter
from vsekit.text.vocab import Vocabulary

WORDS = "a red blue green circle square star left right of above below big small the and".split()
REGIONS, FEAT = 5, 12
SPECS = {"sgr": {"name": "sgr", "sim_dim": 8, "sgr_step": 2}, "saf": {"name": "saf", "sim_dim": 8}}


@pytest.fixture
def small_tiles(monkeypatch):
    """Evaluation tiles of 4 images x at most 4 captions: a tiny corpus then spans several tiles (padded last
    ones included), and the fixed-shape padding costs little."""
    monkeypatch.setattr("vsekit.models.sgraf.IMAGE_TILE", 4)
    monkeypatch.setattr("vsekit.models.sgraf.MAX_TILE_CAPTIONS", 4)


def tiny_corpus(n: int = 10, seed: int = 0) -> Corpus:
    """``n`` images of random region features with 1-3 random captions each (not the same number per image)."""
    rng = np.random.default_rng(seed)
    caps, owner = [], []
    for i in range(n):
        for _ in range(1 + i % 3):
            caps.append(" ".join(rng.choice(WORDS, int(rng.integers(2, 9)))))
            owner.append(i)
    feats = rng.standard_normal((n, REGIONS, FEAT)).astype(np.float32)
    return Corpus("tiny", caps, np.array(owner), [f"img{i}" for i in range(n)], features=feats)


def config(similarity: dict, **more) -> object:
    overrides = ["model.embed_size=16", "model.image_encoder={name: sgraf_regions}",
                 "model.text_encoder={name: sgraf_words, word_dim: 8, dropout: 0.0}",
                 f"model.similarity={similarity}", "text.min_count=1", "data.num_images=10",
                 *[f"{k}={v}" for k, v in more.items()]]
    return resolve_config(None, overrides)


def tiny_embedder(kind: str, corpus: Corpus, seed: int = 0) -> Embedder:
    """An untrained model whose scores are spread out (its read-out layer scaled up), so that no two pairs of
    the tiny corpus come near a tie that rounding could break either way."""
    cfg = config(SPECS[kind])
    vocab = Vocabulary.build(corpus.captions, 1)
    torch.manual_seed(seed)
    model = build_model(cfg.model, vocab_size=len(vocab), feature_shape=(REGIONS, FEAT))
    with torch.no_grad():
        model.similarity.score.weight.mul_(40.0)
    return Embedder(model, vocab, cfg, "cpu", feature_shape=(REGIONS, FEAT))


def batch(n: int = 4, t: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, REGIONS, FEAT, generator=g)
    tokens = torch.randint(4, 30, (n, t), generator=g)
    lengths = torch.tensor([t, 3, 5, 2, 6, 4][:n])
    tokens[torch.arange(t)[None, :] >= lengths[:, None]] = 0
    return images, tokens, lengths


def model_of(kind: str, seed: int = 0, **sim):
    torch.manual_seed(seed)
    return build_model({"embed_size": 16, "similarity": {**SPECS[kind], **sim},
                        "image_encoder": {"name": "sgraf_regions"},
                        "text_encoder": {"name": "sgraf_words", "word_dim": 8}},
                       vocab_size=30, feature_shape=(REGIONS, FEAT))


# -- the network -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sgr", "saf"])
def test_forward_shapes_and_gradients(kind):
    model = model_of(kind)
    images, tokens, lengths = batch()
    out = model.embed(images, (tokens, lengths))
    assert out.sim.shape == (4, 4) and ((out.sim > 0) & (out.sim < 1)).all()
    assert out.image_emb.shape == out.caption_emb.shape == (4, 16)
    torch.testing.assert_close(out.image_emb.norm(dim=1), torch.ones(4))
    assert out.image_context.shape == (4, REGIONS, 16) and out.caption_context.shape == (4, 7, 16)
    torch.testing.assert_close(out.image_context.norm(dim=-1), torch.ones(4, REGIONS))
    valid = torch.arange(7)[None, :] < lengths[:, None]
    assert (out.caption_context[~valid] == 0).all()
    torch.testing.assert_close(out.caption_context[valid].norm(dim=-1), torch.ones(int(valid.sum())))
    out.sim.sum().backward()
    names = [n for n, _ in model.named_parameters()]
    assert any(n.startswith("similarity.") for n in names)
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert float(model.similarity.score.weight.grad.abs().sum()) > 0
    img, cap, sim = model(images, tokens, lengths)  # forward() scores through the network too
    assert sim.shape == (4, 4)


@pytest.mark.parametrize("tiles", ["default", "small"])
@pytest.mark.parametrize("kind", ["sgr", "saf"])
def test_one_pair_alone_scores_as_its_entry_of_the_batch(kind, tiles, request):
    if tiles == "small":
        request.getfixturevalue("small_tiles")
    model = model_of(kind).eval()
    images, tokens, lengths = batch()
    with torch.no_grad():
        _, regions = model.encode_image_parts(images)
        _, words, lens = model.encode_caption_parts(tokens, lengths)
        full = model.similarity(regions, words, lens)
        fixed = model.similarity(regions, words, lens, fixed_shapes=True)
        torch.testing.assert_close(fixed, full, rtol=0, atol=1e-6)
        for i in range(4):
            for j in range(4):
                one = (regions[i:i + 1], words[j:j + 1, : int(lens[j])], lens[j:j + 1])
                torch.testing.assert_close(model.similarity(*one)[0, 0], full[i, j], rtol=0, atol=1e-6)
                # fixed shapes: bitwise the same number, whatever else shares the call
                assert torch.equal(model.similarity(*one, fixed_shapes=True)[0, 0], fixed[i, j])
        # and whatever order the captions come in
        perm = torch.tensor([2, 0, 3, 1])
        assert torch.equal(model.similarity(regions, words[perm], lens[perm], fixed_shapes=True), fixed[:, perm])


@pytest.mark.parametrize("kind", ["sgr", "saf"])
def test_caption_padding_does_not_change_scores(kind):
    model = model_of(kind, dropout=0.0)
    images, tokens, lengths = batch()
    model.text_encoder.dropout.p = 0.0
    longer = torch.nn.functional.pad(tokens, (0, 5))  # five more padding tokens
    model.train()  # batch norm on batch statistics: padding must stay out of them too
    torch.manual_seed(1)
    a = model.embed(images, (tokens, lengths)).sim
    b = model.embed(images, (longer, lengths)).sim
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    model.eval()
    with torch.no_grad():
        _, regions = model.encode_image_parts(images)
        _, words, lens = model.encode_caption_parts(tokens, lengths)
        junk = torch.cat([words, torch.randn(4, 6, 16)], dim=1)  # padding rows holding anything at all
        torch.testing.assert_close(model.similarity(regions, junk, lens), model.similarity(regions, words, lens),
                                   rtol=0, atol=1e-6)
        assert torch.equal(model.similarity(regions, junk, lens, fixed_shapes=True),
                           model.similarity(regions, words, lens, fixed_shapes=True))


def test_contexts_are_required_and_checked():
    model = build_model({"embed_size": 16, "similarity": "sgr", "image_encoder": {"name": "precomp"},
                         "text_encoder": {"name": "sgraf_words", "word_dim": 8}}, vocab_size=30,
                        feature_shape=(REGIONS, FEAT))
    images, tokens, lengths = batch()
    with pytest.raises(ConfigError, match="sgraf_regions"):
        model.embed(images, (tokens, lengths))
    with pytest.raises(ConfigError, match="region features"):
        build_model({"embed_size": 16, "image_encoder": {"name": "sgraf_regions"}}, vocab_size=30,
                    feature_shape=(FEAT,))


# -- config -----------------------------------------------------------------------------------------------------
def test_similarity_config_is_validated():
    cfg = config({"name": "sgr", "sim_dim": 8})
    assert cfg.model.similarity == {"name": "sgr", "sim_dim": 8}
    assert config("saf").model.similarity == "saf" and config("cosine").model.similarity == "cosine"
    assert config({"name": "cosine"}).model.similarity == "cosine"
    with pytest.raises(ConfigError, match=r"model\.similarity\.sim_dimm: unknown key; did you mean model\.similarity\.sim_dim"):
        config({"name": "sgr", "sim_dimm": 8})
    with pytest.raises(ConfigError, match=r"model\.similarity\.sgr_step: unknown key"):
        config({"name": "saf", "sgr_step": 2})  # SAF has no reasoning steps
    with pytest.raises(ConfigError, match=r"model\.similarity\.sim_dim: .*integer"):
        config({"name": "sgr", "sim_dim": "big"})
    with pytest.raises(ConfigError, match=r"model\.similarity\.name: unknown similarity 'sgrr'; did you mean 'sgr'"):
        config({"name": "sgrr"})
    with pytest.raises(ConfigError, match=r"model\.similarity\.sim_dim: unknown key; the 'cosine' similarity"):
        config({"name": "cosine", "sim_dim": 8})
    with pytest.raises(ConfigError, match="sim_dim and sgr_step must be >= 1"):
        build_model({"embed_size": 16, "similarity": {"name": "sgr", "sim_dim": 0},
                     "image_encoder": {"name": "sgraf_regions"}}, vocab_size=30, feature_shape=(REGIONS, FEAT))
    # switching networks drops the other one's options (SAF's defaults apply)
    switched = resolve_config("vsekit/configs/sgr_f30k_precomp.yaml", ["model.similarity.name=saf"])
    assert switched.model.similarity == {"name": "saf"}


def test_recipes_resolve():
    for name, (sim, loss, bs, lr, epochs, decay) in {
        "sgr_f30k_precomp": ("sgr", "hinge", 128, 2e-4, 40, 30), "saf_f30k_precomp": ("saf", "hinge", 128, 2e-4, 30, 20),
        "sgr_coco_precomp": ("sgr", "hinge", 128, 2e-4, 20, 10), "saf_coco_precomp": ("saf", "hinge", 128, 2e-4, 20, 10),
        "sgr_lseh_f30k_precomp": ("sgr", "lseh", 84, 4e-4, 40, 30),
        "saf_lseh_f30k_precomp": ("saf", "lseh", 84, 4e-4, 30, 20),
        "sgr_lseh_coco_precomp": ("sgr", "lseh", 84, 4e-4, 20, 10),
        "saf_lseh_coco_precomp": ("saf", "lseh", 84, 4e-4, 20, 10),
        "sgr_lseh_iapr_precomp": ("sgr", "lseh", 128, 4e-4, 40, 20),
        "saf_lseh_iapr_precomp": ("saf", "lseh", 128, 4e-4, 40, 20),
    }.items():
        c = resolve_config(f"vsekit/configs/{name}.yaml")
        assert c.model.similarity["name"] == sim and c.loss["name"] == loss, name
        assert (c.train.batch_size, c.optim.lr, c.train.epochs, c.optim.lr_decay_every) == (bs, lr, epochs, decay)
        assert c.model.embed_size == 1024 and c.model.similarity["sim_dim"] == 256 and c.optim.grad_clip == 2.0
        assert c.model.text_encoder["word_dim"] == 300
        if loss == "hinge":
            assert (c.loss["margin"], c.loss["reduction"]) == (0.2, "max")
        else:
            assert (c.loss["alpha"], c.loss["lam"], c.loss["reduction"]) == (0.185, 0.025, "max")


# -- losses, optimiser, checkpoints ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", LOSSES.names())
@pytest.mark.parametrize("kind", ["sgr", "saf"])
def test_every_registered_loss_trains_a_similarity_network(name, kind):
    model = model_of(kind)
    images, tokens, lengths = batch()
    out = model.embed(images, (tokens, lengths))
    loss_fn = build_loss({"name": name})
    loss_fn.set_epoch(0)
    extra = {"caption_vectors": torch.randn(4, 10, generator=torch.Generator().manual_seed(3))} \
        if loss_fn.requires_caption_vectors else {}
    loss = loss_fn(out.sim, torch.tensor([0, 1, 1, 2]), **extra)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    for part in ("similarity", "image_encoder", "text_encoder"):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(part + ".")]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads), part
        assert sum(float(g.abs().sum()) for g in grads) > 0, part


def test_lr_mult_reaches_the_similarity_parameters():
    from vsekit.train.optim import param_groups

    model = model_of("sgr")
    groups = param_groups(model, 1e-3, {"similarity": 0.5, "similarity.reasoning": 0.1})
    by_mult = {g["lr_mult"]: len(g["params"]) for g in groups}
    n_reason = sum(1 for n, _ in model.named_parameters() if n.startswith("similarity.reasoning."))
    n_sim = sum(1 for n, _ in model.named_parameters() if n.startswith("similarity."))
    assert by_mult[0.1] == n_reason and by_mult[0.5] == n_sim - n_reason


def test_embedding_term_trains_the_pooled_embeddings():
    """objective.embedding: a ranking loss on the embeddings' cosine, beside (here: instead of) the loss on the
    network's scores; it reaches the encoders, not the network."""
    from vsekit.data.batch import Batch
    from vsekit.losses import InfoNCELoss
    from vsekit.train.objective import build_objective

    cfg = config(SPECS["sgr"], **{"objective.loss_weight": 0.0, "objective.embedding.weight": 2.0,
                                  "objective.embedding.loss.name": "infonce"})
    assert cfg.objective.embedding.loss == {"name": "infonce"}  # the hinge's options went with it
    objective = build_objective([cfg], build_loss(cfg.loss), feature_dim=16)
    model = model_of("sgr")
    images, tokens, lengths = batch()
    out = model.embed(images, (tokens, lengths))
    ids = torch.tensor([0, 1, 1, 2])
    total, parts = objective(out, Batch(images, (tokens, lengths), ids))
    assert set(parts) == {"embedding"}
    want = InfoNCELoss()(out.image_emb @ out.caption_emb.t(), ids)
    torch.testing.assert_close(total, 2.0 * want)
    total.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith("similarity."))
    assert all(p.grad is not None for n, p in model.named_parameters() if n.startswith("image_encoder."))
    with pytest.raises(ConfigError, match=r"objective\.embedding\.loss\.margn: unknown key"):
        config(SPECS["sgr"], **{"objective.embedding.loss.margn": 0.1})


@pytest.mark.parametrize("kind", ["sgr", "saf"])
def test_checkpoint_round_trip(kind, tmp_path, small_tiles):
    corpus = tiny_corpus()
    emb = tiny_embedder(kind, corpus)
    state = {"model": emb.model.state_dict(), "vocab": emb.vocab.to_dict(), "config": emb.config.to_dict(),
             "feature_shape": [REGIONS, FEAT]}
    assert any(k.startswith("similarity.") for k in state["model"])
    back = Embedder.from_checkpoint(save_checkpoint(tmp_path / "m.pt", state), device="cpu")
    assert back.learned_similarity and back.similarity == kind and back.fingerprint == emb.fingerprint
    for k, v in emb.model.state_dict().items():
        assert torch.equal(back.model.state_dict()[k], v), k
    assert back.evaluate(corpus) == emb.evaluate(corpus)


# -- evaluation -------------------------------------------------------------------------------------------------
def brute_force_metrics(emb: Embedder, corpus: Corpus, image_rows: np.ndarray, caption_rows: np.ndarray) -> dict:
    """The VSE++ protocol by hand: every pair scored alone (each image and caption encoded on its own, the
    caption unpadded), ranks read off a stable sort of each query's row, the formulas of VSE++'s code."""
    model = emb.model.eval()
    with torch.no_grad():
        regions = [model.encode_image_parts(torch.from_numpy(np.asarray(corpus.features[i:i + 1])))[1]
                   for i in image_rows]
        words = []
        for j in caption_rows:
            tok = torch.tensor([emb.vocab.encode(corpus.captions[j])])
            words.append(model.encode_caption_parts(tok, torch.tensor([tok.shape[1]]))[1:])
        S = np.array([[float(model.similarity(r, w, n)[0, 0]) for w, n in words] for r in regions])
    owner = [int(np.flatnonzero(image_rows == corpus.caption_to_image[j])[0]) for j in caption_rows]
    i2t, t2i = [], []
    for i in range(len(image_rows)):
        order = sorted(range(len(caption_rows)), key=lambda j: (-S[i, j], j))
        i2t.append(min(order.index(j) for j in range(len(caption_rows)) if owner[j] == i))
    for j in range(len(caption_rows)):
        order = sorted(range(len(image_rows)), key=lambda i: (-S[i, j], i))
        t2i.append(order.index(owner[j]))
    out = {}
    for d, ranks in (("i2t", np.array(i2t, float)), ("t2i", np.array(t2i, float))):
        for k in (1, 5, 10):
            out[f"{d}_r{k}"] = 100.0 * np.count_nonzero(ranks < k) / len(ranks)
        out[f"{d}_medr"] = float(np.floor(np.median(ranks)) + 1)
        out[f"{d}_meanr"] = float(ranks.mean() + 1)
    return out, S


@pytest.mark.parametrize("kind", ["sgr", "saf"])
def test_evaluate_equals_a_brute_force_double_loop(kind, monkeypatch, small_tiles):
    corpus = tiny_corpus()
    emb = tiny_embedder(kind, corpus)
    n = corpus.num_images
    want, S = brute_force_metrics(emb, corpus, np.arange(n), np.arange(corpus.num_captions))
    assert S.std() > 0.05  # spread out: no near-ties for rounding to break
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "ground-truth scores differed between two evaluations"
        got = emb.evaluate(corpus, "full", chunk_size=(4, 7))  # blocks that split images and captions unevenly
        assert got == emb.evaluate(corpus, "full")
        for k, v in want.items():
            assert got[k] == pytest.approx(v, abs=1e-12), k
        # COCO-1K style: 5 folds of consecutive images, each against its own captions; the mean of the folds
        folds = []
        for f in range(5):
            rows = np.arange(f * n // 5, (f + 1) * n // 5)
            caps = np.flatnonzero(np.isin(corpus.caption_to_image, rows))
            folds.append(brute_force_metrics(emb, corpus, rows, caps)[0])
        got5 = emb.evaluate(corpus, "1k5fold", chunk_size=3)
        for k in want:
            assert got5[k] == pytest.approx(np.mean([f[k] for f in folds]), abs=1e-9), k
        recalls = [k for k in want if "_r" in k]
        assert got5["rsum"] == pytest.approx(sum(np.mean([f[k] for f in folds]) for k in recalls), abs=1e-9)
        # a corpus too large for RAM: the local sets go to a memory-mapped temporary file, same numbers
        monkeypatch.setattr("vsekit.inference.IN_MEMORY_SETS_BYTES", 0)
        assert emb.evaluate(corpus, "full") == got
    with pytest.raises(Exception, match="label_map"):
        emb.evaluate(corpus, "label_map")
    with pytest.raises(Exception, match="score_sets"):
        emb.score(np.zeros((2, 16)), np.zeros((2, 16)))


def test_local_sets_pack_pad_and_spill(tmp_path):
    g = torch.Generator().manual_seed(0)
    padded = torch.randn(5, 4, 3, generator=g)
    lengths = torch.tensor([4, 1, 3, 2, 4])
    mem, disk = LocalSetsWriter(), LocalSetsWriter(spill_dir=tmp_path)
    for w in (mem, disk):
        w.append(padded[:2], lengths[:2])
        w.append(padded[2:], lengths[2:])
    a, b = mem.finish(), disk.finish()
    assert isinstance(b.vectors, np.memmap) and np.array_equal(a.vectors, b.vectors)
    assert a.lengths.tolist() == [4, 1, 3, 2, 4] and a.vectors.shape == (14, 3)
    x, n = a.padded([3, 0, 1])
    assert x.shape == (3, 4, 3) and n.tolist() == [2, 4, 1]
    assert torch.equal(x[0, :2], padded[3, :2]) and (x[0, 2:] == 0).all() and torch.equal(x[1], padded[0])
    sub = a.subset([2, 4])
    assert torch.equal(sub.padded()[0], torch.stack([torch.cat([padded[2, :3], torch.zeros(1, 3)]), padded[4]]))
    both = LocalSets.concat([sub, a.astype("float16")])
    assert len(both) == 7 and both.vectors.dtype == np.float32
    a.save(tmp_path, "captions")
    c = LocalSets.load(tmp_path, "captions")
    assert np.array_equal(c.vectors, a.vectors) and np.array_equal(c.offsets, a.offsets)
    with pytest.raises(ValueError, match="offsets"):
        LocalSets(a.vectors, np.array([0, 3, 2, 14]))


# -- the index ----------------------------------------------------------------------------------------------------
def exact_ranking(emb: Embedder, img_sets: LocalSets, query: str) -> tuple[np.ndarray, np.ndarray]:
    _, q = emb.encode_texts([query], parts=True)
    s = emb.score_sets(img_sets, q)[:, 0]
    order = np.lexsort((np.arange(len(s)), -s))
    return order, s[order]


def test_index_reranks_a_shortlist_through_the_network(tmp_path, small_tiles, caplog):
    corpus = tiny_corpus(12, seed=1)
    emb = tiny_embedder("sgr", corpus, seed=1)
    n = corpus.num_images
    with caplog.at_level("WARNING", logger="vsekit.index"):
        m = build_index(emb, corpus, tmp_path / "ix", progress=False, rerank=n)
    assert "trained without objective.embedding" in caplog.text
    assert m["rerank"] == n and m["context_dtype"] == "float32" and m["similarity"] == "sgr"
    assert {"images.sets.npy", "images.offsets.npy", "captions.sets.npy"} <= set(m["files"])
    glob, img_sets = emb.encode_images(corpus, parts=True)
    queries = ["a red circle left of the square", "blue star", "small green square above a big circle",
               "the star and the circle", "left right", "a big blue"]
    full = SearchIndex.open(tmp_path / "ix", emb)
    short = SearchIndex.open(tmp_path / "ix", emb, rerank=3)
    differs = 0
    for q in queries:
        order, scores = exact_ranking(emb, img_sets, q)
        hits = full.search_text(q, k=n)  # rerank >= N: the network's exact ranking of every image
        assert [h.id for h in hits] == [corpus.image_ids[r] for r in order]
        # the index's vectors were encoded in other batches than exact_ranking's: equal up to float noise
        np.testing.assert_allclose([h.score for h in hits], scores, rtol=0, atol=1e-6)
        # rerank < N: the 3 best by inner product of the pooled embeddings, in the network's order
        qv, _ = emb.encode_texts([q], parts=True)
        ip = glob @ qv[0]
        top3 = np.lexsort((np.arange(n), -ip))[:3]
        net = {int(r): s for r, s in zip(order, scores)}
        want = sorted(top3.tolist(), key=lambda r: (-net[r], r))
        got = short.search_text(q, k=3)
        assert [h.id for h in got] == [corpus.image_ids[r] for r in want]
        assert [h.score for h in got] == pytest.approx([net[r] for r in want], abs=1e-6)
        differs += [h.id for h in got] != [h.id for h in hits[:3]]
        # k above rerank: the shortlist grows to k
        assert len(short.search_text(q, k=5)) == 5
    assert differs  # the shortlist does miss some of the network's best: the test can tell the two apart
    # image -> text through the network: an indexed image's regions against every caption
    cap_glob, cap_sets = emb.encode_texts(corpus, parts=True)
    sv = emb.score_sets(img_sets, cap_sets, image_rows=[4])[0]
    hits = full.search_vectors(glob[4:5], "images", "captions", corpus.num_captions, query_sets=img_sets.subset([4]))[0]
    assert [h.text for h in hits] == [corpus.captions[j] for j in np.lexsort((np.arange(len(sv)), -sv))]
    with pytest.raises(SearchIndexError, match="local sets"):
        full.search_vectors(glob[4:5], "images", "captions", 3)
    # same side: inner product of the pooled embeddings, no network
    same = full.search_vectors(glob[4:5], "images", "images", 3)[0]
    assert same[0].id == corpus.image_ids[4] and same[0].score == pytest.approx(float(glob[4] @ glob[4]))


def test_index_add_remove_and_float16(tmp_path, small_tiles):
    corpus = tiny_corpus(12, seed=2)
    emb = tiny_embedder("saf", corpus, seed=2)
    first = Corpus("first", [c for c, o in zip(corpus.captions, corpus.caption_to_image) if o < 7],
                   corpus.caption_to_image[corpus.caption_to_image < 7], corpus.image_ids[:7],
                   features=corpus.features[:7])
    build_index(emb, first, tmp_path / "grown", progress=False)
    _, added, _ = add_to_index(tmp_path / "grown", emb, corpus, progress=False)
    build_index(emb, corpus, tmp_path / "fresh", progress=False)
    assert added == 5
    grown, fresh = SearchIndex.open(tmp_path / "grown", emb), SearchIndex.open(tmp_path / "fresh", emb)
    for t in ("images", "captions"):
        # encoded in other batch groupings (7 + 5 vs 12): the same vectors up to the last bits on some CPUs
        np.testing.assert_allclose(grown.data.sets[t].vectors, fresh.data.sets[t].vectors, rtol=0, atol=1e-5)
        assert np.array_equal(grown.data.sets[t].offsets, fresh.data.sets[t].offsets)
    q = "a red circle left of the square"
    got, want = grown.search_text(q, 6), fresh.search_text(q, 6)
    assert [h.id for h in got] == [h.id for h in want]
    np.testing.assert_allclose([h.score for h in got], [h.score for h in want], rtol=0, atol=1e-5)
    remove_from_index(tmp_path / "grown", ids=["img3", "img8"])
    small = SearchIndex.open(tmp_path / "grown", emb, rerank=100)
    assert len(small.data.sets["images"]) == 10 == small.num_images
    assert len(small.data.sets["captions"]) == small.num_captions
    assert {h.id for h in small.search_text(q, 10)} == set(corpus.image_ids) - {"img3", "img8"}
    m = build_index(emb, corpus, tmp_path / "half", progress=False, context_dtype="float16")
    half = SearchIndex.open(tmp_path / "half", emb)
    assert m["context_dtype"] == "float16" and half.data.sets["images"].vectors.dtype == np.float16
    assert [h.score for h in half.search_text(q, 12)] == pytest.approx(
        sorted([h.score for h in fresh.search_text(q, 12)], reverse=True), abs=2e-3)
    with pytest.raises(SearchIndexError, match="rerank must be a positive integer"):
        build_index(emb, corpus, tmp_path / "bad", progress=False, rerank=0)


def test_cli_and_server_on_a_similarity_network_index(tmp_path, capsys, small_tiles):
    from fastapi.testclient import TestClient

    from vsekit.cli import main
    from vsekit.serve.app import create_app

    rng = np.random.default_rng(3)
    folder = tmp_path / "precomp"
    folder.mkdir()
    np.save(folder / "test_ims.npy", rng.standard_normal((6, REGIONS, FEAT)).astype(np.float32))
    caps = [" ".join(rng.choice(WORDS, 5)) for _ in range(12)]
    (folder / "test_caps.txt").write_text("\n".join(caps) + "\n", encoding="utf-8")
    corpus = Corpus("c", caps, np.arange(12) // 2, [str(i) for i in range(6)], features=np.zeros((6, REGIONS, FEAT)))
    emb = tiny_embedder("sgr", corpus)
    ckpt = save_checkpoint(tmp_path / "m.pt", {"model": emb.model.state_dict(), "vocab": emb.vocab.to_dict(),
                                               "config": emb.config.to_dict(), "feature_shape": [REGIONS, FEAT]})
    out = tmp_path / "ix"
    assert main(["index", "build", str(ckpt), "--data", str(folder), "--split", "test", "--out", str(out),
                 "--rerank", "4", "-q", "--device", "cpu"]) == 0
    assert "rerank 4 through the network" in capsys.readouterr().out
    assert read_manifest(out)["rerank"] == 4
    assert main(["search", str(out), caps[0], "--json", "-k", "6", "--rerank", "6", "--device", "cpu"]) == 0
    import json

    hits = json.loads(capsys.readouterr().out)
    back = Embedder.from_checkpoint(ckpt, device="cpu")
    _, sets = back.encode_images(corpus.__class__("x", caps, np.arange(12) // 2, [str(i) for i in range(6)],
                                                              features=np.load(folder / "test_ims.npy")), parts=True)
    order, scores = exact_ranking(back, sets, caps[0])
    assert [h["id"] for h in hits] == [str(r) for r in order]
    assert [h["score"] for h in hits] == pytest.approx(scores.tolist(), abs=1e-6)
    with TestClient(create_app(out, device="cpu", rerank=6)) as client:
        health = client.get("/health").json()
        assert health["rerank"] == 6 and health["similarity"] == "sgr"
        res = client.get("/search", params={"q": caps[0], "k": 6}).json()["results"]
        assert [r["id"] for r in res] == [str(r) for r in order]
    assert math.isfinite(hits[0]["score"])


# -- training -----------------------------------------------------------------------------------------------------
def test_a_tiny_run_trains_and_validates_through_the_network(tmp_path, cache, small_tiles):
    from vsekit.train.trainer import Trainer

    cfg = resolve_config("vsekit/configs/sgr_demo.yaml", [
        f"output_dir={tmp_path / 'run'}", "data.num_images=30", "data.max_images=16", "data.val_max_images=10",
        "model.embed_size=16", "model.similarity.sim_dim=8", "model.text_encoder.word_dim=8",
        "train.epochs=1", "train.batch_size=8", "train.progress=false", "optim.lr_mult={similarity: 0.5}"])
    trainer = Trainer(cfg)
    trainer.fit()
    val = [r for r in map(__import__("json").loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
           if r["kind"] == "val"]
    assert val and math.isfinite(val[-1]["rsum"])
    back = Embedder.from_checkpoint(tmp_path / "run", device="cpu")
    assert back.learned_similarity and back.similarity == "sgr"
