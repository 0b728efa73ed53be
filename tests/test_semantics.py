"""LSA caption semantics for LSEH (vsekit.semantics): preprocessing, fit/transform, persistence, cache."""

from __future__ import annotations

import json
import random
import re
import warnings

import numpy as np
import pytest
from nltk.stem.porter import PorterStemmer
from sklearn.decomposition import TruncatedSVD
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS, TfidfVectorizer

from vsekit.semantics import (
    DEFAULT_N_ITER,
    STOP_WORDS,
    LSAModel,
    StaleCacheError,
    fit_or_load_caption_vectors,
    fit_to_folder,
    load_caption_vectors,
    lsa_caption_vectors,
    preprocess_caption,
)
from vsekit.semantics import cache as cache_mod

# NLTK's stopwords.words('english') as the reference used it (nltk_data, 179 words); written out here
# because loading it needs a corpus download.
NLTK_ENGLISH_STOP_WORDS = frozenset("""
i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself yourselves he him
his himself she she's her hers herself it it's its itself they them their theirs themselves what which who
whom this that that'll these those am is are was were be been being have has had having do does did doing a
an the and but if or because as until while of at by for with about against between into through during
before after above below to from up down in out on off over under again further then once here there when
where why how all any both each few more most other some such no nor not only own same so than too very s t
can will just don don't should should've now d ll m o re ve y ain aren aren't couldn couldn't didn didn't
doesn doesn't hadn hadn't hasn hasn't haven haven't isn isn't ma mightn mightn't mustn mustn't needn needn't
shan shan't shouldn shouldn't wasn wasn't weren weren't won won't wouldn wouldn't
""".split())

SCENES = {
    "dog": ("dog puppy", "running playing catching chasing", "frisbee ball stick toy", "park grass yard"),
    "kitchen": ("woman chef cook", "cooking cutting preparing stirring", "vegetables pizza soup pan",
                "kitchen counter stove"),
    "tennis": ("player athlete", "swinging hitting serving", "racket ball net", "court stadium"),
    "train": ("train locomotive", "traveling pulling arriving", "tracks platform passengers",
              "station railway"),
    "beach": ("surfer swimmer", "surfing riding paddling", "surfboard wave board", "ocean beach shore"),
}


def make_captions(n: int, seed: int = 0) -> list[str]:
    """Small seeded caption corpus with topical structure, five captions per image."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        subj, verb, obj, place = (f.split() for f in rng.choice(list(SCENES.values())))
        s, o = rng.choice(subj), rng.choice(obj)
        for _ in range(5):
            adj = rng.choice(["big", "small", "young", "white", "brown", "happy", "red"])
            out.append(f"A {adj} {s} is {rng.choice(verb)} the {o} in the {rng.choice(place)}, "
                       f"{rng.randint(1, 9)} times!")
    return out[:n]


def reference_preprocess(text: str) -> str:
    """Steps 1-2 written the plain way (no memo), as the reference script does them."""
    stemmer = PorterStemmer()
    words = re.sub(r"[^a-zA-Z#]", " ", text).lower().split()
    return " ".join(stemmer.stem(w) for w in words if w not in ENGLISH_STOP_WORDS)


def reference_vectors(captions: list[str], n_components: int, n_iter: int, random_state: int) -> np.ndarray:
    x = TfidfVectorizer(stop_words="english", smooth_idf=True).fit_transform(
        [reference_preprocess(c) for c in captions])
    svd = TruncatedSVD(n_components=n_components, algorithm="randomized", n_iter=n_iter,
                       random_state=random_state)
    return svd.fit_transform(x)


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return make_captions(300)


@pytest.fixture(scope="module")
def fitted(corpus: list[str]) -> tuple[LSAModel, np.ndarray]:
    return LSAModel.fit(corpus, n_components=16, random_state=122)


# --- preprocessing -------------------------------------------------------------------------------------

def test_preprocess_keeps_letters_and_hash_only() -> None:
    assert preprocess_caption("running dogs") == "run dog"
    assert preprocess_caption("Two Running DOGS!!") == "run dog"  # 'two' is a stop word
    # Digits, punctuation and hyphens become spaces; one-letter leftovers stay (TF-IDF drops them later).
    assert preprocess_caption("cat42s, t-shirt;sky") == "cat s t shirt sky"
    assert preprocess_caption("#Beach day") == "#beach day"  # '#' is kept, as in the reference regex
    assert preprocess_caption("café") == "caf"  # non-ASCII letters are not in [a-zA-Z]
    assert preprocess_caption("The dog is on the table") == "dog tabl"
    assert preprocess_caption("") == "" and preprocess_caption(" ,.; 123 ") == ""


def test_preprocess_matches_plain_implementation(corpus: list[str]) -> None:
    for c in corpus[:50] + ["Bikes' riders were riding quickly, happily!", "it's a dog's life"]:
        assert preprocess_caption(c) == reference_preprocess(c)


def test_porter_stemmer_is_the_reference_mode() -> None:
    # NLTK_EXTENSIONS (the default the reference used) maps some irregular forms the original algorithm
    # does not: "dying" -> "die" rather than "dy".
    assert PorterStemmer().mode == PorterStemmer.NLTK_EXTENSIONS
    assert preprocess_caption("dying skies") == "die sky"


def test_stop_word_differences_with_the_reference() -> None:
    """Which caption words the reference (NLTK list, then sklearn's list after stemming) and we
    (sklearn's list, then sklearn's list again) treat differently; the docstring of vsekit.semantics.lsa
    lists them."""
    assert STOP_WORDS == ENGLISH_STOP_WORDS
    assert len(NLTK_ENGLISH_STOP_WORDS) == 179 and len(ENGLISH_STOP_WORDS) == 318
    nltk_only, sklearn_only = NLTK_ENGLISH_STOP_WORDS - ENGLISH_STOP_WORDS, ENGLISH_STOP_WORDS - NLTK_ENGLISH_STOP_WORDS
    assert {"don", "ll", "ve", "s", "t", "just", "did", "does", "doing", "having"} <= nltk_only
    assert {"describe", "call", "front", "top", "back", "side", "two", "many", "several"} <= sklearn_only
    assert (len(nltk_only), len(sklearn_only)) == (60, 199)

    stem = PorterStemmer().stem

    def term(word: str, pre_stem_list: frozenset[str]) -> str | None:
        """What a lower-case letters-only word becomes in the TF-IDF vocabulary (None: dropped)."""
        if word in pre_stem_list:
            return None
        s = stem(word)
        return None if s in ENGLISH_STOP_WORDS or len(s) < 2 else s

    candidates = {w for w in NLTK_ENGLISH_STOP_WORDS | ENGLISH_STOP_WORDS if w.isalpha()}
    reference_only = {w: term(w, NLTK_ENGLISH_STOP_WORDS) for w in candidates
                      if term(w, NLTK_ENGLISH_STOP_WORDS) != term(w, ENGLISH_STOP_WORDS)
                      and term(w, ENGLISH_STOP_WORDS) is None}
    ours_only = {w: term(w, ENGLISH_STOP_WORDS) for w in candidates
                 if term(w, NLTK_ENGLISH_STOP_WORDS) != term(w, ENGLISH_STOP_WORDS)
                 and term(w, NLTK_ENGLISH_STOP_WORDS) is None}
    assert len(reference_only) == 69 and len(ours_only) == 25
    assert reference_only["many"] == "mani" and reference_only["several"] == "sever"
    assert reference_only["together"] == "togeth" and reference_only["describe"] == "describ"
    assert set(ours_only) == {"ain", "aren", "couldn", "did", "didn", "does", "doesn", "don", "hadn", "hasn",
                              "haven", "isn", "just", "ll", "ma", "mightn", "mustn", "needn", "shan",
                              "shouldn", "ve", "wasn", "weren", "won", "wouldn"}
    # Words with apostrophes cannot be tokens after the letters-only step.
    assert all("'" not in w for w in (preprocess_caption(c) for c in ["don't", "it's", "you'll"]))


# --- fit / transform -----------------------------------------------------------------------------------

def test_fit_shapes_dtype_and_norms(fitted: tuple[LSAModel, np.ndarray], corpus: list[str]) -> None:
    model, vectors = fitted
    assert vectors.shape == (len(corpus), 16) and vectors.dtype == np.float32
    assert model.n_components == 16 and model.components.shape == (16, len(model.vocabulary))
    # Rows of X·V are projections of unit TF-IDF rows, so their norms are at most 1.
    assert np.linalg.norm(vectors, axis=1).max() <= 1 + 1e-5
    assert model.config["n_iter"] == DEFAULT_N_ITER and model.config["random_state"] == 122


def test_gram_matches_plain_sklearn_pipeline(fitted: tuple[LSAModel, np.ndarray], corpus: list[str]) -> None:
    _, vectors = fitted
    ref = reference_vectors(corpus, n_components=16, n_iter=DEFAULT_N_ITER, random_state=122)
    v = vectors.astype(np.float64)
    np.testing.assert_allclose(v @ v.T, ref @ ref.T, atol=1e-5)


def test_gram_matches_with_reference_n_iter() -> None:
    captions = make_captions(120, seed=3)
    vectors = lsa_caption_vectors(captions, n_components=8, n_iter=100, random_state=122)
    ref = reference_vectors(captions, n_components=8, n_iter=100, random_state=122)
    np.testing.assert_allclose(vectors @ vectors.T, ref @ ref.T, atol=1e-5)


def test_fit_is_deterministic_and_accepts_a_generator(corpus: list[str]) -> None:
    a = lsa_caption_vectors(corpus, n_components=8)
    b = lsa_caption_vectors((c for c in corpus), n_components=8)
    np.testing.assert_array_equal(a, b)


def test_transform_of_training_captions_reproduces_fit(fitted: tuple[LSAModel, np.ndarray],
                                                        corpus: list[str]) -> None:
    model, vectors = fitted
    np.testing.assert_allclose(model.transform(corpus), vectors, atol=1e-6)
    np.testing.assert_allclose(model.transform(corpus, chunk_size=7), vectors, atol=1e-6)
    new = model.transform(["a dog chasing a frisbee", "zzz qqq", ""])
    assert new.shape == (3, 16) and new.dtype == np.float32
    assert not new[1:].any()  # unseen words only / empty caption -> zero vector


def test_save_load_round_trip(fitted: tuple[LSAModel, np.ndarray], corpus: list[str], tmp_path) -> None:
    model, _ = fitted
    model.save(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "components.npy", "config.json", "idf.npy", "vocabulary.json"]
    loaded = LSAModel.load(tmp_path / "m")
    assert loaded.vocabulary == model.vocabulary and loaded.config == model.config
    np.testing.assert_array_equal(loaded.transform(corpus[:40]), model.transform(corpus[:40]))


def test_n_components_clamped_on_tiny_corpus() -> None:
    captions = ["a dog runs in the park", "a cat sleeps on a couch", "a man rides a horse"]
    with pytest.warns(UserWarning, match="clamped to 3"):
        model, vectors = LSAModel.fit(captions)  # 400 requested, 3 documents
    assert vectors.shape == (3, 3) and model.n_components == 3
    # Full rank: the Gram matrix is exactly that of the TF-IDF rows (unit diagonal).
    np.testing.assert_allclose(np.diag(vectors @ vectors.T), 1.0, atol=1e-5)
    with pytest.warns(UserWarning, match="clamped to 2"):
        _, vectors = LSAModel.fit(["dog dog", "cat", "dog cat", "cat dog"])  # 2 terms
    assert vectors.shape == (4, 2)


def test_degenerate_corpora_raise() -> None:
    with pytest.raises(ValueError, match="cannot fit"):
        LSAModel.fit(["the a of", "and or 1 2"])  # nothing but stop words and digits
    with pytest.raises(ValueError, match="cannot fit"):
        LSAModel.fit(["dog", "dogs"])  # one distinct term
    with pytest.raises(TypeError):
        LSAModel.fit("a single string")


def test_semantically_close_captions_score_higher() -> None:
    captions = [
        "a dog catching a frisbee in the park", "a brown dog runs after a frisbee on the grass",
        "a puppy plays with a ball in the park", "a dog chasing a ball across the grass",
        "a woman cooking vegetables in the kitchen", "a chef cuts vegetables on a kitchen counter",
        "a man cooking soup on the stove", "a woman stirring a pot of soup in a kitchen",
        "a train arriving at the station", "a locomotive pulls a train along the tracks",
        "passengers wait for a train on the platform", "an old train at a railway station",
        "a tennis player swings a racket", "a woman hitting a tennis ball with a racket",
        "a player serving the ball on a tennis court", "a man with a racket on the court",
    ]
    _, v = LSAModel.fit(captions, n_components=6)
    sim = v @ v.T
    topic = np.arange(len(captions)) // 4
    same = sim[(topic[:, None] == topic[None]) & ~np.eye(len(captions), dtype=bool)].mean()
    other = sim[topic[:, None] != topic[None]].mean()
    assert same > other + 0.2
    assert sim[0, 1] > sim[0, 4] and sim[4, 5] > sim[4, 8] and sim[8, 9] > sim[8, 12]


# --- folders and cache ---------------------------------------------------------------------------------

class FitCounter:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        original = LSAModel.fit.__func__

        def counting_fit(cls, *args, **kwargs):
            self.calls += 1
            return original(cls, *args, **kwargs)

        monkeypatch.setattr(LSAModel, "fit", classmethod(counting_fit))


def test_cache_fits_once_then_loads(corpus: list[str], tmp_path, monkeypatch) -> None:
    expected = lsa_caption_vectors(corpus, n_components=8)
    counter = FitCounter(monkeypatch)
    ids = [f"cap{i}" for i in range(len(corpus))]
    a = fit_or_load_caption_vectors(corpus, ids, tmp_path, n_components=8)
    b = fit_or_load_caption_vectors(corpus, ids, tmp_path, n_components=8)
    assert counter.calls == 1
    assert a.shape == (len(corpus), 8) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, expected)
    (folder,) = [p for p in tmp_path.iterdir() if p.name.startswith("lsa-")]
    assert {p.name for p in folder.iterdir()} == {"vectors.npy", "caption_ids.json", "model", "meta.json"}
    assert json.loads((folder / "caption_ids.json").read_text()) == ids
    assert not [p for p in tmp_path.iterdir() if ".building-" in p.name or ".old-" in p.name]

    # New ids for the same texts: no refit, the id table is refreshed.
    fit_or_load_caption_vectors(corpus, [f"x{i}" for i in range(len(corpus))], tmp_path, n_components=8)
    assert counter.calls == 1
    assert json.loads((folder / "caption_ids.json").read_text())[0] == "x0"


def test_cache_refits_on_changed_captions_or_parameters(corpus: list[str], tmp_path, monkeypatch) -> None:
    counter = FitCounter(monkeypatch)
    fit_or_load_caption_vectors(corpus, None, tmp_path, n_components=8)
    changed = corpus[:-1] + ["a completely different caption about a red bus"]
    v = fit_or_load_caption_vectors(changed, None, tmp_path, n_components=8)
    assert counter.calls == 2 and v.shape == (len(corpus), 8)
    fit_or_load_caption_vectors(corpus[:100], None, tmp_path, n_components=8)
    fit_or_load_caption_vectors(corpus, None, tmp_path, n_components=8, n_iter=3)
    assert counter.calls == 4
    fit_or_load_caption_vectors(corpus, None, tmp_path, n_components=8)  # the first entry is still there
    assert counter.calls == 4


def test_cache_refits_a_stale_or_broken_folder(corpus: list[str], tmp_path, monkeypatch) -> None:
    counter = FitCounter(monkeypatch)
    first = np.array(fit_or_load_caption_vectors(corpus, None, tmp_path, n_components=8))
    (folder,) = [p for p in tmp_path.iterdir() if p.name.startswith("lsa-")]
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "key": "0" * 64}))  # hash mismatch
    np.testing.assert_array_equal(fit_or_load_caption_vectors(corpus, None, tmp_path, n_components=8), first)
    assert counter.calls == 2
    np.save(folder / "vectors.npy", first[:-1])  # row count mismatch
    np.testing.assert_array_equal(fit_or_load_caption_vectors(corpus, None, tmp_path, n_components=8), first)
    assert counter.calls == 3
    (folder / "meta.json").unlink()  # incomplete folder
    fit_or_load_caption_vectors(corpus, None, tmp_path, n_components=8)
    assert counter.calls == 4
    assert not [p for p in tmp_path.iterdir() if ".building-" in p.name or ".old-" in p.name]


def test_load_caption_vectors_checks(corpus: list[str], tmp_path) -> None:
    out = fit_to_folder(corpus, None, tmp_path / "fit", n_components=8)
    v = load_caption_vectors(out, num_captions=len(corpus))
    assert isinstance(v, np.memmap) and v.shape == (len(corpus), 8)
    assert not isinstance(load_caption_vectors(out, mmap=False), np.memmap)
    with pytest.raises(StaleCacheError, match="rows"):
        load_caption_vectors(out, num_captions=len(corpus) + 1)
    with pytest.raises(StaleCacheError, match="other captions"):
        load_caption_vectors(out, key="deadbeef")
    with pytest.raises(StaleCacheError, match="meta.json"):
        load_caption_vectors(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="caption ids"):
        fit_to_folder(corpus, ["only-one-id"], tmp_path / "bad", n_components=8)


def test_fit_to_folder_with_line_numbers_as_ids(corpus: list[str], tmp_path) -> None:
    out = fit_to_folder(corpus[:60], [str(i) for i in range(60)], tmp_path / "out", n_components=8)
    assert json.loads((out / "caption_ids.json").read_text()) == [str(i) for i in range(60)]
    v = load_caption_vectors(out, num_captions=60)
    np.testing.assert_allclose(LSAModel.load(out / "model").transform(corpus[:60]), v, atol=1e-6)
    # The folder doubles as a cache entry: same key as fit_or_load_caption_vectors computes.
    meta = json.loads((out / "meta.json").read_text())
    assert meta["key"] == cache_mod.caption_set_key(
        corpus[:60], {"n_components": 8, "n_iter": DEFAULT_N_ITER, "random_state": 122})


def test_caption_set_key_is_unambiguous() -> None:
    p = {"n_components": 8, "n_iter": 5, "random_state": 0}
    assert cache_mod.caption_set_key(["ab", "c"], p) != cache_mod.caption_set_key(["a", "bc"], p)
    assert cache_mod.caption_set_key(["a"], p) != cache_mod.caption_set_key(["a"], {**p, "n_iter": 6})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache_mod.caption_set_key([], p) == cache_mod.caption_set_key([], p)
