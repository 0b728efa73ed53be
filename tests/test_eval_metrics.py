"""Retrieval metrics must reproduce the field's protocol exactly (VSE++'s evaluation.py; COCO 1K/5K as in the papers).

References here are deliberately naive: a full score matrix and one stable sort per query.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from vsekit.eval import (
    METRIC_KEYS,
    format_metrics_table,
    mean_average_precision,
    metrics_from_ranks,
    retrieval_metrics,
    retrieval_ranks,
    write_metrics_json,
)
from vsekit.models.similarity import order_sim

# ------------------------------------------------------------------------------------------ references


def full_scores(images: np.ndarray, captions: np.ndarray, similarity: str = "cosine") -> np.ndarray:
    a, b = torch.as_tensor(images), torch.as_tensor(captions)
    return (a @ b.t() if similarity == "cosine" else order_sim(a, b)).numpy()


def brute_ranks(S: np.ndarray, c2i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-query loop; order = (-score, index), i.e. a stable sort of -score."""
    n, m = S.shape
    i2t = np.full(n, -1)
    t2i = np.empty(m, dtype=np.int64)
    for i in range(n):
        order = np.lexsort((np.arange(m), -S[i]))
        position = np.empty(m, dtype=np.int64)
        position[order] = np.arange(m)
        mine = np.flatnonzero(c2i == i)
        if mine.size:
            i2t[i] = position[mine].min()
    for j in range(m):
        order = np.lexsort((np.arange(n), -S[:, j]))
        t2i[j] = int(np.flatnonzero(order == c2i[j])[0])
    return i2t, t2i


def brute_metrics(i2t: np.ndarray, t2i: np.ndarray) -> dict[str, float]:
    out = {}
    for name, r in (("i2t", i2t[i2t >= 0]), ("t2i", t2i)):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * np.mean(r < k)
        out[f"{name}_medr"] = math.floor(np.median(r)) + 1
        out[f"{name}_meanr"] = np.mean(r) + 1
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    return out


def assert_metrics_close(got: dict, want: dict) -> None:
    assert list(got) == list(METRIC_KEYS)
    for key in METRIC_KEYS:
        assert got[key] == pytest.approx(want[key], abs=1e-9), key


def vsepp_i2t(images: np.ndarray, captions: np.ndarray) -> tuple[float, ...]:
    """VSE++ ``evaluation.i2t`` re-implemented: image rows repeated 5x, captions in file order."""
    npts = images.shape[0] // 5
    ranks = np.zeros(npts)
    for index in range(npts):
        d = np.dot(images[5 * index].reshape(1, -1), captions.T).flatten()
        inds = np.argsort(d)[::-1]
        ranks[index] = min(np.where(inds == i)[0][0] for i in range(5 * index, 5 * index + 5))
    return _vsepp_summary(ranks)


def vsepp_t2i(images: np.ndarray, captions: np.ndarray) -> tuple[float, ...]:
    npts = images.shape[0] // 5
    ims = images[::5]
    ranks = np.zeros(5 * npts)
    for index in range(npts):
        d = np.dot(captions[5 * index : 5 * index + 5], ims.T)
        for i in range(len(d)):
            inds = np.argsort(d[i])[::-1]
            ranks[5 * index + i] = np.where(inds == index)[0][0]
    return _vsepp_summary(ranks)


def _vsepp_summary(ranks: np.ndarray) -> tuple[float, ...]:
    r1 = 100.0 * len(np.where(ranks < 1)[0]) / len(ranks)
    r5 = 100.0 * len(np.where(ranks < 5)[0]) / len(ranks)
    r10 = 100.0 * len(np.where(ranks < 10)[0]) / len(ranks)
    return r1, r5, r10, np.floor(np.median(ranks)) + 1, ranks.mean() + 1


# ------------------------------------------------------------------------------------------ data


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def variable_corpus(seed: int = 0, n: int = 37, dim: int = 24):
    """Images with 0..7 captions (incl. exactly 1 and 7), caption order shuffled."""
    rng = np.random.default_rng(seed)
    per_image = rng.integers(1, 8, size=n)
    per_image[:3] = (1, 7, 0)  # guaranteed: one caption, seven captions, none
    c2i = rng.permutation(np.repeat(np.arange(n), per_image))
    images = unit(rng.standard_normal((n, dim)))
    # captions near their image so that ranks are spread over 0..M, not all at chance
    captions = unit(images[c2i] + 1.2 * rng.standard_normal((len(c2i), dim)).astype(np.float32))
    return images, captions, c2i


def five_per_image(seed: int, n: int, dim: int = 32):
    rng = np.random.default_rng(seed)
    images = unit(rng.standard_normal((n, dim)))
    c2i = np.repeat(np.arange(n), 5)
    captions = unit(images[c2i] + 1.5 * rng.standard_normal((5 * n, dim)).astype(np.float32))
    return images, captions, c2i


# ------------------------------------------------------------------------------------------ tests


def test_matches_brute_force_with_variable_captions_per_image():
    images, captions, c2i = variable_corpus()
    want_i2t, want_t2i = brute_ranks(full_scores(images, captions), c2i)
    i2t, t2i = retrieval_ranks(images, captions, c2i, chunk_size=(8, 29))
    np.testing.assert_array_equal(i2t, want_i2t)
    np.testing.assert_array_equal(t2i, want_t2i)
    assert i2t[2] == -1  # the caption-less image is no i2t query, but stays a t2i candidate
    assert_metrics_close(retrieval_metrics(images, captions, c2i), brute_metrics(want_i2t, want_t2i))


def test_hand_computed_case():
    # image_emb = I, caption_emb = S^T  =>  scores are exactly S (rows: images, columns: captions)
    S = np.array(
        [
            [0.9, 0.1, 0.3, 0.5, 0.2, 0.0],
            [0.2, 0.8, 0.1, 0.7, 0.6, 0.4],
            [0.4, 0.3, 0.9, 0.6, 0.1, 0.2],
        ]
    )
    c2i = np.array([1, 0, 2, 2, 0, 1])  # image 0: captions 1, 4; image 1: 0, 5; image 2: 2, 3
    i2t, t2i = retrieval_ranks(np.eye(3), S.T.copy(), c2i)
    np.testing.assert_array_equal(i2t, [3, 3, 0])  # e.g. image 0: c0 .9, c3 .5, c2 .3, c4 .2 -> 3
    np.testing.assert_array_equal(t2i, [2, 2, 0, 1, 1, 0])
    m = retrieval_metrics(np.eye(3), S.T.copy(), c2i)
    assert m["i2t_r1"] == pytest.approx(100 / 3) and m["t2i_r1"] == pytest.approx(100 / 3)
    assert m["i2t_r5"] == m["i2t_r10"] == m["t2i_r5"] == m["t2i_r10"] == 100.0
    assert m["i2t_medr"] == 4.0 and m["i2t_meanr"] == 3.0  # ranks 3,3,0: median 3, mean 2
    assert m["t2i_medr"] == 2.0 and m["t2i_meanr"] == 2.0  # ranks 0,0,1,1,2,2: median 1, mean 1
    assert m["rsum"] == pytest.approx(2 * (100 / 3 + 200))


def test_tie_rule_lower_index_first():
    e = np.eye(3)
    captions = np.stack([e[0], e[1], e[0], e[2], e[0]])  # captions 0, 2, 4 are one vector
    images = np.stack([e[0], e[1], e[2], e[0]])  # images 0 and 3 are one vector
    c2i = np.array([1, 1, 0, 2, 3])
    # scores: images 0 and 3 -> [1 0 1 0 1]; image 1 -> [0 1 0 0 0]; image 2 -> [0 0 0 1 0]
    i2t, t2i = retrieval_ranks(images, captions, c2i)
    # image 0's caption 2 ties captions 0 and 4 and sorts after caption 0; image 3's caption 4 is third
    np.testing.assert_array_equal(i2t, [1, 0, 0, 2])
    # caption 0 (image 1) is beaten by the tied images 0 and 3; caption 4 (image 3) ties image 0, which
    # has the lower index; caption 2 (image 0) wins its tie with image 3
    np.testing.assert_array_equal(t2i, [2, 0, 0, 0, 1])
    # give image 0 the lower-index duplicate instead: rank 0
    assert retrieval_ranks(images, captions, np.array([0, 1, 1, 2, 3]))[0][0] == 0
    want = brute_ranks(full_scores(images, captions), c2i)
    np.testing.assert_array_equal(i2t, want[0])
    np.testing.assert_array_equal(t2i, want[1])


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, (4, 50), (50, 4), 10_000, None])
def test_heavy_ties_match_stable_sort_for_any_chunking(chunk):
    # small integer embeddings: every score is an exact integer, so ties are everywhere and no
    # rounding can blur the rule
    rng = np.random.default_rng(3)
    n, m = 23, 97
    images = rng.integers(-1, 2, (n, 6)).astype(np.float32)
    captions = rng.integers(-1, 2, (m, 6)).astype(np.float32)
    c2i = rng.integers(0, n, m)
    want = brute_ranks(full_scores(images, captions), c2i)
    got = retrieval_ranks(images, captions, c2i, chunk_size=chunk)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_chunked_equals_unchunked_and_input_kinds(tmp_path):
    images, captions, c2i = variable_corpus(seed=5, n=41)
    ref = retrieval_ranks(images, captions, c2i, chunk_size=100_000)
    for chunk in (1, 2, 5, (3, 17), (17, 3), 64, None):
        got = retrieval_ranks(images, captions, c2i, chunk_size=chunk)
        np.testing.assert_array_equal(got[0], ref[0])
        np.testing.assert_array_equal(got[1], ref[1])
    as_torch = retrieval_ranks(torch.from_numpy(images), torch.from_numpy(captions), torch.from_numpy(c2i))
    np.testing.assert_array_equal(as_torch[0], ref[0])
    np.testing.assert_array_equal(as_torch[1], ref[1])
    # read-only memmaps, read block by block
    paths = []
    for name, arr in (("img", images), ("cap", captions)):
        mm = np.lib.format.open_memmap(tmp_path / f"{name}.npy", mode="w+", dtype=np.float32, shape=arr.shape)
        mm[:] = arr
        mm.flush()
        del mm
        paths.append(tmp_path / f"{name}.npy")
    img_mm, cap_mm = (np.load(p, mmap_mode="r") for p in paths)
    got = retrieval_ranks(img_mm, cap_mm, c2i.tolist(), chunk_size=(7, 30))
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_array_equal(got[1], ref[1])
    m_np = retrieval_metrics(images, captions, c2i)
    assert retrieval_metrics(img_mm, cap_mm, c2i, protocol="full") == m_np
    assert retrieval_metrics(torch.from_numpy(images), torch.from_numpy(captions), c2i, device="cpu") == m_np


def test_torch_counting_path_matches(monkeypatch):
    # accelerators count with torch ops instead of numpy; run that path on CPU
    import vsekit.eval.metrics as metrics

    monkeypatch.setattr(metrics, "_numpy_counts", lambda device: False)
    rng = np.random.default_rng(31)
    images = rng.integers(-1, 2, (19, 5)).astype(np.float32)
    captions = rng.integers(-1, 2, (83, 5)).astype(np.float32)
    c2i = rng.integers(0, 19, 83)
    want = brute_ranks(full_scores(images, captions), c2i)
    for chunk in ((4, 9), None):
        got = retrieval_ranks(torch.from_numpy(images), torch.from_numpy(captions), c2i, chunk_size=chunk)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


def test_every_similarity_call_has_one_bounded_shape():
    images, captions, c2i = variable_corpus(seed=2, n=30)
    shapes = set()

    def spy(a, b):
        shapes.add((tuple(a.shape), tuple(b.shape)))
        return a @ b.t()

    retrieval_ranks(images, captions, c2i, similarity=spy, chunk_size=(8, 40))
    assert len(shapes) == 1  # padded blocks: same call shape for the pre-pass and every main block
    ((img_shape, cap_shape),) = shapes
    assert img_shape[0] <= 8 and cap_shape[0] <= 40


@pytest.mark.parametrize("chunk", [(12, 60), (7, 35), (5, 7), None])
def test_standard_layout_and_call_count(chunk):
    images, captions, c2i = five_per_image(seed=21, n=60)
    want = brute_ranks(full_scores(images, captions), c2i)
    calls = []

    def spy(a, b):
        calls.append(1)
        return a @ b.t()

    got = retrieval_ranks(images, captions, c2i, similarity=spy, chunk_size=chunk)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    if chunk in ((12, 60), None):  # caption blocks line up with image blocks: no extra pre-pass call
        rows, cols = chunk or (60, 300)
        assert len(calls) == (60 // rows) * (300 // cols)


@pytest.mark.parametrize("budget", [600, 5_000, 40_000, 1 << 26])
@pytest.mark.parametrize("layout", ["five", "variable"])
def test_default_blocks_follow_the_memory_budget(monkeypatch, budget, layout):
    # the default block holds what BLOCK_BUDGET allows (4-byte scores + 1-byte hits on CPU), in the inputs'
    # aspect; with captions stored image by image a caption block is its image block's captions, so the
    # pre-pass costs no call of its own
    import vsekit.eval.metrics as metrics

    monkeypatch.setitem(metrics.BLOCK_BUDGET, "cpu", budget)
    images, captions, c2i = five_per_image(seed=4, n=60) if layout == "five" else variable_corpus(seed=4, n=60)
    n, m = len(images), len(captions)
    shapes, calls = set(), []

    def spy(a, b):
        shapes.add((a.shape[0], b.shape[0]))
        calls.append(1)
        return a @ b.t()

    got = retrieval_ranks(images, captions, c2i, similarity=spy)
    want = brute_ranks(full_scores(images, captions), c2i)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    ((R, C),) = shapes
    row_blocks, col_blocks = math.ceil(n / R), math.ceil(m / C)
    assert R * C * 5 <= budget
    if budget >= 1 << 26:
        assert (R, C) == (n, m)  # everything fits: one block
    if layout == "five":
        assert C == 5 * R and len(calls) == row_blocks * col_blocks
    else:
        assert len(calls) > row_blocks * col_blocks  # irregular layout: the pre-pass has calls of its own


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_counting_split_over_threads_is_exact(monkeypatch, threads):
    # the CPU counting passes split a block's rows over one thread per torch thread; with every score an
    # integer, ties are everywhere, so any part that counted or listed an entry twice or not at all shows
    import vsekit.eval.metrics as metrics

    monkeypatch.setattr(metrics, "_MIN_PART_ROWS", 1)
    rng = np.random.default_rng(8)
    images = rng.integers(-1, 2, (29, 5)).astype(np.float32)
    captions = rng.integers(-1, 2, (131, 5)).astype(np.float32)
    c2i = rng.integers(0, 29, 131)
    want = brute_ranks(full_scores(images, captions), c2i)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert len(metrics._parts(29)) == threads
        for chunk in ((7, 40), (29, 131), None):
            got = retrieval_ranks(images, captions, c2i, chunk_size=chunk)
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_array_equal(got[1], want[1])
    finally:
        torch.set_num_threads(before)


def test_vsepp_reference_loops_give_identical_numbers():
    images, captions, c2i = five_per_image(seed=11, n=60)
    dup = np.repeat(images, 5, axis=0)  # VSE++ stores one image row per caption
    ours = retrieval_metrics(images, captions, c2i)
    r, ri = vsepp_i2t(dup, captions), vsepp_t2i(dup, captions)
    want = dict(zip(METRIC_KEYS[:5], r)) | dict(zip(METRIC_KEYS[5:10], ri))
    want["rsum"] = r[0] + r[1] + r[2] + ri[0] + ri[1] + ri[2]
    assert ours == {k: float(v) for k, v in want.items()}


def test_1k5fold_is_mean_of_folds_with_recomputed_rsum():
    images, captions, c2i = variable_corpus(seed=7, n=50)
    got, folds = retrieval_metrics(images, captions, c2i, protocol="1k5fold", return_folds=True)
    assert len(folds) == 5
    for f in range(5):
        caps = np.flatnonzero((c2i >= 10 * f) & (c2i < 10 * (f + 1)))
        expect = retrieval_metrics(images[10 * f : 10 * (f + 1)], captions[caps], c2i[caps] - 10 * f)
        assert folds[f] == expect
    for key in METRIC_KEYS[:-1]:
        assert got[key] == pytest.approx(np.mean([fold[key] for fold in folds]), abs=1e-12)
    recalls = [got[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)]
    assert got["rsum"] == pytest.approx(sum(recalls), abs=1e-12)
    assert got["rsum"] != pytest.approx(np.mean([fold["rsum"] for fold in folds]) * 6)  # the VSE++ print bug
    assert got == retrieval_metrics(images, captions, c2i, protocol="1k5fold")


def test_1k5fold_matches_vsepp_fold5_slicing():
    images, captions, c2i = five_per_image(seed=13, n=50)
    dup = np.repeat(images, 5, axis=0)
    rows = []
    for i in range(5):
        sl = slice(i * 50, (i + 1) * 50)  # VSE++: img_embs[i*5000:(i+1)*5000], 1000 images per fold
        r, ri = vsepp_i2t(dup[sl], captions[sl]), vsepp_t2i(dup[sl], captions[sl])
        rows.append(list(r) + list(ri))
    mean = np.array(rows).mean(axis=0)
    got = retrieval_metrics(images, captions, c2i, protocol="1k5fold")
    assert [got[k] for k in METRIC_KEYS[:-1]] == [float(v) for v in mean]
    assert got["rsum"] == mean[0] + mean[1] + mean[2] + mean[5] + mean[6] + mean[7]


def test_order_similarity_matches_brute_force():
    rng = np.random.default_rng(4)
    images, captions, c2i = variable_corpus(seed=4, n=25, dim=13)
    images, captions = np.abs(images), np.abs(captions)  # order embeddings are non-negative
    want = brute_ranks(full_scores(images, captions, "order"), c2i)
    for chunk in ((5, 16), 1000):
        got = retrieval_ranks(images, captions, c2i, similarity="order", chunk_size=chunk)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
    # exact integer case: order scores are sqrt of integers, ties included
    images = rng.integers(0, 3, (20, 5)).astype(np.float32)
    captions = rng.integers(0, 3, (70, 5)).astype(np.float32)
    c2i = rng.integers(0, 20, 70)
    want = brute_ranks(full_scores(images, captions, "order"), c2i)
    got = retrieval_ranks(images, captions, c2i, similarity="order", chunk_size=(3, 8))
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_float64_input_is_computed_in_float64():
    images, captions, c2i = variable_corpus(seed=8, n=12)
    seen = set()

    def spy(a, b):
        seen.add((a.dtype, b.dtype))
        return a @ b.t()

    retrieval_ranks(images.astype(np.float64), captions, c2i, similarity=spy)
    assert seen == {(torch.float64, torch.float64)}
    seen.clear()
    retrieval_ranks(torch.from_numpy(images).half(), captions, c2i, similarity=spy)
    assert seen == {(torch.float32, torch.float32)}


def test_nondeterministic_similarity_is_reported():
    images, captions, c2i = variable_corpus(seed=9, n=15)
    gen = torch.Generator().manual_seed(0)

    def noisy(a, b):
        return a @ b.t() + 1e-4 * torch.rand(a.shape[0], b.shape[0], generator=gen)

    with pytest.warns(RuntimeWarning, match="not reproducible"):
        retrieval_ranks(images, captions, c2i, similarity=noisy)


def test_validation_errors():
    images, captions, c2i = variable_corpus(seed=1, n=10)
    with pytest.raises(ValueError, match="embedding sizes differ"):
        retrieval_metrics(images, captions[:, :5], c2i)
    with pytest.raises(ValueError, match="entries but there are"):
        retrieval_metrics(images, captions, c2i[:-1])
    with pytest.raises(ValueError, match="outside"):
        retrieval_metrics(images, captions, np.where(c2i == 0, 10, c2i))
    with pytest.raises(ValueError, match="outside"):
        retrieval_metrics(images, captions, np.where(c2i == 0, -1, c2i))
    with pytest.raises(ValueError, match="empty"):
        retrieval_metrics(images[:0], captions, c2i)
    with pytest.raises(ValueError, match="empty"):
        retrieval_metrics(images, captions[:0], c2i[:0])
    with pytest.raises(TypeError, match="integer"):
        retrieval_metrics(images, captions, c2i.astype(np.float64))
    with pytest.raises(ValueError, match="2-D"):
        retrieval_metrics(images[0], captions, c2i)
    with pytest.raises(ValueError, match="unknown protocol"):
        retrieval_metrics(images, captions, c2i, protocol="5k")
    with pytest.raises(ValueError, match="multiple of 5"):
        retrieval_metrics(images[:9], captions[c2i < 9], c2i[c2i < 9], protocol="1k5fold")
    with pytest.raises(ValueError, match="chunk_size"):
        retrieval_metrics(images, captions, c2i, chunk_size=0)
    with pytest.raises(KeyError, match="unknown similarity"):
        retrieval_metrics(images, captions, c2i, similarity="nope")
    bad = images.copy()
    bad[c2i[0]] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(bad, captions, c2i)


def test_metrics_from_ranks_formulas():
    m = metrics_from_ranks(np.array([0, 4, 9, 10, -1]), np.array([0, 0, 1, 2, 5, 11]))
    assert m["i2t_r1"] == 25.0 and m["i2t_r5"] == 50.0 and m["i2t_r10"] == 75.0
    assert m["i2t_medr"] == 7.0  # floor(median(0,4,9,10) = 6.5) + 1
    assert m["i2t_meanr"] == 6.75
    assert m["t2i_medr"] == 2.0 and m["t2i_meanr"] == pytest.approx(19 / 6 + 1)
    assert m["t2i_r1"] == 100.0 * 2 / 6 and m["t2i_r5"] == 100.0 * 4 / 6 and m["t2i_r10"] == 100.0 * 5 / 6
    assert m["rsum"] == pytest.approx(150 + 100 * 11 / 6)


def test_table_and_json(tmp_path):
    images, captions, c2i = variable_corpus(seed=6, n=20)
    m, folds = retrieval_metrics(images, captions, c2i, return_folds=True)
    table = format_metrics_table(m, title="toy")
    lines = table.splitlines()
    assert lines[0] == "toy" and "R@1" in lines[1] and "meanr" in lines[1]
    assert lines[2].startswith("image->text") and lines[3].startswith("text->image")
    assert lines[4].split() == ["rsum", f"{m['rsum']:.2f}"]
    assert len({len(line) for line in lines[1:4]}) == 1  # fixed width
    path = write_metrics_json(
        tmp_path / "out" / "metrics.json", m, folds=folds, protocol="full", split="test"
    )
    data = json.loads(path.read_text())
    assert data["metrics"] == m and data["folds"] == folds and data["protocol"] == "full"
    with pytest.raises(KeyError):
        format_metrics_table({"rsum": 1.0})


# ------------------------------------------------------------------------------------------ mAP


def brute_map(q, g, ql, gl, at=None, metric="cosine"):
    aps = []
    for i in range(len(q)):
        if metric == "cosine":
            s = (g / np.linalg.norm(g, axis=1, keepdims=True)) @ (q[i] / np.linalg.norm(q[i]))
            order = np.lexsort((np.arange(len(g)), -s))
        else:
            d = ((g - q[i]) ** 2).sum(1)
            order = np.lexsort((np.arange(len(g)), d))
        if ql.ndim == 1:
            rel = gl[order] == ql[i]
        else:
            rel = (gl[order] & ql[i]).any(1)
        if at is not None:
            rel = rel[:at]
        hits, precisions = 0, []
        for pos, r in enumerate(rel, start=1):
            if r:
                hits += 1
                precisions.append(hits / pos)
        aps.append(np.mean(precisions) if precisions else 0.0)
    return float(np.mean(aps))


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("at", [None, 5])
def test_mean_average_precision_matches_brute_force(metric, at):
    rng = np.random.default_rng(12)
    q = rng.standard_normal((30, 8))
    g = rng.standard_normal((45, 8))
    ql, gl = rng.integers(0, 4, 30), rng.integers(0, 4, 45)
    got = mean_average_precision(q, g, ql, gl, at=at, metric=metric, chunk_size=7)
    assert got == pytest.approx(brute_map(q, g, ql, gl, at, metric), abs=1e-9)
    # multi-label relevance: share at least one label
    qm, gm = rng.random((30, 5)) < 0.3, rng.random((45, 5)) < 0.3
    got = mean_average_precision(q, g, qm, gm, at=at, metric=metric, chunk_size=7)
    assert got == pytest.approx(brute_map(q, g, qm, gm, at, metric), abs=1e-9)


def test_a_block_scorer_ranks_as_the_embeddings_it_scores():
    """A BlockScorer (blocks of row numbers in, their scores out) in place of embeddings: the same metrics as
    the embeddings it scores (small integers: every product exact), and ``captions_at`` keeps the named rows."""
    from vsekit.eval import BlockScorer

    g = torch.Generator().manual_seed(0)
    img = torch.randint(-3, 4, (30, 8), generator=g).float()
    cap = torch.randint(-3, 4, (70, 8), generator=g).float()
    c2i = np.arange(70) % 30

    class Dot(BlockScorer):
        num_images, num_captions = 30, 70

        def __call__(self, image_rows, caption_rows):
            assert image_rows.dtype == caption_rows.dtype == torch.int64 and image_rows.ndim == 1
            return img[image_rows] @ cap[caption_rows].t()

    for chunk in ((7, 11), None):
        want = retrieval_metrics(img, cap, c2i, chunk_size=chunk)
        assert retrieval_metrics(None, None, c2i, similarity=Dot(), chunk_size=chunk) == want
    rows = np.arange(0, 70, 2)
    assert retrieval_metrics(None, None, c2i[rows], similarity=Dot().captions_at(rows)) == \
        retrieval_metrics(img, cap[rows], c2i[rows])
    with pytest.raises(ValueError, match="pass None"):
        retrieval_metrics(img, cap, c2i, similarity=Dot())
