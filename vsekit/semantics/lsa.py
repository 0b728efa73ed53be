"""LSA caption vectors: the caption semantics behind the LSEH loss (docs/methods/lseh.md).

Each training caption gets one vector, ``TruncatedSVD(TF-IDF(preprocess(caption)))``. LSEH only ever uses
dot products of these vectors (the Gram matrix ``L @ L.T`` of a batch), which do not depend on the SVD's sign
convention, so two fits agree up to the randomized SVD's approximation error.

Differences from the reference script (``SVDdescriptions/SVDdescriptions.py``), all deliberate (the
letters-only regex, which pandas >= 2 silently skipped, float32 ``.npy`` storage and the lower ``n_iter``:
docs/methods/lseh.md, section 6):

* **Stop-word list.** The reference dropped NLTK's ``stopwords.words('english')`` (179 words) before
  stemming; that list is a corpus download, which vsekit never does. We drop scikit-learn's
  ``ENGLISH_STOP_WORDS`` (318 words) instead. The TF-IDF step drops scikit-learn's list from the *stemmed*
  text in both pipelines, so a caption word is treated differently only in two cases (see
  ``tests/test_semantics.py::test_stop_word_differences_with_the_reference``, which derives both lists):

  - kept by the reference (as its stem), dropped by us: the 69 scikit-learn stop words whose Porter stem is
    not itself a scikit-learn stop word, e.g. ``many→mani``, ``several→sever``, ``another→anoth``,
    ``together→togeth``, ``every→everi``, ``empty→empti``, ``something→someth``, ``someone→someon``,
    ``alone→alon``, ``always→alway``, ``nothing→noth``, ``twenty→twenti``, ``describe→describ``;
  - dropped by the reference, kept by us: 25 NLTK-only words that survive scikit-learn's list, namely
    ``did, does→doe, just, don, won, ma, ll, ve, ain`` and the ``n't`` stems ``aren, couldn, didn, doesn,
    hadn, hasn, haven, isn, mightn, mustn, needn, shan, shouldn, wasn, weren, wouldn``.

  NLTK's entries with an apostrophe (``don't``, ``it's``...) never match a token here, because the
  letters-only regex turns the apostrophe into a space, and its one-letter entries (``s, t, d, m, o, y``) are
  dropped anyway by the TF-IDF token pattern, which needs two characters.
* **``fit`` returns ``X @ V.T``**, which is what scikit-learn's ``TruncatedSVD.fit_transform`` returns for
  the randomized solver (it equals ``U·Σ`` up to the approximation error) and makes :meth:`LSAModel.transform`
  of a training caption reproduce its training vector.
* **The randomized SVD runs in term space** (:func:`term_space_svd`) instead of scikit-learn's
  ``TruncatedSVD``: the same power iterations, oversampling and starting block, but on the V×V matrix
  ``XᵀX`` instead of the M×V matrix ``X``: for 600K captions the SVD is 26× faster (the whole fit 14×, 6.8 min
  -> 28 s on a shared 2-core machine) and as accurate for a given ``n_iter`` (``benchmarks/README.md``, LSA
  section).
"""

from __future__ import annotations

import json
import logging
import re
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import nltk
import numpy as np
import scipy
import scipy.linalg as la
import scipy.sparse as sp
import sklearn
from nltk.stem.porter import PorterStemmer
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS, CountVectorizer, TfidfVectorizer
from sklearn.preprocessing import normalize
from threadpoolctl import threadpool_limits

from vsekit.utils.io import atomic_write, atomic_write_json

logger = logging.getLogger(__name__)

#: Bumped whenever a change to this module changes the vectors, so cached vectors are refitted.
#: lsa-2: the SVD moved from scikit-learn's TruncatedSVD to :func:`term_space_svd` (same subspace up to the
#: randomized error, but not the same numbers).
PIPELINE_VERSION = ("lsa-2: letters-regex, sklearn-stopwords, porter-nltk-extensions, tfidf-smooth-l2, "
                    "rand-svd-term-space")
MODEL_FORMAT = 1

DEFAULT_N_COMPONENTS = 400
DEFAULT_RANDOM_STATE = 122
#: Power iterations of the randomized SVD. The reference used 100; with 20, the Gram matrix L·Lᵀ of 600K
#: captions is within 0.13% (relative Frobenius error) of the exact rank-400 one, which moves LSEH's margins
#: by < 0.0013 (benchmarks/README.md).
DEFAULT_N_ITER = 20
#: Extra random directions of the range finder (k + 10 in all): scikit-learn's default, kept so that a given
#: ``n_iter`` means the same accuracy as with ``TruncatedSVD``.
N_OVERSAMPLES = 10

STOP_WORDS: frozenset[str] = frozenset(ENGLISH_STOP_WORDS)

_NOT_A_LETTER = re.compile(r"[^a-zA-Z#]")


class CaptionPreprocessor:
    """Steps 1-2 of the pipeline, memoised per token.

    Captions use a small vocabulary, so stemming each distinct token once (instead of ~7M times for COCO)
    turns the Porter stemmer from the bottleneck into a dictionary lookup.
    """

    def __init__(self, stop_words: Iterable[str] = STOP_WORDS, max_memo: int = 2_000_000) -> None:
        self.stop_words = frozenset(stop_words)
        # NLTK_EXTENSIONS is PorterStemmer's default mode, the one the reference ran with.
        self._stemmer = PorterStemmer(mode=PorterStemmer.NLTK_EXTENSIONS)
        self._memo: dict[str, str] = {}
        self._max_memo = max_memo

    def _term(self, token: str) -> str:
        term = self._memo.get(token)
        if term is None:
            if len(self._memo) >= self._max_memo:  # bound memory in long-running processes
                self._memo.clear()
            term = "" if token in self.stop_words else self._stemmer.stem(token)
            self._memo[token] = term
        return term

    def __call__(self, text: str) -> str:
        tokens = _NOT_A_LETTER.sub(" ", text).lower().split()
        return " ".join([t for t in map(self._term, tokens) if t])


_default_preprocessor: CaptionPreprocessor | None = None


def preprocess_caption(text: str) -> str:
    """Letters only, lower-case, stop-words dropped, Porter-stemmed: ``"Two running dogs!"`` -> ``"run dog"``."""
    global _default_preprocessor
    if _default_preprocessor is None:
        _default_preprocessor = CaptionPreprocessor()
    return _default_preprocessor(text)


def _tfidf_vectorizer() -> TfidfVectorizer:
    # The reference's settings; all else is scikit-learn's default (token pattern \b\w\w+\b, raw counts,
    # idf = ln((1+N)/(1+df)) + 1, L2-normalised rows).
    return TfidfVectorizer(stop_words="english", smooth_idf=True)


def fit_tfidf(captions: Iterable[str]) -> tuple[TfidfVectorizer, sp.csr_matrix, dict[str, float]]:
    """Steps 1-3 on the TRAINING captions: the fitted vectorizer, the (M, V) TF-IDF matrix and the seconds
    spent preprocessing and in TF-IDF. ``captions`` is consumed once (a generator works)."""
    if isinstance(captions, str):
        raise TypeError("captions must be an iterable of caption strings, not one string")
    pre = CaptionPreprocessor()
    timer = {"preprocess": 0.0}

    def cleaned() -> Iterator[str]:
        for text in captions:
            t0 = time.perf_counter()
            out = pre(text)
            timer["preprocess"] += time.perf_counter() - t0
            yield out

    t_start = time.perf_counter()
    vectorizer = _tfidf_vectorizer()
    try:
        x = vectorizer.fit_transform(cleaned())
    except ValueError as e:  # "empty vocabulary": nothing but stop words / one-letter tokens
        raise ValueError(f"cannot fit LSA caption vectors: {e}") from e
    timer["tfidf"] = time.perf_counter() - t_start - timer["preprocess"]
    if x.shape[1] < 2:
        raise ValueError(f"cannot fit LSA caption vectors: only {x.shape[1]} distinct term(s) after preprocessing")
    return vectorizer, x.tocsr(), timer


def term_space_svd(x: sp.spmatrix, n_components: int, *, n_iter: int, random_state: int,
                   n_oversamples: int = N_OVERSAMPLES) -> tuple[np.ndarray, np.ndarray]:
    """Top ``n_components`` right singular vectors and values of the sparse (M, V) matrix ``x``.

    Returns ``(components, singular_values)``: (K, V) float64 rows (orthonormal, sign-fixed as scikit-learn's
    ``svd_flip(u_based_decision=False)`` does: each row's largest-magnitude entry is positive) and (K,)
    float64, descending. Deterministic for a given ``random_state``.

    **Why not** ``TruncatedSVD``: for captions M ≫ V (COCO: 566K captions, ~23K terms) and
    scikit-learn's randomized SVD works on the M side. Every power iteration multiplies ``x`` and ``xᵀ`` by a
    dense block of K + 10 columns with scipy's single-threaded sparse product and LU-factorises an (M, K + 10)
    float64 matrix, and the range basis ends with an (M, K + 10) QR: ~100 GFLOP per iteration and
    several 2-GB arrays. Here the same subspace iteration runs on the V×V Gram matrix ``G = xᵀx``:

    * ``G`` is cheap to form and *sparser* than ``x`` (captions share a small vocabulary: 1.5M non-zeros
      against 3.7M for 600K captions), so one product ``G @ Q`` costs less than one of the two products
      ``x @ Q``, ``xᵀ @ (x Q)`` it replaces (the same power step, mathematically);
    * every dense operation (LU, QR, Rayleigh–Ritz) is on (V, K + 10) matrices, not (M, K + 10).

    The algorithm (Halko, Martinsson & Tropp 2011, subspace iteration + Rayleigh–Ritz):

    1. ``Q = RandomState(random_state).normal(size=(V, K + p))``: the starting block scikit-learn draws;
    2. ``n_iter`` times ``Q = LU(G @ Q)`` (LU normalisation, as scikit-learn's ``power_iteration_normalizer
       ='auto'``), in **float32**: rounding in an iterate only perturbs the start of the next one, which the
       iteration damps, so the subspace ends up as accurate as in float64 (the floor is ~1e-6 relative error of
       the Gram matrix, three orders of magnitude below the 20-iteration error at COCO scale, measured);
    3. ``Q = QR(G @ Q)`` in float64: one more half-step, so the basis spans ``G^(n_iter+1) Ω``, the row space
       that scikit-learn's ``B = Q_Mᵀ x`` has after ``n_iter`` iterations;
    4. Rayleigh–Ritz: eigendecomposition of ``Qᵀ G Q`` (float64). Its top-K eigenvectors ``Z`` give
       ``components = (Q Z)ᵀ`` and ``singular_values = sqrt(eigenvalues)``. ``x (Q Z)(Q Z)ᵀ`` is the best
       rank-K approximation of ``x`` with rows in span(Q); scikit-learn's rank-K result has its rows in the
       same span, so this approximates ``x`` at least as well for the same ``n_iter``. What LSEH needs, the
       Gram matrix of the caption vectors, is measured against an exact SVD in the tests and the benchmark.

    Forming ``xᵀx`` squares the condition number, which loses the *small* singular values to rounding; it
    does not matter here because only the top K are kept and σ₁²/σ_K² ≈ 55 for 600K TF-IDF captions.

    BLAS runs single-threaded here (``threadpool_limits``): the dense blocks are small (V × (K + 10), ~9M
    entries), and on a shared 2-core machine two OpenBLAS threads made this function 2x slower (load 5) to
    2.7x slower (load 9) than one, the spinning worker thread even slowing the (single-threaded) sparse
    products. It also makes the result independent of the BLAS thread count.
    """
    k = int(n_components)
    if not 1 <= k <= min(x.shape):
        raise ValueError(f"n_components={k} must be in [1, {min(x.shape)}] for a {x.shape} matrix")
    with threadpool_limits(limits=1, user_api="blas"):
        n_terms = x.shape[1]
        width = min(k + n_oversamples, n_terms)
        gram = (x.T @ x).tocsr().astype(np.float64)
        gram32 = gram.astype(np.float32)
        q = np.random.RandomState(random_state).normal(size=(n_terms, width)).astype(np.float32)
        for _ in range(n_iter):
            q, _ = la.lu(gram32 @ q, permute_l=True, check_finite=False)
        q, _ = la.qr(gram @ q.astype(np.float64), mode="economic", check_finite=False)
        ritz_values, ritz_vectors = la.eigh(q.T @ (gram @ q), check_finite=False)
        top = np.argsort(ritz_values)[::-1][:k]
        components = (q @ ritz_vectors[:, top]).T
        rows = np.arange(k)
        components *= np.sign(components[rows, np.abs(components).argmax(axis=1)])[:, None]
        return np.ascontiguousarray(components), np.sqrt(np.maximum(ritz_values[top], 0.0))


def _explained_variance_ratio(x: sp.spmatrix, components: np.ndarray, singular_values: np.ndarray) -> np.ndarray:
    """Per component, var(x @ v) / total variance of x's columns: scikit-learn's ``explained_variance_ratio_``.

    Computed without the (M, K) projection: ``‖x v‖² = σ²`` for a Rayleigh–Ritz vector and the column means of
    ``x @ v`` are ``mean(x) @ v``.
    """
    m = x.shape[0]
    mean = np.asarray(x.mean(axis=0), dtype=np.float64).ravel()
    total = float(x.multiply(x).sum()) / m - float(mean @ mean)
    explained = singular_values ** 2 / m - (components @ mean) ** 2
    return explained / total


def _library_versions() -> dict[str, str]:
    return {"numpy": np.__version__, "scipy": scipy.__version__, "sklearn": sklearn.__version__,
            "nltk": nltk.__version__}


class LSAModel:
    """A fitted TF-IDF vocabulary + idf + SVD components; projects new captions into the LSA space.

    ``components`` is (K, V): row k is the k-th right singular vector over the V vocabulary terms.
    """

    def __init__(self, vocabulary: Sequence[str], idf: np.ndarray, components: np.ndarray,
                 config: dict[str, Any] | None = None) -> None:
        self.vocabulary = list(vocabulary)
        self.idf = np.asarray(idf, dtype=np.float64)
        self.components = np.asarray(components, dtype=np.float64)
        self.config = dict(config or {})
        v = len(self.vocabulary)
        if self.idf.shape != (v,) or self.components.ndim != 2 or self.components.shape[1] != v:
            raise ValueError(f"inconsistent LSA model: {v} terms, idf {self.idf.shape}, "
                             f"components {self.components.shape}")
        self._counter = CountVectorizer(vocabulary=self.vocabulary, stop_words="english")
        self._preprocessor = CaptionPreprocessor()

    @property
    def n_components(self) -> int:
        return int(self.components.shape[0])

    @classmethod
    def fit(cls, captions: Iterable[str], *, n_components: int = DEFAULT_N_COMPONENTS,
            n_iter: int = DEFAULT_N_ITER, random_state: int = DEFAULT_RANDOM_STATE,
            ) -> tuple[LSAModel, np.ndarray]:
        """Fit on the TRAINING captions; returns the model and their (M, K) float32 vectors, row j <-> caption j.

        ``captions`` is consumed once (a generator works). K is ``n_components`` unless the corpus has fewer
        documents or terms, in which case it is clamped (with a warning).
        """
        vectorizer, x, seconds = fit_tfidf(captions)
        n_docs, n_terms = x.shape
        k = min(n_components, n_docs, n_terms)
        if k < n_components:
            warnings.warn(f"LSA: n_components={n_components} clamped to {k} "
                          f"({n_docs} captions, {n_terms} terms)", stacklevel=2)
        t0 = time.perf_counter()
        components, singular_values = term_space_svd(x, k, n_iter=n_iter, random_state=random_state)
        # float32 in and out: each entry sums ~6 products of numbers <= 1, so the error (~1e-7) is far below
        # the SVD's, and the product is 2-3x faster than in float64.
        vectors = x.astype(np.float32) @ components.T.astype(np.float32)
        seconds["svd"] = time.perf_counter() - t0

        vocabulary = vectorizer.get_feature_names_out().tolist()
        ratio = _explained_variance_ratio(x, components, singular_values)
        config = {
            "format": MODEL_FORMAT, "pipeline_version": PIPELINE_VERSION,
            "n_components_requested": int(n_components), "n_components": int(k), "n_iter": int(n_iter),
            "random_state": int(random_state), "svd_solver": "randomized-term-space",
            "n_oversamples": N_OVERSAMPLES, "num_captions": int(n_docs), "num_terms": int(n_terms),
            "singular_values": singular_values.tolist(), "explained_variance_ratio_sum": float(ratio.sum()),
            "fit_seconds": {k: round(t, 3) for k, t in seconds.items()}, "versions": _library_versions(),
        }
        model = cls(vocabulary, vectorizer.idf_, components, config)
        return model, vectors

    def tfidf(self, captions: Sequence[str]) -> sp.csr_matrix:
        """The (n, V) L2-normalised TF-IDF rows of ``captions``, with the training vocabulary and idf."""
        counts = self._counter.transform([self._preprocessor(c) for c in captions]).astype(np.float64)
        counts.data *= self.idf[counts.indices]
        return normalize(counts, norm="l2", copy=False)

    def transform(self, captions: Sequence[str], chunk_size: int = 65_536) -> np.ndarray:
        """(n, K) float32 vectors of new captions; equals ``fit``'s output for training captions."""
        if isinstance(captions, str):
            raise TypeError("captions must be a sequence of caption strings, not one string")
        out = np.empty((len(captions), self.n_components), dtype=np.float32)
        for lo in range(0, len(captions), chunk_size):
            chunk = captions[lo:lo + chunk_size]
            out[lo:lo + len(chunk)] = self.tfidf(chunk) @ self.components.T
        return out

    def save(self, folder: str | Path) -> Path:
        """Plain files, each written atomically: vocabulary.json, idf.npy, components.npy, config.json."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / "vocabulary.json", self.vocabulary)
        atomic_write(folder / "idf.npy", lambda f: np.save(f, self.idf))
        atomic_write(folder / "components.npy", lambda f: np.save(f, self.components))
        atomic_write_json(folder / "config.json", self.config)  # last: its presence marks a complete model
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> LSAModel:
        folder = Path(folder)
        config = json.loads((folder / "config.json").read_text())
        if config.get("format") != MODEL_FORMAT:
            raise ValueError(f"{folder}: LSA model format {config.get('format')!r}, expected {MODEL_FORMAT}")
        vocabulary = json.loads((folder / "vocabulary.json").read_text())
        idf = np.load(folder / "idf.npy", allow_pickle=False)
        components = np.load(folder / "components.npy", allow_pickle=False)
        return cls(vocabulary, idf, components, config)


def lsa_caption_vectors(captions: Iterable[str], **kwargs: Any) -> np.ndarray:
    """(M, K) float32 LSA vectors of the training captions (``LSAModel.fit`` without keeping the model)."""
    return LSAModel.fit(captions, **kwargs)[1]
