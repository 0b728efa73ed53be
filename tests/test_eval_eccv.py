"""COCO 5K evaluation with ECCV Caption / CxC positives (vsekit.eval.eccv) against eccv-caption's own metric
functions, on the package's real 5K id sets."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("eccv_caption")

from vsekit.data.formats.karpathy import read_karpathy  # noqa: E402
from vsekit.eval.eccv import (  # noqa: E402
    coco_ids_from_corpus,
    eccv_metrics,
    load_eccv_annotations,
)
from vsekit.eval.metrics import EvaluationError  # noqa: E402

DEPTH = 50  # ranked items handed to the package per query (its max ECCV R is 48)
TOL = 1e-6


@pytest.fixture(scope="module")
def ann():
    return load_eccv_annotations()


@pytest.fixture(scope="module")
def reference():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "failed to import ujson"
        from eccv_caption import Metrics

        return Metrics()


def _ranked_reference(q: np.ndarray, g: np.ndarray, depth: int = DEPTH, rows: int = 1000) -> np.ndarray:
    """Top ``depth`` gallery rows per query by descending score, ties by lower index, from exact scores
    (int64 or float64 numpy products: independent of the code under test)."""
    out = np.empty((len(q), depth), dtype=np.int64)
    col = np.arange(len(g))
    for a in range(0, len(q), rows):
        s = q[a : a + rows] @ g.T
        top = np.argpartition(-s, depth, axis=1)[:, : depth + 1]  # candidates, re-sorted below
        # lexsort by (-score, index) over all items tied with the candidates' worst score
        for i in range(len(s)):
            cut = s[i, top[i]].min()
            cand = col[s[i] >= cut]
            order = np.lexsort((cand, -s[i, cand]))
            out[a + i] = cand[order[:depth]]
    return out


def _package_scores(reference, img, cap, image_ids, caption_ids):
    i2t_rank = _ranked_reference(img, cap)
    t2i_rank = _ranked_reference(cap, img)
    i2t = {int(image_ids[i]): [int(caption_ids[j]) for j in row] for i, row in enumerate(i2t_rank)}
    t2i = {int(caption_ids[j]): [int(image_ids[i]) for i in row] for j, row in enumerate(t2i_rank)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores = reference.compute_all_metrics(
            i2t, t2i, target_metrics=("eccv_r1", "eccv_map_at_r", "eccv_rprecision", "cxc_recalls"),
            Ks=(1, 5, 10), verbose=False,
        )
    return {f"{src}_{d}_{m}": 100.0 * float(v[d])
            for key, v in scores.items() for d in ("i2t", "t2i")
            for src, m in [key.split("_", 1)]}


def _shuffled_ids(ann, seed):
    rng = np.random.default_rng(seed)
    return rng.permutation(ann.image_ids), rng.permutation(ann.caption_ids)


def _check_equal(ours, theirs):
    assert set(ours) == set(theirs), (sorted(ours), sorted(theirs))
    for k in theirs:
        assert ours[k] == pytest.approx(theirs[k], abs=TOL), k


def test_matches_package_integer_scores(ann, reference):
    """Exact integer dot products (float32-exact): the ranking is bitwise defined, ties included."""
    image_ids, caption_ids = _shuffled_ids(ann, 0)
    rng = np.random.default_rng(1)
    img = rng.integers(-1000, 1001, size=(len(image_ids), 8))
    cap = rng.integers(-1000, 1001, size=(len(caption_ids), 8))
    ours = eccv_metrics(img.astype(np.float32), cap.astype(np.float32), image_ids, caption_ids)
    _check_equal(ours, _package_scores(reference, img, cap, image_ids, caption_ids))


def test_matches_package_with_many_ties(ann, reference):
    """Few distinct scores: ties everywhere, also across the top-R cut (lower index first)."""
    image_ids, caption_ids = _shuffled_ids(ann, 2)
    rng = np.random.default_rng(3)
    img = rng.integers(-2, 3, size=(len(image_ids), 3))
    cap = rng.integers(-2, 3, size=(len(caption_ids), 3))
    ours = eccv_metrics(torch.from_numpy(img).float(), torch.from_numpy(cap).float(), image_ids.tolist(),
                        [str(c) for c in caption_ids], chunk_size=777)
    _check_equal(ours, _package_scores(reference, img, cap, image_ids, caption_ids))


def test_matches_package_float64_embeddings(ann, reference):
    image_ids, caption_ids = _shuffled_ids(ann, 4)
    rng = np.random.default_rng(5)
    img = rng.standard_normal((len(image_ids), 16))
    cap = rng.standard_normal((len(caption_ids), 16))
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    cap /= np.linalg.norm(cap, axis=1, keepdims=True)
    ours = eccv_metrics(img, cap, image_ids, caption_ids)
    _check_equal(ours, _package_scores(reference, img, cap, image_ids, caption_ids))


def test_perfect_ranker_hits_the_ceiling(ann):
    """A similarity that puts every annotated ECCV positive above every negative: mAP@R = R-P = R@1 = 100,
    except for the two image queries whose positives include a caption outside the 25,000 (R counts it,
    as in the package)."""
    image_ids, caption_ids = ann.image_ids, ann.caption_ids
    col = {int(c): j for j, c in enumerate(caption_ids)}
    row = {int(i): k for k, i in enumerate(image_ids)}
    positive = torch.zeros((5000, 25000), dtype=torch.bool)
    for q, pos in ann.positives["eccv"]["i2t"].items():
        positive[row[q], [col[p] for p in pos if p in col]] = True
    for q, pos in ann.positives["eccv"]["t2i"].items():
        positive[[row[p] for p in pos], col[q]] = True

    def oracle(images, captions):  # the embeddings are row numbers
        return positive[images[:, 0].long()][:, captions[:, 0].long()].float()

    img = torch.arange(5000, dtype=torch.float32)[:, None]
    cap = torch.arange(25000, dtype=torch.float32)[:, None]
    m = eccv_metrics(img, cap, image_ids, caption_ids, similarity=oracle)
    reachable = [len([p for p in v if p in col]) / len(v) for v in ann.positives["eccv"]["i2t"].values()]
    assert m["eccv_i2t_r1"] == pytest.approx(100.0) and m["eccv_t2i_r1"] == pytest.approx(100.0)
    assert m["eccv_t2i_map_at_r"] == pytest.approx(100.0) and m["eccv_t2i_rprecision"] == pytest.approx(100.0)
    assert m["eccv_i2t_rprecision"] == pytest.approx(100.0 * np.mean(reachable))
    assert m["eccv_i2t_map_at_r"] == pytest.approx(100.0 * np.mean(reachable))
    assert m["eccv_i2t_rprecision"] < 100.0


def test_not_coco_5k_is_an_error(ann):
    rng = np.random.default_rng(0)
    img, cap = rng.standard_normal((1000, 4)), rng.standard_normal((5000, 4))
    with pytest.raises(EvaluationError, match="5,000 images"):
        eccv_metrics(img, cap, ann.image_ids[:1000], ann.caption_ids[:5000])
    ids = ann.image_ids.copy()
    ids[7] = 123456789
    with pytest.raises(EvaluationError, match="not in COCO 5K test"):
        eccv_metrics(rng.standard_normal((5000, 4)), rng.standard_normal((25000, 4)), ids, ann.caption_ids)
    with pytest.raises(EvaluationError, match="not a COCO id"):
        eccv_metrics(rng.standard_normal((5000, 4)), rng.standard_normal((25000, 4)),
                     [f"img{i}.jpg" for i in range(5000)], ann.caption_ids)


# --------------------------------------------------------------------------------------------------
# Karpathy JSON -> COCO ids


def _karpathy_json(path, ann, *, drop_image=None, extra_split_image=True, wrong_owner=False):
    """A dataset_coco.json look-alike: the 5K test images (shuffled) with their COCO caption ids as sentids,
    one extra 6th caption (kept out of the protocol), and a train image."""
    rng = np.random.default_rng(7)
    i2t = ann.positives["original"]["i2t"]
    images, sentid = [], 0
    for k, cocoid in enumerate(rng.permutation(ann.image_ids).tolist()):
        if cocoid == drop_image:
            continue
        sents = [{"raw": f"caption {c} ", "sentid": c, "imgid": k} for c in i2t[cocoid]]
        if k == 3:
            sents.append({"raw": "a sixth caption", "sentid": 990000001, "imgid": k})
        images.append({"filepath": "val2014", "filename": f"COCO_val2014_{cocoid:012d}.jpg", "imgid": k,
                       "split": "test", "cocoid": cocoid, "sentences": sents})
        sentid += 1
    if wrong_owner:
        a, b = images[0]["sentences"], images[1]["sentences"]
        a[0]["sentid"], b[0]["sentid"] = b[0]["sentid"], a[0]["sentid"]
    if extra_split_image:
        images.append({"filepath": "train2014", "filename": "COCO_train2014_000000000009.jpg", "imgid": 99999,
                       "split": "train", "cocoid": 9, "sentences": [{"raw": "food", "sentid": 1, "imgid": 99999}]})
    path.write_text(json.dumps({"dataset": "coco", "images": images}))
    return path


def test_mapping_from_karpathy_json(tmp_path, ann):
    corpus = read_karpathy(_karpathy_json(tmp_path / "dataset_coco.json", ann), None, "test")
    ids = coco_ids_from_corpus(corpus)
    assert len(ids.image_cocoids) == 5000 and len(ids.caption_ids) == 25000
    assert ids.dropped_caption_ids == ("990000001",)
    assert ids.image_cocoids.tolist() == [int(i) for i in corpus.image_ids]
    assert ids.caption_ids.tolist() == [int(corpus.caption_ids[j]) for j in ids.caption_rows]
    owner = ann.caption_to_image
    assert all(owner[int(c)] == ids.image_cocoids[corpus.caption_to_image[j]]
               for c, j in zip(ids.caption_ids, ids.caption_rows))
    assert set(ids.caption_ids.tolist()) == set(ann.caption_ids.tolist())


def test_mapping_errors(tmp_path, ann):
    small = read_karpathy(_karpathy_json(tmp_path / "a.json", ann), None, "test", max_images=10)
    with pytest.raises(EvaluationError, match="5,000 images"):
        coco_ids_from_corpus(small)
    train = read_karpathy(tmp_path / "a.json", None, "train")
    with pytest.raises(EvaluationError, match="5,000 images"):
        coco_ids_from_corpus(train)
    swapped = read_karpathy(_karpathy_json(tmp_path / "b.json", ann, wrong_owner=True), None, "test")
    with pytest.raises(EvaluationError, match="another image"):
        coco_ids_from_corpus(swapped)


def test_mapping_rejects_other_data_sets(ann):
    from vsekit.data.corpus import Corpus

    flickr_like = Corpus(
        name="f30k_test", captions=["x"] * 25000, caption_to_image=np.repeat(np.arange(5000), 5),
        image_ids=[str(i) for i in range(5000)], image_paths=[f"{i}.jpg" for i in range(5000)],
        caption_ids=[str(i) for i in range(25000)],
    )
    with pytest.raises(EvaluationError, match="not COCO 5K test cocoids"):
        coco_ids_from_corpus(flickr_like)
    precomp_like = Corpus(
        name="coco_precomp_testall", captions=["x"] * 25000, caption_to_image=np.repeat(np.arange(5000), 5),
        image_ids=[str(i) for i in ann.image_ids], image_paths=[f"{i}.jpg" for i in range(5000)],
        caption_ids=[f"testall_caps.txt:{i + 1}" for i in range(25000)],
    )
    with pytest.raises(EvaluationError, match="not a COCO id"):
        coco_ids_from_corpus(precomp_like)
