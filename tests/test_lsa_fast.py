"""The term-space randomized SVD behind the LSA caption vectors (vsekit.semantics.lsa.term_space_svd).

Every accuracy check is against an exact (dense LAPACK) SVD of the same TF-IDF matrix, and against
scikit-learn's ``TruncatedSVD``, the previous implementation, with the same ``n_iter`` and seed.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from sklearn.decomposition import TruncatedSVD
from sklearn.feature_extraction.text import TfidfVectorizer

from vsekit.semantics import PIPELINE_VERSION, LSAModel, fit_or_load_caption_vectors, lsa_caption_vectors
from vsekit.semantics import cache as cache_mod
from vsekit.semantics.lsa import CaptionPreprocessor, term_space_svd

K = 40


def zipf_captions(n: int, n_words: int = 500, n_topics: int = 12, seed: int = 0) -> list[str]:
    """Captions of 6-12 pseudo-words, each from one of ``n_topics`` Zipf distributions over the vocabulary.

    Its spectrum is flat around K = 40 (σ_40 / σ_50 ≈ 1.07), so a few power iterations are visibly off
    the exact SVD and the accuracy comparisons below cannot pass by convergence alone.
    """
    rng = random.Random(seed)
    cons, vows = "bdfgklmnprtvz", "aeiou"
    words = sorted({"".join(rng.choice(cons) + rng.choice(vows) for _ in range(3))
                    for _ in range(2 * n_words)})[:n_words]
    weights = [1.0 / (r + 1) ** 1.1 for r in range(n_words)]
    topics = [rng.sample(words, n_words) for _ in range(n_topics)]
    return [" ".join(rng.choices(topics[rng.randrange(n_topics)], weights=weights, k=rng.randint(6, 12)))
            for _ in range(n)]


def tfidf(captions: list[str]):
    pre = CaptionPreprocessor()
    return TfidfVectorizer(stop_words="english", smooth_idf=True).fit_transform([pre(c) for c in captions])


@pytest.fixture(scope="module")
def problem():
    """(captions, TF-IDF matrix, exact singular values, exact rank-K vectors U_K Σ_K)."""
    captions = zipf_captions(1500)
    x = tfidf(captions)
    u, s, _ = np.linalg.svd(x.toarray(), full_matrices=False)
    return captions, x, s, u[:, :K] * s[:K]


def gram_error(vectors: np.ndarray, exact: np.ndarray) -> float:
    """‖L Lᵀ − L* L*ᵀ‖_F / ‖L* L*ᵀ‖_F: what LSEH sees of the vectors is their Gram matrix."""
    v = np.asarray(vectors, dtype=np.float64)
    g, ge = v @ v.T, exact @ exact.T
    return float(np.linalg.norm(g - ge) / np.linalg.norm(ge))


def lseh_similarity(batch: np.ndarray) -> np.ndarray:
    c = batch.astype(np.float64) @ batch.T.astype(np.float64)
    m = c.max(axis=1, keepdims=True)
    m[m == 0] = 1.0
    return c / m


def sklearn_vectors(x, n_iter: int, random_state: int = 122) -> np.ndarray:
    return TruncatedSVD(K, algorithm="randomized", n_iter=n_iter, random_state=random_state).fit_transform(x)


@pytest.mark.parametrize("n_iter", [1, 5, 20])
def test_gram_error_vs_exact_svd_is_no_worse_than_truncated_svd(problem, n_iter: int) -> None:
    _, x, _, exact = problem
    components, _ = term_space_svd(x, K, n_iter=n_iter, random_state=122)
    new = gram_error(x @ components.T, exact)
    old = gram_error(sklearn_vectors(x, n_iter), exact)
    # Measured: new/old = 0.98 (1 iteration), 0.97 (5), 0.99 (20); errors 21%, 9.4%, 0.60%.
    assert new <= 1.01 * old
    assert {1: 0.25, 5: 0.11, 20: 0.008}[n_iter] > new > {1: 0.15, 5: 0.07, 20: 0.004}[n_iter]


def test_converges_to_the_exact_svd(problem) -> None:
    _, x, s, exact = problem
    components, singular_values = term_space_svd(x, K, n_iter=150, random_state=122)
    assert gram_error(x @ components.T, exact) < 1e-5
    np.testing.assert_allclose(singular_values, s[:K], rtol=1e-6)
    np.testing.assert_allclose(components @ components.T, np.eye(K), atol=1e-10)  # orthonormal rows
    # scikit-learn's svd_flip(u_based_decision=False) sign: each row's largest-magnitude entry is positive.
    assert (components[np.arange(K), np.abs(components).argmax(axis=1)] > 0).all()


def test_exact_when_the_block_spans_the_vocabulary() -> None:
    """K + 10 >= V: the range basis is the whole term space, so Rayleigh-Ritz is an exact SVD at any n_iter."""
    x = tfidf(zipf_captions(200, n_words=30, seed=1))
    k = x.shape[1] - 5
    u, s, _ = np.linalg.svd(x.toarray(), full_matrices=False)
    for n_iter in (0, 3):
        components, singular_values = term_space_svd(x, k, n_iter=n_iter, random_state=0)
        np.testing.assert_allclose(singular_values, s[:k], rtol=1e-9)
        assert gram_error(x @ components.T, u[:, :k] * s[:k]) < 1e-9


def test_lseh_similarity_agrees_with_the_previous_algorithm(problem) -> None:
    """S_ij = C_ij / max_k C_ik on random batches of 128, default n_iter: the new fit against scikit-learn's
    TruncatedSVD (the previous implementation) and both against the exact SVD."""
    captions, x, _, exact = problem
    new = lsa_caption_vectors(captions, n_components=K)
    old = sklearn_vectors(x, n_iter=20)
    rng = np.random.default_rng(0)
    batches = [rng.choice(len(captions), size=128, replace=False) for _ in range(50)]
    s_new, s_old, s_exact = ([lseh_similarity(v[b]) for b in batches] for v in (new, old, exact))
    diff = np.stack([np.abs(a - b) for a, b in zip(s_new, s_old)])
    # Measured: mean 4.4e-5, max 2.7e-3 (LSEH's margin λ·S, λ = 0.025, moves by < 7e-5).
    assert diff.mean() < 2e-4 and diff.max() < 1e-2
    err_new = np.mean([np.abs(a - b).mean() for a, b in zip(s_new, s_exact)])
    err_old = np.mean([np.abs(a - b).mean() for a, b in zip(s_old, s_exact)])
    assert 1e-4 < err_new <= 1.01 * err_old  # both ~1e-3 from the exact S


def test_fit_is_deterministic_for_a_seed(problem) -> None:
    captions = problem[0][:600]
    a = lsa_caption_vectors(captions, n_components=K, n_iter=4)
    np.testing.assert_array_equal(a, lsa_caption_vectors(captions, n_components=K, n_iter=4))
    other = lsa_caption_vectors(captions, n_components=K, n_iter=4, random_state=7)
    assert not np.array_equal(a, other)  # the seed is used ...
    # ... and only moves the result within the randomized error (≈ 10% at 4 iterations here).
    assert gram_error(other, a.astype(np.float64)) < 0.3


def test_model_config_matches_scikit_learn(problem) -> None:
    """Singular values and explained variance (computed without the projection) as TruncatedSVD reports them,
    once both have converged."""
    captions, x, _, _ = problem
    model, vectors = LSAModel.fit(captions, n_components=K, n_iter=150)
    svd = TruncatedSVD(K, algorithm="randomized", n_iter=150, random_state=122).fit(x)
    np.testing.assert_allclose(model.config["singular_values"], svd.singular_values_, rtol=1e-6)
    assert model.config["explained_variance_ratio_sum"] == pytest.approx(svd.explained_variance_ratio_.sum(),
                                                                         rel=1e-6)
    assert model.config["svd_solver"] == "randomized-term-space" and model.config["n_oversamples"] == 10
    np.testing.assert_allclose(vectors, x @ model.components.T, atol=1e-6)  # float32 product of X·Vᵀ


def test_rejects_bad_n_components(problem) -> None:
    x = problem[1]
    for k in (0, x.shape[1] + 1):
        with pytest.raises(ValueError, match="n_components"):
            term_space_svd(x, k, n_iter=1, random_state=0)


def test_cache_key_changed_with_the_algorithm(problem, tmp_path, monkeypatch) -> None:
    """Vectors cached by the TruncatedSVD pipeline (lsa-1) are not reused: their key no longer matches."""
    captions = problem[0][:300]
    old_version = ("lsa-1: letters-regex, sklearn-stopwords, porter-nltk-extensions, tfidf-smooth-l2, "
                   "tsvd-rand")
    assert PIPELINE_VERSION != old_version and PIPELINE_VERSION.startswith("lsa-2:")
    params = {"n_components": 8, "n_iter": 20, "random_state": 122}
    new_key = cache_mod.caption_set_key(captions, params)
    with monkeypatch.context() as m:
        m.setattr(cache_mod, "PIPELINE_VERSION", old_version)
        old_key = cache_mod.caption_set_key(captions, params)
        fit_or_load_caption_vectors(captions, None, tmp_path, n_components=8)  # a folder as lsa-1 keyed it
    assert old_key != new_key
    calls = []
    original = LSAModel.fit.__func__

    def counting_fit(cls, *args, **kwargs):
        calls.append(1)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(LSAModel, "fit", classmethod(counting_fit))
    fit_or_load_caption_vectors(captions, None, tmp_path, n_components=8)
    assert calls == [1]  # refitted, not loaded
    fit_or_load_caption_vectors(captions, None, tmp_path, n_components=8)
    assert calls == [1]  # and the new entry is then reused
    metas = [json.loads(p.read_text()) for p in tmp_path.glob("lsa-*/meta.json")]
    assert sorted(m["key"] for m in metas) == sorted([old_key, new_key])
    assert {m["pipeline_version"] for m in metas if m["key"] == new_key} == {PIPELINE_VERSION}


def test_blas_is_single_threaded_inside(problem, monkeypatch) -> None:
    """The dense steps run with one BLAS thread whatever the process's setting (see term_space_svd)."""
    from threadpoolctl import threadpool_info, threadpool_limits

    from vsekit.semantics import lsa as lsa_mod

    seen: list[int] = []
    lu = lsa_mod.la.lu

    def recording_lu(*args, **kwargs):
        seen.append(max(p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"))
        return lu(*args, **kwargs)

    monkeypatch.setattr(lsa_mod.la, "lu", recording_lu)
    x = problem[1]
    with threadpool_limits(limits=2, user_api="blas"):
        assert max(p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas") == 2
        term_space_svd(x, K, n_iter=2, random_state=0)
    assert seen == [1, 1]
