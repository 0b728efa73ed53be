"""Semantic recall: retrieval metrics where a "negative" that means the same as a ground truth also counts.

Exact-pair recall (:func:`vsekit.eval.retrieval_metrics`) treats every caption of another image as wrong,
although many of them describe the query image just as well; LSEH is trained around that. Here relevance
is widened by caption semantics: with ``lsa`` the L2-normalised LSA vectors of the captions
(:mod:`vsekit.semantics`) and ``GT(i)`` the ground-truth captions of image i,

    plaus(i, j) = max over g in GT(i) of cos(lsa_j, lsa_g)        (-inf when image i has no caption)
    rel_t(i, j) = caption_to_image[j] == i  or  plaus(i, j) >= t

and ``rel_t`` is the relevance of caption j to image i in *both* directions: image -> text (caption j
retrieved for image i) and text -> image (image i retrieved for caption j). The ``"exact"`` level is the
ground-truth pairs alone (the standard protocol; a threshold above 1 gives the same). A caption whose LSA
vector is zero (every word outside the training vocabulary) is close to nothing.

For evaluation the LSA model is fitted on the TRAINING captions and the evaluated captions are mapped
with it (:func:`lsa_vectors_for`), as LSEH does: the test set never shapes its own semantics.

Computation, for one block of images at a time and the captions of those images (``G``): one product
``lsa[G] @ lsa.T`` (|G| x M) gives, by a max over row groups, ``plaus`` of the block's images against all
captions (their image -> text queries) and, by a max over column groups, ``plaus`` of all images against
the captions in G (their text -> image queries). So the M x M caption similarity is computed once, a
block at a time, and never held whole; neither is the N x M score matrix.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vsekit.eval.metrics import (
    DIRECTIONS,
    RECALL_AT,
    ArrayLike,
    EvaluationError,
    Similarity,
    _check_inputs,
    _compute_dtype,
    _is_real,
    _resolve_similarity,
    block_budget,
    checked_scores,
    row_inputs,
)

DEFAULT_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
DEFAULT_MAX_R = 1000
EXACT = "exact"


# --------------------------------------------------------------------------------------------------
# LSA vectors for evaluation


def lsa_vectors_for(train_captions: Iterable[str], eval_captions: Sequence[str], *,
                    cache_dir: str | Path | None = None, **lsa_params: Any) -> np.ndarray:
    """(len(eval_captions), K) float32 LSA vectors of ``eval_captions`` under a model fitted on ``train_captions``.

    The vocabulary, idf and SVD components come from the training captions only (``LSAModel.fit``); the
    evaluated captions are only transformed (``LSAModel.transform``), so a word that occurs only in them
    contributes nothing. ``lsa_params``: ``n_components``, ``n_iter``, ``random_state`` of
    :meth:`vsekit.semantics.LSAModel.fit`. With ``cache_dir`` the training fit goes through
    :func:`vsekit.semantics.fit_or_load_caption_vectors` (fitted once per caption set, then reused).
    """
    from vsekit.semantics import LSAModel, fit_or_load_lsa_model

    if isinstance(eval_captions, str):
        raise TypeError("eval_captions must be a sequence of caption strings, not one string")
    if cache_dir is None:
        model, _ = LSAModel.fit(train_captions, **lsa_params)
    else:
        model = fit_or_load_lsa_model(list(train_captions), Path(cache_dir), **lsa_params)
    return model.transform(list(eval_captions))


def _top(S: torch.Tensor, length: int) -> np.ndarray:
    """(q, length) column indices of each row's top ``length`` scores, in the order "descending score,
    ties to the lower index" (a stable sort of ``-score``), as int64 numpy."""
    q, g = S.shape
    if length >= g:
        return torch.sort(S, dim=1, descending=True, stable=True).indices.numpy()
    vals, idx = torch.topk(S, length, dim=1, sorted=False)
    # topk does not say which of equal scores it keeps or in what order: put the kept ones in the stable
    # order (by index, then stably by score), and redo rows whose cut-off score has ties left outside
    by_index = torch.sort(idx, dim=1).indices
    idx, vals = idx.gather(1, by_index), vals.gather(1, by_index)
    idx = idx.gather(1, torch.sort(vals, dim=1, descending=True, stable=True).indices)
    cut = vals.min(dim=1).values
    crowded = torch.from_numpy(np.flatnonzero(np.count_nonzero(S.numpy() >= cut.numpy()[:, None], axis=1) > length))
    if crowded.numel():
        idx[crowded] = torch.sort(S[crowded], dim=1, descending=True, stable=True).indices[:, :length]
    return idx.numpy()


def _group_max_rows(Q: np.ndarray, starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Row-wise max of consecutive row groups (group g: rows ``starts[g] : starts[g] + sizes[g]``, sizes >= 1).

    The same as ``np.maximum.reduceat(Q, starts, axis=0)``, but one vectorised maximum per caption rank
    (the k-th caption of every group that has one) instead of one reduction per group: ~15x faster for
    groups of 5 rows.
    """
    out = Q[starts].copy()
    for k in range(1, int(sizes.max())):
        more = np.flatnonzero(sizes > k)
        if len(more) == len(sizes):
            np.maximum(out, Q[starts + k], out=out)
        else:
            out[more] = np.maximum(out[more], Q[starts[more] + k])
    return out


class _Sums:
    """Per-level sums over the queries of one direction."""

    def __init__(self, levels: int, ks: Sequence[int]):
        self.ks = ks
        self.queries = 0
        self.hits = np.zeros((levels, len(ks)), dtype=np.int64)
        self.ap, self.rprec, self.relevant = np.zeros(levels), np.zeros(levels), np.zeros(levels)
        self.capped = np.zeros(levels, dtype=np.int64)

    def add(self, S: torch.Tensor, P: np.ndarray, col_of: np.ndarray | None, levels: np.ndarray,
            max_r: int) -> None:
        """Queries = rows of ``S`` (scores, q x G) and ``P`` (plausibility, +inf at exact pairs, its columns
        ``col_of[c]`` for column c of S, or the same columns when None)."""
        q, g = S.shape
        if q == 0:
            return
        if torch.isnan(S).any():
            raise EvaluationError("a similarity score is NaN; check the embeddings for NaN/inf")
        nrel = np.stack([np.count_nonzero(P >= t, axis=1) for t in levels])  # (T, q)
        reff = np.minimum(nrel, max_r)
        length = min(g, max(max(self.ks), int(reff.max())))
        idx = _top(S, length)
        pt = np.take_along_axis(P, idx if col_of is None else col_of[idx], axis=1)  # (q, L)
        rel = pt[None, :, :] >= levels[:, None, None]  # (T, q, L)
        for n, k in enumerate(self.ks):
            self.hits[:, n] += rel[:, :, :k].any(axis=2).sum(axis=1)
        cum = np.cumsum(rel, axis=2, dtype=np.int32)
        position = np.arange(1, length + 1)
        within = position[None, None, :] <= reff[:, :, None]
        # mAP@R: mean over the first R positions of precision@k at the relevant ones (Musgrave et al.)
        ap = np.where(rel & within, cum / position, 0.0).sum(axis=2) / np.maximum(reff, 1)
        rp = np.take_along_axis(cum, np.maximum(reff - 1, 0)[:, :, None], axis=2)[:, :, 0] / np.maximum(reff, 1)
        self.queries += q
        self.ap += ap.sum(axis=1)
        self.rprec += rp.sum(axis=1)
        self.relevant += nrel.sum(axis=1)
        self.capped += (nrel > max_r).sum(axis=1)


# --------------------------------------------------------------------------------------------------
# metrics


def _threshold_name(t: float) -> str:
    return f"{t:g}"


def _check_semantic_inputs(caption_vectors: Any, m: int, thresholds: Sequence[float], ks: Sequence[int],
                           max_r: int) -> tuple[list[float], list[int]]:
    if not isinstance(caption_vectors, (np.ndarray, torch.Tensor)):
        raise TypeError(f"caption_vectors must be a numpy array or a torch tensor, got {type(caption_vectors)}")
    if caption_vectors.ndim != 2 or caption_vectors.shape[0] != m or caption_vectors.shape[1] == 0:
        raise EvaluationError(f"caption_vectors must be (M={m}, K) LSA vectors, one row per caption, got shape "
                              f"{tuple(caption_vectors.shape)}")
    if not _is_real(caption_vectors):
        raise TypeError(f"caption_vectors must hold real numbers, got dtype {caption_vectors.dtype}")
    if isinstance(thresholds, (str, bytes)) or not isinstance(thresholds, Iterable):
        raise TypeError(f"thresholds must be a sequence of numbers, got {thresholds!r}")
    ts = [float(t) for t in thresholds]
    if any(not math.isfinite(t) for t in ts):
        raise EvaluationError(f"thresholds must be finite, got {list(thresholds)}")
    names = [_threshold_name(t) for t in ts]
    if len(set(names)) != len(names):
        raise EvaluationError(f"thresholds repeat a value: {names}")
    k_list = [int(k) for k in ks]
    if not k_list or any(k < 1 or k != kk for k, kk in zip(k_list, ks)):
        raise EvaluationError(f"ks must be positive integers, got {list(ks)}")
    if isinstance(max_r, bool) or int(max_r) != max_r or max_r < 1:
        raise EvaluationError(f"max_r must be a positive int, got {max_r!r}")
    return ts, k_list


def _tensor(x: ArrayLike, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().to(dtype).contiguous()
    return torch.from_numpy(np.array(x, dtype=np.float64 if dtype == torch.float64 else np.float32, order="C"))


@torch.no_grad()
def semantic_metrics(image_emb: ArrayLike, caption_emb: ArrayLike,
                     caption_to_image: ArrayLike | Sequence[int], caption_vectors: ArrayLike, *,
                     thresholds: Sequence[float] = DEFAULT_THRESHOLDS, ks: Sequence[int] = RECALL_AT,
                     similarity: Similarity = "cosine", max_r: int = DEFAULT_MAX_R,
                     chunk_size: int | None = None) -> dict[str, Any]:
    """Semantic R@K, mAP@R and plausible-match R-Precision both ways, per LSA-cosine threshold.

    ``caption_vectors`` (M, K): the LSA vectors of the evaluated captions, row j <-> caption j, from a
    model fitted on the training captions (:func:`lsa_vectors_for`). Relevance ``rel_t(i, j)`` of caption j
    and image i at threshold t: j is a ground-truth caption of i, or ``max over i's ground-truth captions g
    of cos(lsa_j, lsa_g) >= t`` (module docstring). Each image with at least one caption queries all M
    captions (``i2t``); each caption queries all N images (``t2i``). Rankings: ``similarity`` (as in
    :func:`vsekit.eval.retrieval_ranks`), descending score, ties to the lower index. An image without
    captions is no query and, having no caption semantics, is relevant to no caption (but is ranked).

    Per level (each threshold, and ``"exact"``: ground-truth pairs only, the standard protocol), with R
    the number of items relevant to a query, capped at ``max_r`` (R' = min(R, max_r)):

    - ``sem@{t}_{d}_r{K}``: percent of queries with a relevant item in the top K (for "exact" this is
      the standard R@K of :func:`vsekit.eval.retrieval_metrics`; the same counts, except where BLAS rounds
      a near-tie differently between the two modules' call shapes);
    - ``sem@{t}_{d}_map_at_r``: mAP@R (Musgrave et al., "A Metric Learning Reality Check", ECCV 2020, as
      in ECCV Caption), percent: mean over queries of (1/R') * sum over positions k <= R' of
      precision@k * rel(k);
    - ``sem@{t}_{d}_rprec``: R-Precision, percent: relevant items in the top R', over R'. With the LSA
      relevance this is a plausible-match R-Precision in the spirit of PMRP (Chun et al., "Probabilistic
      Embeddings for Cross-Modal Retrieval", CVPR 2021); PMRP's plausible matches share COCO object
      classes, here they are captions (images) whose LSA cosine to a ground-truth caption reaches t;
    - ``sem@{t}_{d}_num_relevant``: mean R (uncapped); ``sem@{t}_{d}_capped``: fraction of queries with
      R > max_r, whose mAP@R and R-Precision look at the first ``max_r`` positions only (loose thresholds
      can make R a sizeable part of the gallery; the cap bounds the per-query work at O(max_r));
    - ``sem@{t}_rsum``: the sum of the R@K of both directions.

    ``{t}`` is the threshold written with ``format(t, "g")`` (``sem@0.7_i2t_r1``) or ``exact``. ``curve``:
    one dict per threshold, in the given order, ``{"threshold": t, "max_r": max_r, "i2t_r1": ..., ...}``
    (the same numbers without the ``sem@{t}_`` prefix), for plotting against t.

    Memory and work: ``chunk_size`` images per block (default: as many as keep the block's |G| x M caption
    similarities within ``metrics.ROWS_BUDGET``). Alive per block: that |G| x M block, the block's image -> text and
    text -> image score and plausibility blocks (block images x M and |G| x N), and T x queries x L
    relevance flags with L <= max(max_r, max K). The embeddings and LSA vectors are held whole as CPU
    tensors (float32, float64 if an input is float64). CPU only.
    """
    image_emb, caption_emb, rows_dtype = row_inputs(image_emb, caption_emb, similarity)
    c2i = _check_inputs(image_emb, caption_emb, caption_to_image)
    n, m = int(image_emb.shape[0]), int(caption_emb.shape[0])
    ts, k_list = _check_semantic_inputs(caption_vectors, m, thresholds, ks, max_r)
    max_r = int(max_r)
    levels = np.array([*ts, math.inf])  # "exact" = only the +inf entries placed at ground-truth pairs
    names = [_threshold_name(t) for t in ts] + [EXACT]

    dtype = _compute_dtype(image_emb, caption_emb)
    images, captions = _tensor(image_emb, rows_dtype or dtype), _tensor(caption_emb, rows_dtype or dtype)
    lsa_dtype = _compute_dtype(caption_vectors)
    lsa = _tensor(caption_vectors, lsa_dtype)
    if not bool(torch.isfinite(lsa).all()):
        raise EvaluationError("caption_vectors hold NaN or inf")
    lsa = torch.nn.functional.normalize(lsa, dim=1)  # zero rows stay zero: cosine 0 with everything
    np_lsa_dtype = lsa.numpy().dtype

    by_image = np.argsort(c2i, kind="stable")  # captions in image order ("perm" order)
    per_image = np.bincount(c2i, minlength=n)
    first = np.concatenate([[0], np.cumsum(per_image)])
    identity = bool(np.array_equal(by_image, np.arange(m)))
    col_of = None if identity else np.argsort(by_image)  # caption index -> its column in perm order
    lsa_perm = lsa if identity else lsa[torch.from_numpy(by_image)]
    nonempty = np.flatnonzero(per_image > 0)
    image_starts = first[nonempty]
    uniform = int(per_image[0]) if len(nonempty) == n and np.all(per_image == per_image[0]) else 0

    if chunk_size is None:
        # the block's caption-caption product (|G| x M) takes the evaluation's block budget
        per_row = lsa.element_size() * m * max(m / n, 1e-9)
        rows = max(1, int(block_budget(lsa.device, rows=True) // per_row))
    else:
        rows = int(chunk_size)
        if rows < 1:
            raise EvaluationError(f"chunk_size must be a positive number of images, got {chunk_size!r}")
    fn = _resolve_similarity(similarity, (rows, m), int(image_emb.shape[1]))

    def score(img: torch.Tensor, cap: torch.Tensor) -> torch.Tensor:
        return img @ cap.t() if fn is None else checked_scores(fn(img, cap), (len(img), len(cap)), dtype)

    sums = {d: _Sums(len(levels), k_list) for d in DIRECTIONS}
    for a in range(0, n, rows):
        b = min(a + rows, n)
        g0, g1 = int(first[a]), int(first[b])
        if g1 == g0:
            continue  # no captions: no query of either direction in this block
        group = by_image[g0:g1]  # the block's captions, in image order
        Q = (lsa[torch.from_numpy(group)] @ lsa_perm.t()).numpy()  # (|G|, M), columns in perm order
        if Q.dtype != np_lsa_dtype:
            Q = Q.astype(np_lsa_dtype)

        # image -> text: the block's images that have captions
        queries = a + np.flatnonzero(per_image[a:b] > 0)
        P = _group_max_rows(Q, first[queries] - g0, per_image[queries])  # (q, M)
        P[np.repeat(np.arange(len(queries)), per_image[queries]), np.arange(g0, g1)] = np.inf
        S = score(images[torch.from_numpy(queries)], captions)
        sums["i2t"].add(S, P, col_of, levels, max_r)

        # text -> image: the block's captions against all images
        if uniform:  # the usual case (e.g. 5 captions per image): a reshape, and torch's faster reduction
            red = torch.from_numpy(Q).view(len(group), n, uniform).amax(2).numpy()
        else:
            red = np.maximum.reduceat(Q, image_starts, axis=1)  # (|G|, images with captions)
        if len(nonempty) == n:
            P = red
        else:
            P = np.full((len(group), n), -np.inf, dtype=red.dtype)
            P[:, nonempty] = red
        P[np.arange(len(group)), c2i[group]] = np.inf
        cap = captions[torch.from_numpy(group)]
        S = cap @ images.t() if fn is None else score(images, cap).t().contiguous()
        sums["t2i"].add(S, P, None, levels, max_r)
        del Q, red, P, S

    out: dict[str, Any] = {}
    curve: list[dict[str, float]] = []
    for lv, name in enumerate(names):
        entry: dict[str, float] = {}
        for d in DIRECTIONS:
            s = sums[d]
            if s.queries == 0:
                raise EvaluationError(f"no {d} queries to score")
            for n_k, k in enumerate(k_list):
                entry[f"{d}_r{k}"] = float(100.0 * int(s.hits[lv, n_k]) / s.queries)
            entry[f"{d}_map_at_r"] = float(100.0 * s.ap[lv] / s.queries)
            entry[f"{d}_rprec"] = float(100.0 * s.rprec[lv] / s.queries)
            entry[f"{d}_num_relevant"] = float(s.relevant[lv] / s.queries)
            entry[f"{d}_capped"] = float(s.capped[lv] / s.queries)
        entry["rsum"] = float(sum(entry[f"{d}_r{k}"] for d in DIRECTIONS for k in k_list))
        out.update({f"sem@{name}_{key}": v for key, v in entry.items()})
        if name != EXACT:
            curve.append({"threshold": ts[lv], "max_r": max_r, **entry})
    out["curve"] = curve
    return out


__all__ = ["DEFAULT_MAX_R", "DEFAULT_THRESHOLDS", "lsa_vectors_for", "semantic_metrics"]
