"""Semantic recall (vsekit.eval.semantic) against a naive reference: full matrices, one stable sort per query."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vsekit.eval import EvaluationError, retrieval_metrics
from vsekit.eval.semantic import lsa_vectors_for, semantic_metrics
from vsekit.models.similarity import order_sim
from vsekit.semantics import LSAModel

# ------------------------------------------------------------------------------------------ reference


def brute_semantic(S, c2i, lsa, thresholds, ks, max_r):
    """Per-query loops over the full (N, M) scores; relevance from the full caption-caption cosines."""
    n, m = S.shape
    norm = np.linalg.norm(lsa, axis=1, keepdims=True)
    unit = np.divide(lsa, norm, out=np.zeros_like(lsa), where=norm > 0)
    C = unit @ unit.T
    plaus = np.full((n, m), -np.inf)
    for i in range(n):
        mine = np.flatnonzero(c2i == i)
        if mine.size:
            plaus[i] = C[mine].max(axis=0)
    exact = c2i[None, :] == np.arange(n)[:, None]
    out = {}
    for name, t in [(f"{t:g}", t) for t in thresholds] + [("exact", np.inf)]:
        rel = exact | (plaus >= t)
        for d in ("i2t", "t2i"):
            rows = []
            if d == "i2t":
                for i in range(n):
                    if exact[i].any():
                        rows.append((S[i], rel[i]))
            else:
                for j in range(m):
                    rows.append((S[:, j], rel[:, j]))
            hits = {k: 0 for k in ks}
            ap = rp = nrel = capped = 0.0
            for s, r in rows:
                order = np.lexsort((np.arange(len(s)), -s))
                rq = r[order]
                big_r = int(rq.sum())
                reff = min(big_r, max_r)
                for k in ks:
                    hits[k] += bool(rq[:k].any())
                found = 0
                total = 0.0
                for pos in range(reff):
                    if rq[pos]:
                        found += 1
                        total += found / (pos + 1)
                ap += total / reff
                rp += rq[:reff].sum() / reff
                nrel += big_r
                capped += big_r > max_r
            q = len(rows)
            for k in ks:
                out[f"sem@{name}_{d}_r{k}"] = 100.0 * hits[k] / q
            out[f"sem@{name}_{d}_map_at_r"] = 100.0 * ap / q
            out[f"sem@{name}_{d}_rprec"] = 100.0 * rp / q
            out[f"sem@{name}_{d}_num_relevant"] = nrel / q
            out[f"sem@{name}_{d}_capped"] = capped / q
        out[f"sem@{name}_rsum"] = sum(out[f"sem@{name}_{d}_r{k}"] for d in ("i2t", "t2i") for k in ks)
    return out


def assert_matches(got, want):
    assert set(got) - {"curve"} == set(want)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key


# ------------------------------------------------------------------------------------------ data


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def corpus(seed=0, n=23, dim=12, k=4, shuffle=True):
    """Images with 0..6 captions (incl. 0 and 1), float64 embeddings, low-dimensional LSA vectors (so
    cosines spread over [-1, 1]) with a zero row and a duplicated row."""
    rng = np.random.default_rng(seed)
    per_image = rng.integers(1, 7, size=n)
    per_image[:3] = (1, 6, 0)
    c2i = np.repeat(np.arange(n), per_image)
    if shuffle:
        c2i = rng.permutation(c2i)
    images = unit(rng.standard_normal((n, dim)))
    captions = unit(images[c2i] + 1.0 * rng.standard_normal((len(c2i), dim)))
    lsa = rng.standard_normal((len(c2i), k))
    lsa[5] = 0.0
    lsa[7] = lsa[11]
    return images, captions, c2i, lsa


THRESHOLDS = (-0.2, 0.3, 0.5, 0.8, 0.95)


# ------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("chunk_size", [1, 4, 9, None])
@pytest.mark.parametrize("max_r", [3, 1000])
def test_matches_brute_force(shuffle, chunk_size, max_r):
    images, captions, c2i, lsa = corpus(seed=1, shuffle=shuffle)
    got = semantic_metrics(images, captions, c2i, lsa, thresholds=THRESHOLDS, ks=(1, 3, 5),
                           max_r=max_r, chunk_size=chunk_size)
    want = brute_semantic(images @ captions.T, c2i, lsa, THRESHOLDS, (1, 3, 5), max_r)
    assert_matches(got, want)
    if max_r == 3:
        assert got["sem@-0.2_i2t_capped"] > 0  # the cap was exercised


def test_ties_go_to_the_lower_index():
    # small integer embeddings: many exactly equal scores, also at the cut-off of the top R
    rng = np.random.default_rng(3)
    n, per = 15, 3
    c2i = rng.permutation(np.repeat(np.arange(n), per))
    images = rng.integers(0, 2, size=(n, 3)).astype(np.float64)
    captions = rng.integers(0, 2, size=(n * per, 3)).astype(np.float64)
    lsa = rng.integers(-1, 2, size=(n * per, 3)).astype(np.float64)
    for max_r in (2, 5, 1000):
        got = semantic_metrics(images, captions, c2i, lsa, thresholds=(0.4, 0.9), ks=(1, 2, 5),
                               max_r=max_r, chunk_size=4)
        assert_matches(got, brute_semantic(images @ captions.T, c2i, lsa, (0.4, 0.9), (1, 2, 5), max_r))


def test_float32_inputs_match_brute_force():
    images, captions, c2i, lsa = corpus(seed=5, n=31)
    im, cap, v = images.astype(np.float32), captions.astype(np.float32), lsa.astype(np.float32)
    got = semantic_metrics(im, cap, c2i, v, thresholds=THRESHOLDS, ks=(1, 5, 10), chunk_size=6)
    S = (torch.from_numpy(im) @ torch.from_numpy(cap).t()).double().numpy()
    assert_matches(got, brute_semantic(S, c2i, v.astype(np.float64), THRESHOLDS, (1, 5, 10), 1000))


def test_order_similarity_and_torch_inputs():
    images, captions, c2i, lsa = corpus(seed=2)
    images, captions = np.abs(images), np.abs(captions)
    got = semantic_metrics(torch.from_numpy(images), torch.from_numpy(captions), torch.from_numpy(c2i),
                           torch.from_numpy(lsa), thresholds=(0.5,), similarity="order", chunk_size=5)
    S = order_sim(torch.from_numpy(images), torch.from_numpy(captions)).numpy()
    assert_matches(got, brute_semantic(S, c2i, lsa, (0.5,), (1, 5, 10), 1000))


@pytest.mark.parametrize("seed", [0, 1])
def test_threshold_above_one_is_the_exact_protocol(seed):
    rng = np.random.default_rng(seed)
    n, per = 40, 5
    c2i = rng.permutation(np.repeat(np.arange(n), per))
    images = unit(rng.standard_normal((n, 16))).astype(np.float32)
    captions = unit(images[c2i] + 1.5 * rng.standard_normal((n * per, 16))).astype(np.float32)
    lsa = rng.standard_normal((n * per, 8)).astype(np.float32)
    lsa[per:2 * per] = lsa[0]  # identical caption semantics (cosine 1) still do not reach 1.01
    got = semantic_metrics(images, captions, c2i, lsa, thresholds=(1.01,), chunk_size=7)
    want = retrieval_metrics(images, captions, c2i)
    for level in ("1.01", "exact"):
        for d in ("i2t", "t2i"):
            for k in (1, 5, 10):
                assert got[f"sem@{level}_{d}_r{k}"] == want[f"{d}_r{k}"]
        assert got[f"sem@{level}_rsum"] == pytest.approx(want["rsum"], abs=1e-9)
    # with one image per caption, text -> image mAP@R and R-Precision are R@1
    assert got["sem@exact_t2i_map_at_r"] == pytest.approx(want["t2i_r1"])
    assert got["sem@exact_t2i_rprec"] == pytest.approx(want["t2i_r1"])
    assert got["sem@exact_i2t_num_relevant"] == per and got["sem@exact_t2i_num_relevant"] == 1


def test_monotonic_in_the_threshold():
    images, captions, c2i, lsa = corpus(seed=4, n=40)
    grid = tuple(np.round(np.linspace(-1.0, 1.0, 21), 2))
    got = semantic_metrics(images, captions, c2i, lsa, thresholds=grid, chunk_size=8)
    curve = got["curve"]
    assert [c["threshold"] for c in curve] == list(grid)
    for d in ("i2t", "t2i"):
        for key in (f"{d}_r1", f"{d}_r5", f"{d}_r10", f"{d}_num_relevant"):
            values = [c[key] for c in curve]
            assert all(x >= y for x, y in zip(values, values[1:])), key
            assert values[-1] >= got[f"sem@exact_{key}"]
    # threshold -1: every caption is relevant to every image that has one; a caption-less image is
    # relevant to nothing (it has no caption semantics), image 2 here
    with_captions = len(np.unique(c2i))
    assert with_captions == 39
    assert curve[0]["i2t_r1"] == 100.0 and curve[0]["i2t_map_at_r"] == pytest.approx(100.0)
    assert curve[0]["i2t_num_relevant"] == len(c2i) and curve[0]["t2i_num_relevant"] == with_captions


def test_keys_and_curve():
    images, captions, c2i, lsa = corpus(seed=0)
    got = semantic_metrics(images, captions, c2i, lsa)
    for t in ("0.5", "0.6", "0.7", "0.8", "0.9", "exact"):
        for d in ("i2t", "t2i"):
            for key in ("r1", "r5", "r10", "map_at_r", "rprec", "num_relevant", "capped"):
                assert isinstance(got[f"sem@{t}_{d}_{key}"], float)
    assert [c["threshold"] for c in got["curve"]] == [0.5, 0.6, 0.7, 0.8, 0.9]
    assert got["curve"][2]["i2t_r1"] == got["sem@0.7_i2t_r1"]
    assert got["curve"][2]["max_r"] == 1000


def test_bad_inputs():
    images, captions, c2i, lsa = corpus(seed=0)
    with pytest.raises(EvaluationError, match="caption_vectors"):
        semantic_metrics(images, captions, c2i, lsa[:-1])
    with pytest.raises(EvaluationError, match="repeat"):
        semantic_metrics(images, captions, c2i, lsa, thresholds=(0.5, 0.50))
    with pytest.raises(EvaluationError, match="max_r"):
        semantic_metrics(images, captions, c2i, lsa, max_r=0)
    with pytest.raises(EvaluationError, match="ks"):
        semantic_metrics(images, captions, c2i, lsa, ks=(0,))
    bad = lsa.copy()
    bad[0, 0] = np.nan
    with pytest.raises(EvaluationError, match="NaN"):
        semantic_metrics(images, captions, c2i, bad)
    nan_images = images.copy()
    nan_images[1, 0] = np.nan
    with pytest.raises(EvaluationError, match="NaN"):
        semantic_metrics(nan_images, captions, c2i, lsa)


# ------------------------------------------------------------------------------------------ LSA helper

TRAIN = [
    "a dog runs on the grass", "a brown dog plays with a ball", "two dogs run across a field",
    "a cat sleeps on a sofa", "a black cat sits by the window", "a kitten lies on a bed",
    "a man rides a bike down the street", "a woman rides a bicycle in the park",
    "a red bus drives down the road", "a yellow bus parked near a building",
    "people walk along the beach", "a boy surfs a big wave",
]


def test_lsa_helper_fits_on_training_captions_only():
    evaluated = ["a dog runs on the grass", "a dog runs on the grass zebra xylophone", "zebra xylophone",
                 "a cat sleeps on a sofa"]
    vectors = lsa_vectors_for(TRAIN, evaluated, n_components=5, random_state=0)
    assert vectors.shape == (4, 5) and vectors.dtype == np.float32
    model, _ = LSAModel.fit(TRAIN, n_components=5, random_state=0)
    np.testing.assert_array_equal(vectors, model.transform(evaluated))
    # words seen only in the evaluated captions contribute nothing
    np.testing.assert_allclose(vectors[0], vectors[1], rtol=0, atol=1e-6)  # two rows of one product
    np.testing.assert_array_equal(vectors[2], 0.0)
    # a model fitted on train + eval would know them
    both, _ = LSAModel.fit(TRAIN + evaluated, n_components=5, random_state=0)
    assert "zebra" in both.vocabulary and "zebra" not in model.vocabulary


def test_lsa_helper_with_cache(tmp_path):
    evaluated = ["a dog plays in a field", "a bus on the street"]
    plain = lsa_vectors_for(TRAIN, evaluated, n_components=4, random_state=1)
    cached = lsa_vectors_for(TRAIN, evaluated, cache_dir=tmp_path, n_components=4, random_state=1)
    again = lsa_vectors_for(TRAIN, evaluated, cache_dir=tmp_path, n_components=4, random_state=1)
    np.testing.assert_allclose(cached, plain, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(cached, again)
    assert len(list(tmp_path.glob("lsa-*"))) == 1


def test_semantic_metrics_on_lsa_vectors():
    # every image ranks the caption of its "partner" image first: wrong by exact pairs, right when the two
    # captions mean the same (the two dog captions), still wrong when they do not (dog vs bus)
    evaluated = ["a dog runs on the grass", "a brown dog plays with a ball", "a dog runs on the grass",
                 "a red bus drives down the road"]
    lsa = lsa_vectors_for(TRAIN * 2, evaluated, n_components=6, random_state=0)
    u = lsa / np.linalg.norm(lsa, axis=1, keepdims=True)
    partner = [1, 0, 3, 2]
    cos = np.array([u[i] @ u[p] for i, p in enumerate(partner)])
    assert cos[0] > 0.5 and abs(cos[2]) < 0.3  # the premise of the test
    c2i = np.arange(4)
    got = semantic_metrics(np.eye(4), np.eye(4)[partner], c2i, lsa, thresholds=(0.5, 0.99), ks=(1,))
    assert got["sem@exact_i2t_r1"] == 0.0 and got["sem@exact_t2i_r1"] == 0.0
    for t in (0.5, 0.99):
        assert got[f"sem@{t:g}_i2t_r1"] == 100.0 * np.mean(cos >= t)
        assert got[f"sem@{t:g}_t2i_r1"] == 100.0 * np.mean(cos >= t)
