"""COCO 5K retrieval with extended positives: ECCV Caption (mAP@R, R-Precision, R@1) and CxC (R@K).

The positive sets come from the ``eccv-caption`` package (Chun et al., "ECCV Caption: Correcting False
Negatives by Collecting Machine-and-Human-verified Image-Caption Associations for MS-COCO", 2022), whose
wheel ships them as JSON (``eccv_caption/data``): ``coco_test_ids.npy`` (the 25,000 COCO caption annotation
ids of the Karpathy 5K test split, five per image), and ``{original,cxc,eccv}_{image_to_caption,
caption_to_image}.json`` keyed by COCO image id / caption annotation id. Only those files are read here;
the metrics are computed on tensors, following the package's own definitions (``eccv_caption/_metrics.py``):

* queries are the keys of the annotation (ECCV: 1,261 query images and 1,332 query captions; CxC: all 5,000
  images and 24,972 of the captions); the gallery is always the whole 5K set (5,000 images / 25,000
  captions);
* ``R`` = the number of annotated positives of a query (all of them: two ECCV image queries list a caption
  that is not among the 25,000, so their R-Precision cannot reach 1 -- as in the package);
* R@K: 1 if one of the top K is a positive; R-Precision: positives among the top R, over R;
  mAP@R: ``(1/R) * sum_{r <= R, item r positive} precision@r``.

Ranking order is "descending score, ties broken by lower index first" (the caller's row order, as in
:mod:`vsekit.eval.metrics`); only the top ``max(R_max, K_max)`` of each query is extracted (``torch.topk``
in chunks of query rows, ties at the cut resolved exactly), so the score matrix never exists whole.

Ids: vsekit's Karpathy reader keeps ``cocoid`` as the image id and ``sentid`` as the caption id; in
``dataset_coco.json`` the ``sentid`` of a caption *is* its COCO caption annotation id (e.g. the first test
image, cocoid 391895, has sentids 770337, 771687, ... -- the first entries of ``coco_test_ids.npy``). So
:func:`coco_ids_from_corpus` maps a Karpathy COCO test corpus exactly, by id, without looking at texts.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vsekit.eval.metrics import (
    ArrayLike,
    BlockScorer,
    EvaluationError,
    Similarity,
    _compute_dtype,
    _numpy,
    _pick_device,
    block_budget,
    checked_scores,
    row_inputs,
)
from vsekit.models.similarity import get_similarity

COCO_5K_IMAGES = 5000
COCO_5K_CAPTIONS = 25000
SOURCES = ("original", "cxc", "eccv")
_PACKAGE = "eccv_caption"
_INSTALL_HINT = "install the 'eccv-caption' package (pip install eccv-caption), which ships the annotations"


# --------------------------------------------------------------------------------------------------
# annotations


@dataclass(frozen=True)
class EccvAnnotations:
    """The positive sets shipped by ``eccv-caption``, keyed by COCO ids.

    ``image_ids`` (5,000) in the order of first appearance in ``caption_ids`` (25,000, the package's
    ``coco_test_ids.npy``: five consecutive captions per image, Karpathy test order).
    ``positives[source][direction]`` maps a query id to the tuple of its positive ids, for ``source`` in
    ``original``, ``cxc``, ``eccv`` and ``direction`` ``i2t`` (image id -> caption ids) or ``t2i``.
    """

    data_dir: Path
    image_ids: np.ndarray
    caption_ids: np.ndarray
    positives: dict[str, dict[str, dict[int, tuple[int, ...]]]]

    @property
    def caption_to_image(self) -> dict[int, int]:
        """COCO caption annotation id -> COCO image id (the original pairs)."""
        return {c: imgs[0] for c, imgs in self.positives["original"]["t2i"].items()}


def eccv_data_dir() -> Path:
    """The ``data`` folder of the installed ``eccv_caption`` package, found without importing it (its
    ``__init__`` warns when ``ujson`` is missing)."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EvaluationError(f"COCO evaluation with ECCV Caption / CxC positives needs annotations: {_INSTALL_HINT}")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    if not data.is_dir():
        raise EvaluationError(f"{data}: not found; reinstall 'eccv-caption' ({_INSTALL_HINT})")
    return data


def _read_positives(path: Path) -> dict[int, tuple[int, ...]]:
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise EvaluationError(f"{path}: cannot read the eccv-caption annotations ({e})") from e
    return {int(k): tuple(int(v) for v in vs) for k, vs in raw.items()}


@functools.lru_cache(maxsize=2)
def _load(data_dir: str) -> EccvAnnotations:
    d = Path(data_dir)
    try:
        caption_ids = np.load(d / "coco_test_ids.npy").astype(np.int64).reshape(-1)
    except (OSError, ValueError) as e:
        raise EvaluationError(f"{d / 'coco_test_ids.npy'}: cannot read the COCO 5K caption ids ({e})") from e
    positives = {s: {"i2t": _read_positives(d / f"{s}_image_to_caption.json"),
                     "t2i": _read_positives(d / f"{s}_caption_to_image.json")} for s in SOURCES}
    owner = positives["original"]["t2i"]
    missing = [int(c) for c in caption_ids if int(c) not in owner]
    if missing:
        raise EvaluationError(f"{d}: caption ids {missing[:5]} of coco_test_ids.npy have no image")
    image_ids = np.asarray(list(dict.fromkeys(owner[int(c)][0] for c in caption_ids)), dtype=np.int64)
    if len(image_ids) != COCO_5K_IMAGES or len(np.unique(caption_ids)) != COCO_5K_CAPTIONS:
        raise EvaluationError(f"{d}: expected {COCO_5K_IMAGES} images and {COCO_5K_CAPTIONS} captions, found "
                              f"{len(image_ids)} and {len(np.unique(caption_ids))}")
    return EccvAnnotations(d, image_ids, caption_ids, positives)


def load_eccv_annotations(data_dir: str | Path | None = None) -> EccvAnnotations:
    """The ECCV Caption, CxC and original COCO 5K positive sets (cached; ``data_dir`` defaults to the
    installed package's)."""
    return _load(str(Path(data_dir) if data_dir is not None else eccv_data_dir()))


# --------------------------------------------------------------------------------------------------
# ids


@dataclass(frozen=True)
class CocoTestIds:
    """How a corpus maps onto COCO 5K test: pass ``caption_emb[caption_rows]`` with these ids."""

    image_cocoids: np.ndarray  # (5000,) COCO image id of each corpus image, in corpus order
    caption_ids: np.ndarray  # (25000,) COCO caption annotation id of each kept caption
    caption_rows: np.ndarray  # (25000,) the corpus caption rows kept, ascending
    dropped_caption_ids: tuple[str, ...]  # corpus captions outside the protocol (Karpathy's 6th/7th captions)


def _as_int_ids(ids: Any, what: str) -> np.ndarray:
    arr = _numpy(ids)
    if arr.ndim != 1:
        raise EvaluationError(f"{what} must be 1-D, got shape {arr.shape}")
    if arr.size and np.issubdtype(arr.dtype, np.integer):
        return arr.astype(np.int64)
    out = np.empty(len(arr), dtype=np.int64)
    for i, v in enumerate(arr.tolist()):
        try:
            if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
                raise ValueError
            out[i] = int(v)
        except (TypeError, ValueError):
            raise EvaluationError(f"{what}[{i}] = {v!r} is not a COCO id (an integer); COCO 5K evaluation "
                                  "with ECCV/CxC positives needs COCO image ids (Karpathy 'cocoid') and "
                                  "caption annotation ids (Karpathy 'sentid')") from None
    return out


def _examples(values: Sequence[int] | np.ndarray, n: int = 5) -> str:
    values = list(values)
    more = f" (+{len(values) - n} more)" if len(values) > n else ""
    return ", ".join(str(int(v)) for v in values[:n]) + more


def coco_ids_from_corpus(corpus: Any, annotations: EccvAnnotations | None = None) -> CocoTestIds:
    """Map a Karpathy-JSON COCO test corpus (:func:`vsekit.data.formats.karpathy.read_karpathy`, split ``test``)
    onto the COCO 5K ids of ``eccv-caption``.

    Images map by ``cocoid`` (the corpus image id), captions by ``sentid`` (the corpus caption id, which in
    ``dataset_coco.json`` is the COCO caption annotation id). The corpus must hold exactly the 5,000 test
    images and at least the 25,000 protocol captions, each under its own image; other captions of those
    images (Karpathy keeps a few 6th/7th captions: 25,010 in all) are left out, as in the package, and
    listed in ``dropped_caption_ids``. Anything else raises :class:`EvaluationError`.
    """
    ann = annotations or load_eccv_annotations()
    name = getattr(corpus, "name", "corpus")
    n, m = len(corpus.image_ids), len(corpus.captions)
    if n != COCO_5K_IMAGES:
        raise EvaluationError(f"{name}: COCO 5K evaluation (ECCV Caption / CxC) needs the 5,000 images of "
                              f"the Karpathy COCO test split, got {n} images")
    if corpus.caption_ids is None:
        raise EvaluationError(f"{name}: the corpus has no caption ids; COCO 5K evaluation maps captions by sentid")
    images = _as_int_ids(list(corpus.image_ids), f"{name}: image id")
    captions = _as_int_ids(list(corpus.caption_ids), f"{name}: caption id")
    known_images = set(ann.image_ids.tolist())
    unknown = [v for v in images.tolist() if v not in known_images]
    if unknown:
        raise EvaluationError(f"{name}: {len(unknown)} image ids are not COCO 5K test cocoids "
                              f"({_examples(unknown)}); this is not the Karpathy COCO test split")
    if len(set(images.tolist())) != n:
        raise EvaluationError(f"{name}: repeated image ids")
    owner = ann.caption_to_image
    c2i = np.asarray(corpus.caption_to_image, dtype=np.int64)
    keep = np.fromiter((int(c) in owner for c in captions), dtype=bool, count=m)
    wrong = [(int(captions[j]), int(images[c2i[j]])) for j in np.flatnonzero(keep)
             if owner[int(captions[j])] != int(images[c2i[j]])]
    if wrong:
        cid, iid = wrong[0]
        raise EvaluationError(f"{name}: {len(wrong)} captions sit under another image than in COCO (caption "
                              f"{cid} under image {iid}, COCO: {owner[cid]}); caption ids are not COCO "
                              "annotation ids")
    rows = np.flatnonzero(keep)
    kept = captions[rows]
    if len(np.unique(kept)) != len(kept):
        raise EvaluationError(f"{name}: repeated caption ids")
    if len(kept) != COCO_5K_CAPTIONS:
        missing = sorted(set(ann.caption_ids.tolist()) - set(kept.tolist()))
        raise EvaluationError(f"{name}: {len(missing)} of the 25,000 COCO 5K test captions are missing (ids "
                              f"{_examples(missing)}); caption ids must be the Karpathy sentids (= COCO "
                              "caption annotation ids)")
    dropped = tuple(str(corpus.caption_ids[j]) for j in np.flatnonzero(~keep))
    return CocoTestIds(images, kept, rows.astype(np.int64), dropped)


def _positions(ids: np.ndarray, expected: np.ndarray, what: str) -> dict[int, int]:
    """id -> row for the caller's ids, which must be exactly the ``expected`` set."""
    if len(ids) != len(expected):
        raise EvaluationError(f"COCO 5K evaluation (ECCV Caption / CxC) needs {len(expected):,} {what}, got "
                              f"{len(ids):,}; use the Karpathy COCO test split (coco_ids_from_corpus)")
    pos = {int(v): i for i, v in enumerate(ids.tolist())}
    if len(pos) != len(ids):
        raise EvaluationError(f"repeated {what} ids")
    known = set(expected.tolist())
    unknown = [v for v in pos if v not in known]
    if unknown:
        raise EvaluationError(
            f"{len(unknown)} {what} ids are not in COCO 5K test ({_examples(unknown)}); expected COCO "
            f"{'image ids (cocoid)' if what == 'images' else 'caption annotation ids (sentid)'}"
        )
    return pos


# --------------------------------------------------------------------------------------------------
# ranking


def _top_k_ordered(s: torch.Tensor, k: int) -> torch.Tensor:
    """(rows, k) column indices of each row's k best scores, by descending score, ties by lower index --
    exactly, including ties across the cut (``torch.topk`` alone picks among them arbitrarily).

    ``torch.topk`` takes k + 1 per row; where the (k+1)-th score is below the k-th the top-k set is settled
    and only its order is fixed here. Rows with a tie across the cut (rare with real-valued scores) take
    the tied items of lowest index, from a pass over the whole row.
    """
    g = s.shape[1]
    vals, idx = torch.topk(s, min(k + 1, g), dim=1, sorted=True)
    if torch.isnan(vals[:, 0]).any():  # topk ranks NaN above everything
        raise EvaluationError("NaN similarity scores; ranks are undefined")
    idx = idx[:, :k].clone()
    if g > k:
        tied = vals[:, k - 1] == vals[:, k]
        if bool(tied.any()):
            t = s[tied]
            cut = vals[tied, k - 1 : k]
            above = t > cut
            eq = t == cut
            need = k - above.sum(1, keepdim=True)
            sel = above | (eq & (eq.cumsum(1) <= need))
            idx[tied] = sel.nonzero()[:, 1].view(t.shape[0], k)
    idx = idx.sort(dim=1).values  # ascending index, then a stable sort by descending score
    order = torch.sort(s.gather(1, idx), dim=1, descending=True, stable=True).indices
    return idx.gather(1, order)


def _rank(
    query: torch.Tensor, gallery: torch.Tensor, k: int, score: Callable, rows: int, what: str
) -> np.ndarray:
    out = np.empty((query.shape[0], k), dtype=np.int64)
    for a in range(0, query.shape[0], rows):
        try:
            out[a : a + rows] = _top_k_ordered(score(query[a : a + rows], gallery), k).cpu().numpy()
        except EvaluationError as e:
            raise EvaluationError(f"{what}: {e}") from None
    return out


def _scorers(similarity: Similarity, dtype: torch.dtype) -> tuple[Callable, Callable]:
    """(image rows vs all captions, caption rows vs all images) score functions."""
    if similarity == "cosine":  # inner product: the encoders L2-normalise (vsekit.models.similarity)
        return (lambda q, g: q @ g.t()), (lambda q, g: q @ g.t())
    if isinstance(similarity, BlockScorer):
        fn = similarity.on_rows
    else:
        fn = similarity if callable(similarity) else get_similarity(similarity)

    def i2t(img: torch.Tensor, caps: torch.Tensor) -> torch.Tensor:
        return checked_scores(fn(img, caps), (img.shape[0], caps.shape[0]), dtype)

    def t2i(caps: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        return checked_scores(fn(img, caps), (img.shape[0], caps.shape[0]), dtype).t()

    return i2t, t2i


def _tensor(x: ArrayLike, name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if not isinstance(x, (np.ndarray, torch.Tensor)):
        raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(x)}")
    if x.ndim != 2:
        raise EvaluationError(f"{name} must be 2-D (rows, dim), got shape {tuple(x.shape)}")
    t = x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold real numbers, got dtype {t.dtype}")
    return t.to(device=device, dtype=dtype)


# --------------------------------------------------------------------------------------------------
# metrics


def _hits(ranked: np.ndarray, queries: list[int], positives: dict[int, tuple[int, ...]],
          qpos: dict[int, int], gpos: dict[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(Q, k) bool: is the item at each rank a positive of the query; (Q,) R = number of positives."""
    g = len(gpos)
    q_idx, cols, r = [], [], np.empty(len(queries), dtype=np.int64)
    for i, q in enumerate(queries):
        pos = set(positives[q])
        r[i] = len(pos)
        for p in pos:
            c = gpos.get(p)  # a positive outside the gallery counts in R but can never be retrieved
            if c is not None:
                q_idx.append(i)
                cols.append(c)
    keys = np.asarray(q_idx, dtype=np.int64) * g + np.asarray(cols, dtype=np.int64)
    rows = ranked[np.asarray([qpos[q] for q in queries], dtype=np.int64)]
    hits = np.isin(np.arange(len(queries), dtype=np.int64)[:, None] * g + rows, keys)
    return hits, r


def _eccv_scores(hits: np.ndarray, r: np.ndarray) -> dict[str, float]:
    ranks = np.arange(1, hits.shape[1] + 1)
    within = ranks[None, :] <= r[:, None]
    h = hits & within
    prec = np.cumsum(h, axis=1) / ranks[None, :]
    map_at_r = (prec * h).sum(1) / r
    rprec = h.sum(1) / r
    return {"map_at_r": float(100.0 * map_at_r.mean()), "rprecision": float(100.0 * rprec.mean()),
            "r1": float(100.0 * hits[:, 0].mean())}


def eccv_metrics(image_emb: ArrayLike, caption_emb: ArrayLike, image_cocoids: Sequence[int] | np.ndarray,
                 caption_ids: Sequence[int] | np.ndarray, *, similarity: Similarity = "cosine",
                 ks: Sequence[int] = (1, 5, 10), chunk_size: int | None = None,
                 device: str | torch.device | None = None,
                 annotations: EccvAnnotations | None = None) -> dict[str, float]:
    """COCO 5K retrieval scored with ECCV Caption and CxC positives (percent, like
    :func:`vsekit.eval.metrics.retrieval_metrics`).

    ``image_emb`` (5000, D) and ``caption_emb`` (25000, D) in any order, with the COCO image id of each image
    row and the COCO caption annotation id of each caption row (:func:`coco_ids_from_corpus`); they must be
    exactly the COCO 5K test sets. Keys, for ``d`` in ``i2t``/``t2i``: ``eccv_{d}_map_at_r``,
    ``eccv_{d}_rprecision``, ``eccv_{d}_r1`` and ``cxc_{d}_r{k}`` for each ``k`` in ``ks``.
    ``chunk_size``: query rows scored per similarity call (default: as many as keep a block of scores
    and its sorted copy within ``metrics.ROWS_BUDGET``).
    """
    ann = annotations or load_eccv_annotations()
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise EvaluationError(f"ks must be positive integers, got {ks}")
    image_emb, caption_emb, rows_dtype = row_inputs(image_emb, caption_emb, similarity)
    ipos = _positions(_as_int_ids(image_cocoids, "image_cocoids"), ann.image_ids, "images")
    cpos = _positions(_as_int_ids(caption_ids, "caption_ids"), ann.caption_ids, "captions")
    dev, dtype = _pick_device(device, image_emb, caption_emb), _compute_dtype(image_emb, caption_emb)
    img = _tensor(image_emb, "image_emb", dev, rows_dtype or dtype)
    cap = _tensor(caption_emb, "caption_emb", dev, rows_dtype or dtype)
    if img.shape[0] != len(ipos) or cap.shape[0] != len(cpos):
        raise EvaluationError(f"{img.shape[0]} image rows for {len(ipos)} image ids, {cap.shape[0]} caption "
                              f"rows for {len(cpos)} caption ids")
    if img.shape[1] != cap.shape[1]:
        raise EvaluationError(f"embedding sizes differ: images D={img.shape[1]}, captions D={cap.shape[1]}")
    if chunk_size is None:  # a block of scores (and topk's copy of it) within the evaluation's block budget
        per_row = 2 * img.element_size() * max(img.shape[0], cap.shape[0])
        chunk_size = max(1, block_budget(dev, rows=True) // per_row)
    if chunk_size < 1:
        raise EvaluationError(f"chunk_size must be >= 1, got {chunk_size}")
    score_i2t, score_t2i = _scorers(similarity, dtype)

    out: dict[str, float] = {}
    for d, (qpos, gpos, query, gallery, score) in {"i2t": (ipos, cpos, img, cap, score_i2t),
                                                   "t2i": (cpos, ipos, cap, img, score_t2i)}.items():
        eccv, cxc = ann.positives["eccv"][d], ann.positives["cxc"][d]
        depth = max(max(len(set(v)) for v in eccv.values()), max(ks))
        if depth > gallery.shape[0]:
            raise EvaluationError(f"{d}: K={depth} exceeds the gallery of {gallery.shape[0]}")
        with torch.no_grad():
            ranked = _rank(query, gallery, depth, score, chunk_size, d)
        hits, r = _hits(ranked, list(eccv), eccv, qpos, gpos)
        out.update({f"eccv_{d}_{key}": v for key, v in _eccv_scores(hits, r).items()})
        hits, _ = _hits(ranked[:, : max(ks)], list(cxc), cxc, qpos, gpos)
        out.update({f"cxc_{d}_r{k}": float(100.0 * hits[:, :k].any(1).mean()) for k in ks})
    return out

