"""Time, memory and accuracy of fitting LSEH's LSA caption vectors at COCO scale (about 600K captions).

Times the current fit (``LSAModel.fit``: randomized SVD in term space) against the previous one
(scikit-learn's ``TruncatedSVD`` on the same TF-IDF matrix) in one run, and measures both against an exact
truncated SVD (ARPACK ``eigsh`` of ``XᵀX`` to machine precision).

The corpus is synthetic but shaped like COCO captions: images of a scene type (kitchen, street, beach...),
five captions per image that share the scene's main objects but word them differently, 8-15 words each,
a few hundred frequent real words and a Zipf tail of a few thousand rare ones (COCO has ~25K word types,
most of them rare). Seeded, so every run fits the same corpus.

    .venv/bin/python benchmarks/lsa_scale.py --num-captions 600000
    .venv/bin/python benchmarks/lsa_scale.py --num-captions 600000 --compare-n-iter 10 15 100 --skip-old
    .venv/bin/python benchmarks/lsa_scale.py --num-captions 100000 --blas-threads 1   # both fits, 1 thread

Accuracy is what LSEH sees of the vectors: the Gram matrix ``L Lᵀ`` of 4,096 random captions (relative
Frobenius error) and LSEH's row-max-normalised similarity ``S_ij = C_ij / max_k C_ik`` on 200 random batches
of 128. The criterion: the current fit's Gram error against the exact SVD is at most ``--tolerance`` (1.05)
times the previous fit's, and so is its p99 |ΔS|. ``--compare-n-iter`` adds current-algorithm fits with other
``n_iter``. Results: the LSA section of benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import scipy.sparse.linalg as sla

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vsekit.semantics.lsa import (  # noqa: E402
    DEFAULT_N_ITER,
    DEFAULT_RANDOM_STATE,
    LSAModel,
    _library_versions,
    fit_tfidf,
)

# Scene types: (subjects, actions, objects, places). Captions of one image share a scene.
SCENES: dict[str, tuple[str, str, str, str]] = {
    "kitchen": ("woman man chef cook person girl boy family",
                "cooking preparing cutting chopping making stirring baking washing",
                "food vegetables pizza sandwich meal dinner bowl pot pan knife oven stove sink counter",
                "kitchen restaurant counter home table"),
    "street": ("man woman people pedestrians person crowd cyclist driver",
               "walking crossing standing riding waiting driving parking",
               "street road car bus truck traffic light sign bicycle motorcycle sidewalk crosswalk",
               "city street downtown intersection corner town"),
    "beach": ("people man woman child surfer kids couple dog",
              "surfing swimming walking playing standing running lying",
              "surfboard waves ocean sand water umbrella towel kite boat",
              "beach shore ocean coast sea"),
    "tennis": ("player man woman athlete girl boy",
               "swinging hitting serving playing holding returning",
               "racket ball tennis net court shot",
               "court stadium match tournament"),
    "baseball": ("player batter pitcher catcher umpire boy team",
                 "swinging throwing pitching catching holding hitting running",
                 "bat ball glove helmet base uniform",
                 "field stadium game diamond park"),
    "giraffe": ("giraffe giraffes zebra zebras elephant elephants animals herd",
                "standing eating grazing walking drinking roaming",
                "trees leaves grass water fence rocks",
                "field savanna zoo enclosure plain forest"),
    "cat": ("cat kitten cats kitty",
            "sitting sleeping lying laying curled looking resting",
            "couch bed blanket laptop keyboard window pillow chair box",
            "room bedroom house home sofa"),
    "dog": ("dog puppy dogs pup",
            "running playing catching sitting lying chasing jumping",
            "frisbee ball stick toy leash grass yard",
            "park yard field backyard beach"),
    "train": ("train locomotive trains engine subway",
              "traveling pulling parked moving riding approaching stopped",
              "tracks station platform cars passengers bridge",
              "station railway city countryside tunnel"),
    "plane": ("airplane plane jet aircraft airliner",
              "flying landing parked taking sitting taxiing",
              "runway sky clouds airport tarmac wing",
              "airport sky runway air field"),
    "bathroom": ("bathroom toilet restroom sink shower",
                 "shown sitting installed clean white",
                 "toilet sink mirror bathtub tub tiles towel shower curtain",
                 "bathroom house hotel home"),
    "skate": ("skateboarder man boy guy teenager snowboarder skier",
              "riding jumping doing skiing skating grinding performing",
              "skateboard trick ramp rail snow slope skis board",
              "park mountain hill street slope"),
    "food": ("plate bowl dish tray",
             "topped filled covered served sitting",
             "broccoli meat rice cake donut banana apple orange carrots salad bread cheese",
             "table plate restaurant counter"),
    "living": ("living room family people friends man woman",
               "sitting watching playing relaxing holding",
               "couch television tv remote controller video game chair lamp fireplace",
               "room house apartment home"),
    "horse": ("horse horses cow cows sheep rider cowboy",
              "riding grazing standing walking pulling eating",
              "saddle cart fence grass hay pasture",
              "farm field pasture barn ranch"),
    "bird": ("bird birds pigeon seagull duck ducks",
             "perched sitting flying standing eating swimming",
             "branch tree pond water bench feeder",
             "tree park lake pond sky"),
    "market": ("vendor people shoppers woman man",
               "selling buying shopping looking standing",
               "fruit vegetables bananas oranges apples stand display baskets",
               "market store shop stall street"),
    "clock": ("clock tower building church steeple",
              "showing stands towering displaying",
              "time face hands roof windows sky",
              "city square downtown town"),
    "office": ("man woman person student worker",
               "using typing working sitting looking",
               "laptop computer desk monitor keyboard mouse phone papers",
               "office desk room library cafe"),
    "umbrella": ("woman man people person girl",
                 "holding walking carrying standing",
                 "umbrella rain coat bag jacket",
                 "street sidewalk city park"),
}
DETERMINERS = "a a a a the the an some two three several".split()
ADJECTIVES = ("large small big little young old white black red blue green yellow brown wooden tall "
              "colorful empty busy open crowded dirty clean modern tiny huge pretty cute giant").split()
PREPOSITIONS = "on in at near next to by under beside behind with across along".split()
EXTRAS = ("while another person watches", "on a sunny day", "in front of a building", "during the day",
          "with trees in the background", "next to each other", "at night", "on top of it",
          "as people look on", "in the distance", "with a smile", "together")
CONNECT = "is are".split()


def _rare_words(rng: random.Random, n: int) -> list[str]:
    """Pronounceable pseudo-words: the long tail of rare words and typos of a real caption corpus."""
    onsets = "b c d f g h j k l m n p r s t v w z br cr dr fl gr pl sh st tr ch".split()
    vowels = "a e i o u ai ea oo ou".split()
    codas = ["", "", "n", "r", "s", "t", "l", "ng", "ck", "nd", "st"]
    words: set[str] = set()
    while len(words) < n:
        syll = rng.choice((2, 2, 3, 3, 4))
        words.add("".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas) for _ in range(syll)))
    return sorted(words)


def synthetic_captions(num_captions: int, seed: int = 0, captions_per_image: int = 5,
                       num_rare_words: int = 24_000) -> list[str]:
    """COCO-like captions, ``captions_per_image`` consecutive captions per image (seeded)."""
    rng = random.Random(seed)
    scenes = [tuple(field.split() for field in fields) for fields in SCENES.values()]
    scene_weights = [1.0 / (i + 1) ** 0.7 for i in range(len(scenes))]
    # Rare words belong to a scene (a rare word in a real caption is usually about what is in the picture)
    # and are Zipf-distributed within it.
    rare = _rare_words(rng, num_rare_words)
    rare_by_scene = [rare[i::len(scenes)] for i in range(len(scenes))]
    rare_cum = np.cumsum(1.0 / np.arange(1, len(rare_by_scene[0]) + 1) ** 1.05).tolist()
    scene = 0

    def rare_word() -> str:
        words = rare_by_scene[scene if rng.random() < 0.8 else rng.randrange(len(scenes))]
        return rng.choices(words, cum_weights=rare_cum[:len(words)])[0]

    def noun_phrase(nouns: list[str], head: str) -> list[str]:
        words = [rng.choice(DETERMINERS)]
        if rng.random() < 0.5:
            words.append(rare_word() if rng.random() < 0.2 else rng.choice(ADJECTIVES))
        r = rng.random()
        words.append(head if r < 0.65 else rare_word() if r < 0.75 else rng.choice(nouns))
        return words

    out: list[str] = []
    while len(out) < num_captions:
        scene = rng.choices(range(len(scenes)), weights=scene_weights)[0]
        subjects, actions, objects, places = scenes[scene]
        subj, obj, place = rng.choice(subjects), rng.choice(objects), rng.choice(places)
        for _ in range(captions_per_image):
            target = rng.randint(8, 15)
            words = noun_phrase(subjects, subj)
            words += [rng.choice(CONNECT), rng.choice(actions)]
            words += noun_phrase(objects, obj)
            if len(words) < target:
                words += [rng.choice(PREPOSITIONS)] + noun_phrase(places, place)
            while len(words) < target:
                r = rng.random()
                if r < 0.4:
                    words += rng.choice(EXTRAS).split()
                elif r < 0.7:
                    words += ["and"] + noun_phrase(objects, rng.choice(objects))
                elif r < 0.85:
                    words += ["with"] + noun_phrase(objects, rare_word())
                else:
                    words += [rng.choice(PREPOSITIONS)] + noun_phrase(places, rng.choice(places))
            words = words[:15]
            text = " ".join(words)
            text = text[0].upper() + text[1:] + ("." if rng.random() < 0.6 else "")
            out.append(text)
    return out[:num_captions]


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def lseh_similarity(batch: np.ndarray) -> np.ndarray:
    """S of docs/methods/lseh.md: dot products divided by their row maximum (1 where the maximum is 0)."""
    c = batch.astype(np.float64) @ batch.T.astype(np.float64)
    m = c.max(axis=1, keepdims=True)
    m[m == 0] = 1.0
    return c / m


def sample_rows(num_rows: int, seed: int, sample: int = 4096, batch: int = 128,
                num_batches: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Random caption rows for the Gram comparison, and random LSEH-sized batches."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(num_rows, size=min(sample, num_rows), replace=False))
    batches = np.stack([rng.choice(num_rows, size=min(batch, num_rows), replace=False)
                        for _ in range(num_batches)])
    return rows, batches


def compare(ref: tuple[np.ndarray, np.ndarray], other: tuple[np.ndarray, np.ndarray]) -> dict[str, float]:
    """How far ``other``'s Gram matrix and LSEH similarities are from ``ref``'s (same sampled rows)."""
    a, b = ref[0].astype(np.float64), other[0].astype(np.float64)
    ga, gb = a @ a.T, b @ b.T
    ds = np.stack([np.abs(lseh_similarity(x) - lseh_similarity(y)) for x, y in zip(ref[1], other[1])])
    return {"gram_rel_fro": float(np.linalg.norm(ga - gb) / np.linalg.norm(ga)),
            "gram_max_abs": float(np.abs(ga - gb).max()),
            "S_mean_abs": float(ds.mean()), "S_p99_abs": float(np.quantile(ds, 0.99)),
            "S_max_abs": float(ds.max())}


def previous_fit(captions: list[str], n_components: int, n_iter: int,
                 random_state: int = DEFAULT_RANDOM_STATE) -> tuple[dict[str, float], np.ndarray]:
    """The fit as vsekit did it before the term-space SVD (PIPELINE_VERSION lsa-1): the same preprocessing
    and TF-IDF, then ``TruncatedSVD(randomized).fit_transform``, cast to float32. Returns (seconds, vectors)."""
    from sklearn.decomposition import TruncatedSVD

    _, x, seconds = fit_tfidf(captions)
    t0 = time.perf_counter()
    svd = TruncatedSVD(n_components=n_components, algorithm="randomized", n_iter=n_iter,
                       random_state=random_state)
    vectors = svd.fit_transform(x).astype(np.float32)
    seconds["svd"] = time.perf_counter() - t0
    return seconds, vectors


def exact_components(x, n_components: int) -> tuple[np.ndarray, float]:
    """Exact top right singular vectors (K, V) of the TF-IDF matrix ``x``: ARPACK eigsh of XᵀX at tol=0
    (machine precision), an algorithm independent of both fits (Lanczos). Returns (components, seconds)."""
    gram = (x.T @ x).tocsr()
    t0 = time.perf_counter()
    values, vectors = sla.eigsh(gram, k=n_components, which="LA", tol=0, v0=np.ones(gram.shape[0]))
    seconds = time.perf_counter() - t0
    return vectors[:, np.argsort(values)[::-1]].T, seconds


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def blas_threads() -> list[dict[str, object]]:
    from threadpoolctl import threadpool_info

    return [{k: d.get(k) for k in ("internal_api", "num_threads", "version")} for d in threadpool_info()]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-captions", type=int, default=600_000)
    p.add_argument("--n-iter", type=int, default=DEFAULT_N_ITER)
    p.add_argument("--n-components", type=int, default=400)
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic corpus")
    p.add_argument("--compare-n-iter", type=int, nargs="*", default=[],
                   help="also fit (current algorithm) with these n_iter")
    p.add_argument("--skip-old", action="store_true", help="do not time the previous (TruncatedSVD) fit")
    p.add_argument("--skip-exact", action="store_true", help="no exact SVD, so no accuracy numbers")
    p.add_argument("--tolerance", type=float, default=1.05,
                   help="current fit's error vs exact may be at most this times the previous fit's")
    p.add_argument("--blas-threads", type=int, default=None,
                   help="limit BLAS threads for the whole run (both fits); default: the library's default "
                        "(the current fit runs its BLAS single-threaded anyway, the previous one used all)")
    p.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    args = p.parse_args(argv)
    if args.blas_threads is not None:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=args.blas_threads, user_api="blas"):
            run(args)
    else:
        run(args)


def run(args: argparse.Namespace) -> None:

    t0 = time.perf_counter()
    captions = synthetic_captions(args.num_captions, seed=args.seed)
    t_gen = time.perf_counter() - t0
    rss_corpus = peak_rss_gib()
    types = Counter(w for c in captions for w in c.lower().rstrip(".").split())
    print(f"corpus: {len(captions):,} captions, {len(types):,} word types ({sum(n >= 5 for n in types.values()):,}"
          f" seen 5+ times), generated in {t_gen:.1f}s; e.g. {captions[:2]}", flush=True)

    rows, batches = sample_rows(len(captions), seed=args.seed)
    samples: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                           "python": platform.python_version(), **_library_versions(),
                           "blas": blas_threads()},
               "num_captions": len(captions), "rss_after_corpus_gib": round(rss_corpus, 2),
               "blas_threads_limit": args.blas_threads,
               "load_avg_start": load_average(), "fits": [], "comparisons": []}
    print(json.dumps({"machine": results["machine"], "load_avg": results["load_avg_start"]}), flush=True)

    def record(name: str, n_iter: int, seconds: dict[str, float], total: float, vectors: np.ndarray,
               **extra: object) -> None:
        row = {"fit": name, "n_iter": n_iter, **{f"{k}_s": round(v, 2) for k, v in seconds.items()},
               "total_s": round(total, 2), "peak_rss_gib": round(peak_rss_gib(), 2), "load_avg": load_average(),
               "shape": list(vectors.shape), **extra}
        print(json.dumps(row), flush=True)
        results["fits"].append(row)
        samples[name] = (vectors[rows], vectors[batches])

    # The current fit first, so that its peak RSS is its own (ru_maxrss is the process's maximum so far).
    for i, n_iter in enumerate([args.n_iter, *args.compare_n_iter]):
        t = time.perf_counter()
        model, vectors = LSAModel.fit(captions, n_components=args.n_components, n_iter=n_iter)
        total = time.perf_counter() - t
        record("new" if i == 0 else f"new-{n_iter}", n_iter, model.config["fit_seconds"], total, vectors,
               num_terms=model.config["num_terms"])
        del model, vectors
    if not args.skip_old:
        t = time.perf_counter()
        seconds, vectors = previous_fit(captions, args.n_components, args.n_iter)
        record("old", args.n_iter, seconds, time.perf_counter() - t, vectors)
        del vectors
    if not args.skip_exact:
        _, x, _ = fit_tfidf(captions)
        components, seconds = exact_components(x, args.n_components)
        print(json.dumps({"exact_eigsh_s": round(seconds, 2), "load_avg": load_average()}), flush=True)
        results["exact_eigsh_s"] = round(seconds, 2)
        samples["exact"] = (x[rows] @ components.T, np.stack([x[b] @ components.T for b in batches]))

    pairs = [(name, "exact") for name in samples if name != "exact" and "exact" in samples]
    if "old" in samples:
        pairs.append(("new", "old"))
    for name, ref in pairs:
        cmp = {"fit": name, "ref": ref, **compare(samples[ref], samples[name])}
        print(json.dumps(cmp), flush=True)
        results["comparisons"].append(cmp)
    errors = {c["fit"]: c for c in results["comparisons"] if c["ref"] == "exact"}
    if "new" in errors and "old" in errors:
        ok = all(errors["new"][m] <= args.tolerance * errors["old"][m] for m in ("gram_rel_fro", "S_p99_abs"))
        results["criterion"] = {"tolerance": args.tolerance, "pass": ok,
                                "gram_ratio": errors["new"]["gram_rel_fro"] / errors["old"]["gram_rel_fro"],
                                "S_p99_ratio": errors["new"]["S_p99_abs"] / errors["old"]["S_p99_abs"]}
        print(json.dumps({"criterion": results["criterion"]}), flush=True)
    times = {f["fit"]: f["total_s"] for f in results["fits"]}
    if "old" in times:
        results["speedup_total"] = round(times["old"] / times["new"], 1)
        print(json.dumps({"speedup_total": results["speedup_total"]}), flush=True)
    results["load_avg_end"] = load_average()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
