"""LSA caption vectors: the caption semantics behind the LSEH loss (docs/methods/lseh.md).

Each training caption gets one vector, ``TruncatedSVD(TF-IDF(preprocess(caption)))``. LSEH only ever uses
dot products of these vectors (the Gram matrix ``L @ L.T`` of a batch), which do not depend on the SVD's sign
convention, so two fits agree up to the randomized SVD's approximation error.

Differences from the reference script (``SVDdescriptions/SVDdescriptions.py``), all deliberate:

* **Letters-only regex is applied.** The reference called pandas ``Series.str.replace("[^a-zA-Z#]", " ")``;
  pandas >= 2 reads that pattern as a literal string, so the step silently did nothing. We apply the regex,
  i.e. the behaviour the reference had under pandas 1.x and clearly intended.
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

  NLTK's entries with an apostrophe (``don't``, ``it's``...) never match a token here, because step 1 turns
  the apostrophe into a space, and its one-letter entries (``s, t, d, m, o, y``) are dropped anyway by the
  TF-IDF token pattern, which needs two characters.
* **Stored as float32 ``.npy``** instead of a multi-GB text file.
* **``fit`` returns ``X @ V.T``**, which is what scikit-learn's ``TruncatedSVD.fit_transform`` returns for
  the randomized solver (it equals ``U·Σ`` up to the approximation error) and makes :meth:`LSAModel.transform`
  of a training caption reproduce its training vector.
* **``n_iter`` default** (:data:`DEFAULT_N_ITER`) is lower than the reference's 100; see
  ``benchmarks/README.md`` (LSA section) for the time it saves and how close the Gram matrices stay.
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

import numpy as np
import scipy.sparse as sp
from nltk.stem.porter import PorterStemmer
from sklearn.decomposition import TruncatedSVD
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS, CountVectorizer, TfidfVectorizer
from sklearn.preprocessing import normalize

from vsekit.utils.io import atomic_write, atomic_write_json

logger = logging.getLogger(__name__)

#: Bumped whenever a change to this module changes the vectors, so cached vectors are refitted.
PIPELINE_VERSION = "lsa-1: letters-regex, sklearn-stopwords, porter-nltk-extensions, tfidf-smooth-l2, tsvd-rand"
MODEL_FORMAT = 1

DEFAULT_N_COMPONENTS = 400
DEFAULT_RANDOM_STATE = 122
#: Power iterations of the randomized SVD. The reference used 100: 43 min for 600K captions on a (busy)
#: 2-core machine; 20 took 7 min there, and their Gram matrix L·Lᵀ is within 0.13% (relative Frobenius
#: error) of the 100-iteration one, which moves LSEH's margins by < 0.0013 (benchmarks/README.md).
DEFAULT_N_ITER = 20

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


def _library_versions() -> dict[str, str]:
    import nltk
    import scipy
    import sklearn

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
        self._counter: CountVectorizer | None = None
        self._preprocessor: CaptionPreprocessor | None = None

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
        if isinstance(captions, str):
            raise TypeError("captions must be an iterable of caption strings, not one string")
        pre = CaptionPreprocessor()
        timer = {"preprocess_s": 0.0}

        def cleaned() -> Iterator[str]:
            for text in captions:
                t0 = time.perf_counter()
                out = pre(text)
                timer["preprocess_s"] += time.perf_counter() - t0
                yield out

        t_start = time.perf_counter()
        vectorizer = _tfidf_vectorizer()
        try:
            x = vectorizer.fit_transform(cleaned())
        except ValueError as e:  # "empty vocabulary": nothing but stop words / one-letter tokens
            raise ValueError(f"cannot fit LSA caption vectors: {e}") from e
        t_tfidf = time.perf_counter() - t_start - timer["preprocess_s"]
        n_docs, n_terms = x.shape
        if n_terms < 2:
            raise ValueError(f"cannot fit LSA caption vectors: only {n_terms} distinct term(s) after preprocessing")

        k = min(n_components, n_docs, n_terms)
        if k < n_components:
            warnings.warn(f"LSA: n_components={n_components} clamped to {k} "
                          f"({n_docs} captions, {n_terms} terms)", stacklevel=2)
        t0 = time.perf_counter()
        svd = TruncatedSVD(n_components=k, algorithm="randomized", n_iter=n_iter, random_state=random_state)
        vectors = svd.fit_transform(x).astype(np.float32)
        t_svd = time.perf_counter() - t0

        vocabulary = vectorizer.get_feature_names_out().tolist()
        config = {
            "format": MODEL_FORMAT,
            "pipeline_version": PIPELINE_VERSION,
            "n_components_requested": int(n_components),
            "n_components": int(k),
            "n_iter": int(n_iter),
            "random_state": int(random_state),
            "num_captions": int(n_docs),
            "num_terms": int(n_terms),
            "singular_values": svd.singular_values_.tolist(),
            "explained_variance_ratio_sum": float(svd.explained_variance_ratio_.sum()),
            "fit_seconds": {"preprocess": round(timer["preprocess_s"], 3), "tfidf": round(t_tfidf, 3),
                            "svd": round(t_svd, 3)},
            "versions": _library_versions(),
        }
        model = cls(vocabulary, vectorizer.idf_, svd.components_, config)
        return model, vectors

    def tfidf(self, captions: Sequence[str]) -> sp.csr_matrix:
        """The (n, V) L2-normalised TF-IDF rows of ``captions``, with the training vocabulary and idf."""
        if self._counter is None:
            self._counter = CountVectorizer(vocabulary=self.vocabulary, stop_words="english")
            self._preprocessor = CaptionPreprocessor()
        assert self._preprocessor is not None
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
