"""Image-text retrieval metrics of the VSE++ protocol (VSE++'s evaluation.py; COCO 1K/5K as in the papers), computed by counting in blocks.

The field's reference code sorts one row of scores per query in a Python loop. Here a rank is a count:
for a query whose ground truth scores ``t``, the rank is the number of candidates that sort before it
under the order "descending score, ties broken by lower index first". Blocks of image rows are scored
against blocks of captions and the counts are accumulated, so the N x M score matrix never exists.

Exactness. A count compares every score against a threshold that must be bitwise the same number as the
ground-truth entry it stands for. BLAS libraries do not promise that: on our CPU (MKL) the value of one
product changes with the *shape* of the ``mm`` call (small calls, one-row calls and some thread splits
take other code paths), though not with its position inside a call nor with memory alignment. So every
similarity call here has one fixed shape: short blocks are zero-padded to the full block, and the
thresholds come from a pre-pass made of calls of that same shape (each image block against the
captions of its own images). The main pass checks every ground-truth entry it meets against its
threshold and warns if one differs (a non-deterministic similarity); the ground-truth entry itself is
excluded from the counts by index, so rounding can never rank a pair against itself.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import math
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from vsekit.errors import VsekitError
from vsekit.models.similarity import get_similarity, order_sim

ArrayLike = np.ndarray | torch.Tensor

RECALL_AT = (1, 5, 10)
DIRECTIONS = ("i2t", "t2i")
METRIC_KEYS = tuple(f"{d}_{m}" for d in DIRECTIONS for m in ("r1", "r5", "r10", "medr", "meanr")) + ("rsum",)
PROTOCOLS = ("full", "1k5fold")
NUM_FOLDS = 5

# Memory for one score block and its 0/1 hits (1 byte per score on CPU, a score-sized float elsewhere) when
# chunk_size is None; the block's shape follows from it and the inputs' sizes (_block_shape), not a fixed count.
# Small enough that the compare-and-count passes find the block still in cache after its product:
# benchmarks/eval_speed.py --budgets measured 2-4 MiB best on a 2-core EPYC (1.29-1.31x one bare matmul at
# 5K x 25K), 64 MiB 1.49x. The semantic and ECCV protocols hold rows of scores against a whole gallery:
# their budget is ROWS_BUDGET.
BLOCK_BUDGET = {"cpu": 4 << 20, "accel": 512 << 20}
ROWS_BUDGET = {"cpu": 128 << 20, "accel": 1 << 30}
COCO_1K_FOLD = 1000  # images per fold of the standard COCO 1K protocol (5 folds of the 5,000 test images)


class EvaluationError(VsekitError, ValueError):
    """Inputs that cannot be evaluated as asked (shapes, protocol, folds); the CLI prints it in one line."""


class BlockScorer:
    """Scores that are no function of two embeddings (a similarity network over stored local sets):
    ``scorer(image_rows (R,), caption_rows (C,)) -> (R, C)`` for blocks of row numbers (int64 tensors on the
    evaluation's device) out of ``num_images`` x ``num_captions``. Given as ``similarity`` with None for both
    embeddings. Its calls have one fixed shape like any similarity's (a short block is padded with row 0), and
    a pair must score the same whatever other pairs share the call."""

    num_images: int
    num_captions: int

    def __call__(self, image_rows: torch.Tensor, caption_rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def on_rows(self, images: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
        """The scorer on the (R, 1) and (C, 1) row-number blocks the metrics cut (:func:`row_inputs`)."""
        return self(images[:, 0], captions[:, 0])

    def captions_at(self, rows: np.ndarray) -> BlockScorer:
        """The same scores for the captions at ``rows`` only, renumbered 0..len(rows)-1."""
        return _CaptionSubset(self, rows)


class _CaptionSubset(BlockScorer):
    def __init__(self, scorer: BlockScorer, rows: np.ndarray) -> None:
        self.scorer, self.rows = scorer, torch.as_tensor(np.asarray(rows, dtype=np.int64))
        self.num_images, self.num_captions = scorer.num_images, len(self.rows)

    def __call__(self, image_rows: torch.Tensor, caption_rows: torch.Tensor) -> torch.Tensor:
        return self.scorer(image_rows, self.rows.to(caption_rows.device)[caption_rows])


Similarity = str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | BlockScorer


def row_inputs(image_emb: ArrayLike | None, caption_emb: ArrayLike | None,
               similarity: Similarity) -> tuple[ArrayLike, ArrayLike, torch.dtype | None]:
    """What the metrics cut into blocks: the embeddings, or a :class:`BlockScorer`'s row numbers as (n, 1)
    int64 tensors; and the dtype the blocks keep (int64 for row numbers, None: the computation's)."""
    if not isinstance(similarity, BlockScorer):
        return image_emb, caption_emb, None
    if image_emb is not None or caption_emb is not None:
        raise EvaluationError("a BlockScorer scores the rows it holds: pass None for image_emb and caption_emb")
    rows = (torch.arange(similarity.num_images)[:, None], torch.arange(similarity.num_captions)[:, None])
    return *rows, torch.int64


# --------------------------------------------------------------------------------------------------
# inputs


class _Rows:
    """Rows of an (n, D) matrix (numpy array, memmap or torch tensor), optionally a subset of them,
    delivered chunk by chunk as torch tensors on ``device`` in ``dtype``; never converted whole."""

    def __init__(self, data: ArrayLike, subset: np.ndarray | None, device: torch.device, dtype: torch.dtype):
        self.data, self.device, self.dtype, self.offset = data, device, dtype, 0
        self.index: np.ndarray | None = None
        self.n = int(data.shape[0]) if subset is None else len(subset)
        if subset is not None:
            subset = np.asarray(subset, dtype=np.int64)
            if _is_run(subset):
                self.offset = int(subset[0])  # a contiguous range is read as a slice
            else:
                self.index = subset

    def __len__(self) -> int:
        return self.n

    def _tensor(self, x: ArrayLike) -> torch.Tensor:
        if isinstance(x, np.ndarray):
            np_dtype = np.float64 if self.dtype == torch.float64 else np.float32
            if not (x.flags.writeable and x.flags.c_contiguous and x.dtype == np_dtype):
                x = np.array(x, dtype=np_dtype, order="C")  # memmap / foreign dtype: copy this chunk only
            x = torch.from_numpy(x)
        return x.detach().to(device=self.device, dtype=self.dtype).contiguous()

    def _gather(self, positions: np.ndarray) -> torch.Tensor:
        rows = positions + self.offset if self.index is None else self.index[positions]
        if isinstance(self.data, torch.Tensor):
            return self._tensor(self.data.index_select(0, torch.as_tensor(rows, device=self.data.device)))
        return self._tensor(self.data[rows])

    def rows(self, start: int, stop: int, buf: torch.Tensor) -> torch.Tensor:
        """Rows ``start:stop``, zero-padded to ``buf``'s length (so every similarity call has one shape)."""
        if self.index is None:
            x = self._tensor(self.data[self.offset + start : self.offset + stop])
        else:
            x = self._gather(np.arange(start, stop))
        return _padded(x, buf)

    def take(self, positions: np.ndarray, buf: torch.Tensor) -> torch.Tensor:
        """Rows at ``positions`` (any order), zero-padded to ``buf``'s length."""
        if _is_run(positions):
            return self.rows(int(positions[0]), int(positions[-1]) + 1, buf)  # slice, no gather
        return _padded(self._gather(positions), buf)


def _is_run(positions: np.ndarray) -> bool:
    """Non-empty and consecutive ascending (k, k+1, ..., k+len-1)."""
    return bool(len(positions)) and bool(np.all(np.diff(positions) == 1))


def _padded(x: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    if x.shape[0] == buf.shape[0]:
        return x
    buf[: x.shape[0]].copy_(x)
    buf[x.shape[0] :].zero_()
    return buf


def _is_real(x: ArrayLike) -> bool:
    if isinstance(x, torch.Tensor):
        return not (x.is_complex() or x.dtype == torch.bool)
    return np.issubdtype(x.dtype, np.number) and not np.issubdtype(x.dtype, np.complexfloating)


def _numpy(x: Any) -> np.ndarray:
    """A tensor (detached, on the CPU), array or sequence as a numpy array."""
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _as_index_array(caption_to_image: Any) -> np.ndarray:
    c2i = _numpy(caption_to_image)
    if c2i.ndim != 1:
        raise EvaluationError(f"caption_to_image must be 1-D (one image row per caption), got shape {c2i.shape}")
    if c2i.size and not np.issubdtype(c2i.dtype, np.integer):
        raise TypeError(f"caption_to_image must hold integer image rows, got dtype {c2i.dtype}")
    return c2i.astype(np.int64, copy=False)


def _check_inputs(image_emb: ArrayLike, caption_emb: ArrayLike, caption_to_image: Any) -> np.ndarray:
    for name, x in (("image_emb", image_emb), ("caption_emb", caption_emb)):
        if not isinstance(x, (np.ndarray, torch.Tensor)):
            raise TypeError(f"{name} must be a numpy array (memmap included) or a torch tensor, got "
                            f"{type(x)}")
        if x.ndim != 2:
            raise EvaluationError(f"{name} must be 2-D (rows, dim), got shape {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise EvaluationError(f"{name} is empty: nothing to evaluate")
        if not _is_real(x):
            raise TypeError(f"{name} must hold real numbers, got dtype {x.dtype}")
    if image_emb.shape[1] != caption_emb.shape[1]:
        raise EvaluationError(f"embedding sizes differ: images have D={image_emb.shape[1]}, captions "
                              f"D={caption_emb.shape[1]}")
    n, m = int(image_emb.shape[0]), int(caption_emb.shape[0])
    c2i = _as_index_array(caption_to_image)
    if len(c2i) != m:
        raise EvaluationError(f"caption_to_image has {len(c2i)} entries but there are {m} captions")
    lo, hi = int(c2i.min()), int(c2i.max())
    if lo < 0 or hi >= n:
        bad = lo if lo < 0 else hi
        raise EvaluationError(f"caption_to_image holds image row {bad}, outside [0, {n}) for {n} images")
    return c2i


def _compute_dtype(*xs: ArrayLike) -> torch.dtype:
    """float64 if any input is float64 (kept for exact references), else float32."""
    return torch.float64 if any(x.dtype in (np.float64, torch.float64) for x in xs) else torch.float32


def _pick_device(device: Any, *xs: ArrayLike) -> torch.device:
    if device is not None:
        return torch.device(device)
    for x in xs:
        if isinstance(x, torch.Tensor):
            return x.device
    return torch.device("cpu")


def _even(n: int, at_most: int) -> int:
    """The largest block that splits ``n`` into as few near-equal blocks as ``at_most`` allows, and at
    least 2 so no call degenerates into a matrix-vector product (which rounds by position)."""
    return max(2, math.ceil(n / math.ceil(n / at_most)))


def block_budget(device: torch.device, rows: bool = False) -> int:
    """Bytes that one block of an evaluation's scores and its temporaries may take on ``device``
    (``rows``: a block of whole score rows, as the semantic and ECCV protocols hold)."""
    return (ROWS_BUDGET if rows else BLOCK_BUDGET)["cpu" if device.type == "cpu" else "accel"]


def _block_shape(n: int, m: int, chunk_size: int | Sequence[int] | None, device: torch.device,
                 itemsize: int = 4, per_image: int | None = None) -> tuple[int, int]:
    """(images, captions) per block.

    Default: as many scores as ``BLOCK_BUDGET`` holds, in the inputs' aspect (captions per image), split
    evenly. When the captions are stored image by image, ``per_image`` each, a caption block is exactly the
    captions of one image block (``C = per_image * R``), so the threshold pre-pass *is* the main pass's
    diagonal call and costs nothing extra.
    """
    if chunk_size is None:
        hit_bytes = 1 if _numpy_counts(device) else itemsize
        scores = block_budget(device) // (itemsize + hit_bytes)
        aspect = per_image or max(1.0, m / n)
        rows = _even(n, max(2, math.isqrt(int(scores / aspect))))
        if per_image and rows * per_image < 2**24:
            return rows, rows * per_image
        return rows, _even(m, max(2, scores // rows))
    if isinstance(chunk_size, int):
        rows = cols = chunk_size
    else:
        rows, cols = (int(v) for v in chunk_size)
    if not (1 <= rows < 2**24 and 1 <= cols < 2**24):
        raise EvaluationError(f"chunk_size must be in [1, 2**24), got {chunk_size!r}")
    return _even(n, rows), _even(m, cols)


def _captions_per_image(c2i: np.ndarray, n: int) -> int | None:
    """k when the captions are image 0's k captions, then image 1's, ... (the Karpathy / precomp layout)."""
    m = len(c2i)
    if m % n or not m:
        return None
    k = m // n
    return k if np.array_equal(c2i, np.arange(m, dtype=np.int64) // k) else None


def _resolve_similarity(similarity: Similarity, block: tuple[int, int], dim: int) -> Callable:
    if isinstance(similarity, BlockScorer):
        return similarity.on_rows
    if callable(similarity):
        return similarity
    if similarity == "cosine":
        return None  # plain torch.mm into a reused output block (see _Scorer)
    if similarity == "order":
        # order_sim broadcasts (chunk, C, D); keep that temporary near 4 score blocks
        return functools.partial(order_sim, chunk=max(1, min(block[0], 4 * block[0] // max(dim, 1))))
    return get_similarity(similarity)


class _Scorer:
    """Scores one (R, D) image block against one (C, D) caption block, always as an (R, C) call."""

    def __init__(self, fn: Callable | None, shape: tuple[int, int], device: torch.device, dtype: torch.dtype):
        self.fn = fn
        self.shape = shape
        self.dtype = dtype
        self.out = torch.empty(shape, device=device, dtype=dtype) if fn is None else None

    def __call__(self, img: torch.Tensor, cap: torch.Tensor) -> torch.Tensor:
        if self.fn is None:
            return torch.mm(img, cap.t(), out=self.out)
        return checked_scores(self.fn(img, cap), self.shape, self.dtype)


def checked_scores(s: Any, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """What a similarity returned for ``shape`` (images, captions), checked, detached, in ``dtype``."""
    if not isinstance(s, torch.Tensor) or tuple(s.shape) != shape:
        got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s)
        raise EvaluationError(f"similarity must return a tensor of shape {shape} (images, captions), "
                              f"got {got}")
    return s.detach().to(dtype)


# --------------------------------------------------------------------------------------------------
# ranks


def _numpy_counts(device: torch.device) -> bool:
    """Whether the counting passes run in numpy (CPU tensors) rather than as torch ops."""
    return device.type == "cpu"


_POOL: concurrent.futures.ThreadPoolExecutor | None = None
_MIN_PART_ROWS = 64  # below this many rows a part is not worth a thread hand-off


def _parts(rows: int) -> list[tuple[int, int]]:
    """Row ranges for the CPU counting passes: one per torch thread (numpy releases the GIL in its loops)."""
    k = max(1, min(torch.get_num_threads(), rows // _MIN_PART_ROWS))
    step = -(-rows // k)
    return [(a, min(a + step, rows)) for a in range(0, rows, step)]


def _in_parts(fn: Callable[[int, int], Any], rows: int) -> list[Any]:
    """``[fn(a, b) for (a, b) in _parts(rows)]``, the parts on a shared thread pool. Threads that wait for a
    core simply wait (no OpenMP spin barrier), so a loaded machine costs no more than one thread would."""
    global _POOL
    parts = _parts(rows)
    if len(parts) == 1:
        return [fn(0, rows)]
    if _POOL is None:
        _POOL = concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1,
                                                      thread_name_prefix="vsekit-eval")
    return [f.result() for f in [_POOL.submit(fn, a, b) for a, b in parts]]


def _count_above(S: torch.Tensor, thr: torch.Tensor, dim: int, buf: torch.Tensor) -> torch.Tensor:
    """Number of entries of ``S`` above ``thr`` (broadcast) along ``dim``, as int64.

    On CPU this runs in numpy, split by rows over one thread per torch thread: the pass is short and
    memory-bound, and as a torch op its OpenMP threads stall at barriers whenever the cores are shared
    (3-10x slower on a loaded 2-core machine). Elsewhere: torch, with 0/1 floats (exact: block sides are
    < 2**24), which reduce faster than bools.
    """
    hit = buf[: S.shape[0], : S.shape[1]]
    if not _numpy_counts(S.device):
        torch.gt(S, thr, out=hit)
        return hit.sum(dim).to(torch.int64)
    s, t, h = S.numpy(), thr.numpy(), hit.numpy()

    def part(a: int, b: int) -> np.ndarray:
        np.greater(s[a:b], t[a:b] if t.shape[0] > 1 else t, out=h[a:b])
        return h[a:b].view(np.uint8).sum(dim, dtype=np.int32)

    counts = _in_parts(part, s.shape[0])
    total = np.concatenate(counts) if dim == 1 else functools.reduce(np.add, counts)
    return torch.from_numpy(total.astype(np.int64))


def _equal_at(S: torch.Tensor, thr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) of the entries of ``S`` equal to ``thr`` (broadcast), row-major; numpy on CPU, as above."""
    if not _numpy_counts(S.device):
        return torch.nonzero(S == thr, as_tuple=True)
    s, t = S.numpy(), thr.numpy()

    def part(a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        row, col = np.nonzero(s[a:b] == (t[a:b] if t.shape[0] > 1 else t))
        return row + a, col

    found = _in_parts(part, s.shape[0])
    return torch.from_numpy(np.concatenate([r for r, _ in found])), torch.from_numpy(np.concatenate([c for _, c in found]))


@torch.no_grad()
def _ranks(images: _Rows, captions: _Rows, c2i: np.ndarray, similarity: Similarity,
           chunk_size: int | Sequence[int] | None, device: torch.device, dtype: torch.dtype,
           dim: int) -> tuple[np.ndarray, np.ndarray]:
    n, m = len(images), len(captions)
    R, C = _block_shape(n, m, chunk_size, device, torch.empty((), dtype=dtype).element_size(),
                        _captions_per_image(c2i, n))
    score = _Scorer(_resolve_similarity(similarity, (R, C), dim), (R, C), device, dtype)
    img_buf = torch.zeros((R, dim), device=device, dtype=images.dtype)
    cap_buf = torch.zeros((C, dim), device=device, dtype=captions.dtype)
    owner = torch.as_tensor(c2i, device=device)

    neg_inf = torch.tensor(-math.inf, device=device, dtype=dtype)
    by_image = np.argsort(c2i, kind="stable")
    per_image = np.bincount(c2i, minlength=n)
    first = np.concatenate([[0], np.cumsum(per_image)])
    t_cap = torch.empty(m, device=device, dtype=dtype)  # score of (image of caption j, caption j)
    t_img = torch.full((n,), -math.inf, device=device, dtype=dtype)  # image i's best ground-truth score
    g_img = torch.full((n,), m, device=device, dtype=torch.int64)  # ... at this caption (lowest index)
    i2t = torch.zeros(n, device=device, dtype=torch.int64)
    t2i = torch.zeros(m, device=device, dtype=torch.int64)
    mismatched = torch.zeros((), device=device, dtype=torch.int64)
    hits = torch.empty((R, C), device=device, dtype=torch.bool if _numpy_counts(device) else dtype)

    def count(S: torch.Tensor, a: int, b: int, c0: int, c1: int) -> None:
        """Add block (images a:b, captions c0:c1)'s contribution to both rank counts."""
        nonlocal mismatched
        r, k = b - a, c1 - c0
        S = S[:r, :k]
        # image -> text: captions beating image i's best ground truth j*
        g, t = g_img[a:b], t_img[a:b]
        # all of the block before j*: ties sort first too, and "s >= t" is "s > nextafter(t, -inf)"
        cnt = _count_above(S, torch.where(g >= c1, torch.nextafter(t, neg_inf), t)[:, None], 1, hits)
        here = torch.nonzero((g >= c0) & (g < c1)).squeeze(1)
        if here.numel():  # rows whose j* is in this block: cnt holds "> t" so far
            sub = S if here.numel() == r else S[here]
            gg, tt = g[here] - c0, t[here]
            at_gt = sub[torch.arange(len(here), device=device), gg]
            cnt[here] -= (at_gt > tt).to(torch.int64)  # never count j* against itself
            row, col = _equal_at(sub, tt[:, None])  # ties: rare, so list them
            before = col < gg[row]
            cnt.index_add_(0, here[row[before]], torch.ones_like(row[before]))
        i2t[a:b] += cnt

        # text -> image: images beating caption j's own image
        own, t = owner[c0:c1], t_cap[c0:c1]
        cnt = _count_above(S, torch.where(own >= b, torch.nextafter(t, neg_inf), t)[None, :], 0, hits)
        here = torch.nonzero((own >= a) & (own < b)).squeeze(1)
        if here.numel():  # captions whose image is in this block: cnt holds "> t" so far
            sub = S if here.numel() == k else S[:, here]
            oi, tt = own[here] - a, t[here]
            at_gt = sub[oi, torch.arange(len(here), device=device)]
            mismatched += (at_gt != tt).sum()
            cnt[here] -= (at_gt > tt).to(torch.int64)
            row, col = _equal_at(sub, tt[None, :])
            before = row < oi[col]
            cnt.index_add_(0, here[col[before]], torch.ones_like(col[before]))
        t2i[c0:c1] += cnt

    # Pre-pass: every ground-truth score, from calls of the main pass's shape: each image block against
    # its own images' captions, C at a time. When those captions are exactly one caption block of the
    # main pass (5 captions per image in file order, with the default blocks), that call *is* the main
    # call and all its thresholds are known, so it is counted here and skipped below.
    counted = set()
    for a in range(0, n, R):
        b = min(a + R, n)
        img = images.rows(a, b, img_buf)
        mine = by_image[first[a] : first[b]]
        for s in range(0, len(mine), C):
            pos = mine[s : s + C]
            S = score(img, captions.take(pos, cap_buf))
            pos_t = torch.as_tensor(pos, device=device)
            t_cap[pos_t] = S[owner[pos_t] - a, torch.arange(len(pos), device=device)]
        if len(mine) == 0:
            continue
        c_mine = t_cap[torch.as_tensor(mine, device=device)]
        if torch.isnan(c_mine).any():
            raise EvaluationError("a ground-truth pair scores NaN; check the embeddings for NaN/inf")
        o_mine = owner[torch.as_tensor(mine, device=device)]
        t_img.scatter_reduce_(0, o_mine, c_mine, "amax")
        best = c_mine == t_img[o_mine]
        g_img.scatter_reduce_(0, o_mine[best], torch.as_tensor(mine, device=device)[best], "amin")
        c0 = int(mine[0])
        if c0 % C == 0 and len(mine) == min(C, m - c0) and _is_run(mine):
            count(S, a, b, c0, c0 + len(mine))
            counted.add((a, c0))

    for a in range(0, n, R):
        b = min(a + R, n)
        img = images.rows(a, b, img_buf)
        for c0 in range(0, m, C):
            if (a, c0) not in counted:
                c1 = min(c0 + C, m)
                count(score(img, captions.rows(c0, c1, cap_buf)), a, b, c0, c1)

    if int(mismatched):
        warnings.warn(f"{int(mismatched)} ground-truth scores differed between two evaluations of the same "
                      "pair: the similarity is not reproducible call to call (non-deterministic kernel?), so "
                      "ranks at exact or near ties may be off by one", RuntimeWarning, stacklevel=3)
    i2t[torch.as_tensor(per_image == 0, device=device)] = -1
    return i2t.cpu().numpy(), t2i.cpu().numpy()


def retrieval_ranks(image_emb: ArrayLike, caption_emb: ArrayLike, caption_to_image: ArrayLike | Sequence[int],
                    *, similarity: Similarity = "cosine", chunk_size: int | Sequence[int] | None = None,
                    device: str | torch.device | None = None) -> tuple[np.ndarray, np.ndarray]:
    """0-based ranks of the ground truth in both directions: ``(i2t (N,), t2i (M,))``, int64.

    - ``i2t[i]``: rank of image i's best ground-truth caption among all M captions (the VSE++ "min over
      its captions"); -1 for an image that has no caption (it is a candidate for text->image but cannot
      be an image->text query).
    - ``t2i[j]``: rank of caption j's image among all N images.

    Order: descending score, ties broken by lower index first (the order of a stable sort of ``-score``).
    Any number of captions per image; ``caption_to_image[j]`` is the image row of caption j.

    ``similarity``: "cosine" (inner product; embeddings are expected L2-normalised), "order" (VSE++
    order-violation, ``order_sim``), another registered name, or a callable ``(images (R, D), captions
    (C, D)) -> (R, C)`` that is deterministic per pair, or a :class:`BlockScorer` (embeddings None).

    Memory: blocks of R images x C captions (``chunk_size`` int = square, or (R, C); default: the
    shape that ``BLOCK_BUDGET`` holds, 4 MiB of scores and hits on CPU, 512 MiB elsewhere, in the inputs'
    aspect, split evenly; with k captions per image stored image by image, C = k R). Alive at once: one R x C score block,
    about three boolean/score temporaries of at most that size, the R x D and C x D input blocks, and
    O(N + M) per-query bookkeeping (exact ties are listed by index: only with massive ties, e.g. constant
    embeddings, can those lists reach 16 bytes per score of a block). Numpy inputs and memmaps are
    converted block by block. Computation is float32 (float64 if an input is float64) on ``device``
    (default: the tensor inputs' device, else CPU).
    """
    c2i, _, ranks = _ranker(image_emb, caption_emb, caption_to_image, similarity, chunk_size, device)
    return ranks(None, None, c2i)


def _ranker(image_emb: ArrayLike, caption_emb: ArrayLike, caption_to_image: ArrayLike | Sequence[int],
            similarity: Similarity, chunk_size: int | Sequence[int] | None, device: str | torch.device | None):
    """The checked inputs of :func:`retrieval_ranks` as ``(c2i, N, ranks)``: ``ranks(image_rows, caption_rows,
    owner)`` ranks a subset (None: all) of the images against one of the captions, ``owner`` their c2i."""
    image_emb, caption_emb, rows_dtype = row_inputs(image_emb, caption_emb, similarity)
    c2i = _check_inputs(image_emb, caption_emb, caption_to_image)
    dev = _pick_device(device, image_emb, caption_emb)
    dtype = _compute_dtype(image_emb, caption_emb)

    def ranks(image_rows: np.ndarray | None, caption_rows: np.ndarray | None, owner: np.ndarray):
        return _ranks(_Rows(image_emb, image_rows, dev, rows_dtype or dtype),
                      _Rows(caption_emb, caption_rows, dev, rows_dtype or dtype),
                      owner, similarity, chunk_size, dev, dtype, int(image_emb.shape[1]))

    return c2i, int(image_emb.shape[0]), ranks


# --------------------------------------------------------------------------------------------------
# metrics


def metrics_from_ranks(i2t_ranks: ArrayLike, t2i_ranks: ArrayLike) -> dict[str, float]:
    """R@1/5/10 (percent), medr = floor(median) + 1 and meanr = mean + 1 of 0-based ranks, and rsum.

    Formulas and their float evaluation order follow VSE++'s ``i2t``/``t2i``/``evalrank``, so numbers
    agree to the last digit. Negative i2t ranks (images without captions) are skipped.
    """
    out: dict[str, float] = {}
    for name, ranks in (("i2t", i2t_ranks), ("t2i", t2i_ranks)):
        r = np.asarray(_numpy(ranks), dtype=np.float64)
        r = r[r >= 0]
        if r.size == 0:
            raise EvaluationError(f"no {name} queries to score")
        for k in RECALL_AT:
            out[f"{name}_r{k}"] = float(100.0 * np.count_nonzero(r < k) / len(r))
        out[f"{name}_medr"] = float(np.floor(np.median(r)) + 1)
        out[f"{name}_meanr"] = float(r.mean() + 1)
    out["rsum"] = _rsum(out)
    return out


def _rsum(m: dict[str, float]) -> float:
    return float(m["i2t_r1"] + m["i2t_r5"] + m["i2t_r10"] + m["t2i_r1"] + m["t2i_r5"] + m["t2i_r10"])


def mean_over_folds(folds: Sequence[dict[str, float]]) -> dict[str, float]:
    """Per-key mean over folds; rsum is the sum of the six *averaged* recalls.

    (VSE++'s fold5 branch prints mean(rsum) * 6, six times too large; not reproduced.)
    """
    keys = [k for k in METRIC_KEYS if k != "rsum"]
    means = np.array([[f[k] for k in keys] for f in folds], dtype=np.float64).mean(axis=0)
    out = {k: float(v) for k, v in zip(keys, means)}
    out["rsum"] = _rsum(out)
    return out


def retrieval_metrics(
    image_emb: ArrayLike,
    caption_emb: ArrayLike,
    caption_to_image: ArrayLike | Sequence[int],
    protocol: str = "full",
    *,
    similarity: Similarity = "cosine",
    chunk_size: int | Sequence[int] | None = None,
    device: str | torch.device | None = None,
    return_folds: bool = False,
) -> dict[str, float] | tuple[dict[str, float], list[dict[str, float]]]:
    """Recall@1/5/10, medr, meanr in both directions and rsum, under the VSE++ protocol.

    ``protocol="full"``: all N images against all M captions (F30K-1K, COCO-5K). ``"1k5fold"`` (COCO-1K):
    the images are split into 5 consecutive equal blocks (N must divide by 5; N = 5000 in the standard
    case), each evaluated against the captions of its own images; every metric is the mean over folds and
    rsum the sum of the averaged recalls.

    Keys: ``i2t_r1 i2t_r5 i2t_r10 i2t_medr i2t_meanr t2i_r1 t2i_r5 t2i_r10 t2i_medr t2i_meanr rsum``.
    With ``return_folds=True`` returns ``(metrics, per_fold)``; ``per_fold`` is ``[metrics]`` for "full".
    Ranks, ties, captions per image, similarity, memory and device: see :func:`retrieval_ranks`.
    """
    if protocol not in PROTOCOLS:
        raise EvaluationError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
    c2i, n, ranks = _ranker(image_emb, caption_emb, caption_to_image, similarity, chunk_size, device)

    if protocol == "full":
        parts = [(None, None, c2i)]
    else:
        if n % NUM_FOLDS:
            raise EvaluationError(f"protocol '1k5fold' splits the images into {NUM_FOLDS} equal consecutive "
                                  f"folds, but N={n} images is not a multiple of {NUM_FOLDS} (COCO-1K uses "
                                  "the 5,000 test images)")
        size = n // NUM_FOLDS
        if size != COCO_1K_FOLD:
            logging.getLogger("vsekit.eval").warning(
                "protocol '1k5fold' on %d images gives folds of %d; COCO 1K is 5 folds of %d (the 5,000 test "
                "images: split 'testall' of the precomputed releases)", n, size, COCO_1K_FOLD)
        parts = []
        for f in range(NUM_FOLDS):
            caps = np.flatnonzero((c2i >= f * size) & (c2i < (f + 1) * size))
            if caps.size == 0:
                raise EvaluationError(f"fold {f} (images {f * size}..{(f + 1) * size - 1}) has no captions")
            parts.append((np.arange(f * size, (f + 1) * size), caps, c2i[caps] - f * size))

    folds = [metrics_from_ranks(*ranks(img_rows, cap_rows, owner)) for img_rows, cap_rows, owner in parts]
    metrics = folds[0] if protocol == "full" else mean_over_folds(folds)
    return (metrics, folds) if return_folds else metrics


# --------------------------------------------------------------------------------------------------
# label-relevance mAP (ACMR, Wang et al. 2017)


def _labels(x: Any, name: str) -> torch.Tensor:
    x = _numpy(x)
    if x.ndim not in (1, 2):
        raise EvaluationError(f"{name} must be 1-D class ids or 2-D multi-hot labels, got shape {x.shape}")
    return torch.from_numpy(np.ascontiguousarray(x))


def mean_average_precision(query_emb: ArrayLike, gallery_emb: ArrayLike,
                           query_labels: ArrayLike | Sequence[int], gallery_labels: ArrayLike | Sequence[int],
                           *, at: int | None = None, metric: str = "cosine", chunk_size: int = 256,
                           device: str | torch.device | None = None) -> float:
    """Label-relevance mean average precision (ACMR's metric), in [0, 1].

    A gallery item is relevant to a query when they share a label: equal class ids (1-D labels) or at
    least one common label (2-D multi-hot rows, e.g. MSCOCO categories). The gallery is ranked by
    ``metric``: "cosine" (inner product of L2-normalised rows, descending) or "euclidean" (ascending
    distance); ties go to the lower gallery index. ``at=None`` is mAP@all: AP = mean over relevant items
    of precision at their positions. ``at=K`` is the ACMR demo's mAP@K: only the top K count and AP is
    normalised by the number of relevant items found within them. A query with no relevant item in
    scope has AP 0. Queries are processed ``chunk_size`` at a time (memory O(chunk_size x G)).
    """
    ql, gl, dev, dtype = _label_inputs(query_emb, gallery_emb, query_labels, gallery_labels, metric,
                                       ("query", "gallery"), device)
    if at is not None and at < 1:
        raise EvaluationError(f"at must be a positive int or None, got {at}")
    s = _label_stats(query_emb, gallery_emb, ql, gl, metric, chunk_size, dev, dtype, at or 1, ())
    return (s["ap"] if at is None else s["ap_at"]) / int(query_emb.shape[0])


def _label_inputs(a_emb: ArrayLike, b_emb: ArrayLike, a_labels: Any, b_labels: Any, metric: str,
                  names: tuple[str, str], device: Any) -> tuple[torch.Tensor, torch.Tensor, torch.device, torch.dtype]:
    """Checked labels of two embedding sets on the compute device, with the device and dtype."""
    for name, x in ((f"{names[0]}_emb", a_emb), (f"{names[1]}_emb", b_emb)):
        if x.ndim != 2 or x.shape[0] == 0:
            raise EvaluationError(f"{name} must be a non-empty 2-D array, got shape {tuple(x.shape)}")
    if a_emb.shape[1] != b_emb.shape[1]:
        raise EvaluationError(f"embedding sizes differ: {a_emb.shape[1]} vs {b_emb.shape[1]}")
    if metric not in ("cosine", "euclidean"):
        raise EvaluationError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")
    al, bl = _labels(a_labels, f"{names[0]}_labels"), _labels(b_labels, f"{names[1]}_labels")
    if len(al) != a_emb.shape[0] or len(bl) != b_emb.shape[0] or al.ndim != bl.ndim:
        raise EvaluationError(f"labels must have one row per embedding and the same layout for {names[0]} and "
                              f"{names[1]}")
    dev = _pick_device(device, a_emb, b_emb)
    dtype = _compute_dtype(a_emb, b_emb)
    al, bl = al.to(dev), bl.to(dev)
    if al.ndim == 2:
        al, bl = al.to(dtype), bl.to(dtype)
    return al, bl, dev, dtype


PRECISION_AT = (1, 5, 10, 50)
MAP_AT = 50  # the ACMR demo's mAP@50
RECALL_LEVELS = tuple(i / 10 for i in range(11))


def _label_stats(query_emb: ArrayLike, gallery_emb: ArrayLike, ql: torch.Tensor, gl: torch.Tensor, metric: str,
                 chunk_size: int, dev: torch.device, dtype: torch.dtype, map_at: int,
                 precision_at: Sequence[int]) -> dict[str, Any]:
    """Sums over queries of AP@all, AP@map_at, P@K and interpolated precision at RECALL_LEVELS."""
    nq, ng = int(query_emb.shape[0]), int(gallery_emb.shape[0])
    gallery = _Rows(gallery_emb, None, dev, dtype)._tensor(gallery_emb)
    if metric == "cosine":
        gallery = torch.nn.functional.normalize(gallery, dim=1)
    g_sq = (gallery * gallery).sum(1)
    queries = _Rows(query_emb, None, dev, dtype)
    position = torch.arange(1, ng + 1, device=dev, dtype=dtype)
    levels = torch.tensor(RECALL_LEVELS, device=dev, dtype=dtype)
    ks = [min(k, ng) for k in precision_at]
    sums = {"ap": 0.0, "ap_at": 0.0, "p": [0.0] * len(ks), "pr": torch.zeros(len(levels), dtype=torch.float64)}
    for a in range(0, nq, chunk_size):
        b = min(a + chunk_size, nq)
        q = queries._tensor(query_emb[a:b])
        if metric == "cosine":
            scores = torch.nn.functional.normalize(q, dim=1) @ gallery.t()
            order = torch.sort(scores, dim=1, descending=True, stable=True)[1]
        else:
            dist = (q * q).sum(1, keepdim=True) + g_sq[None, :] - 2.0 * (q @ gallery.t())
            order = torch.sort(dist, dim=1, stable=True)[1]
        if gl.ndim == 1:
            hits = (gl[order] == ql[a:b, None]).to(dtype)
        else:
            hits = ((ql[a:b] @ gl.t()) > 0).gather(1, order).to(dtype)
        cum = hits.cumsum(1)
        precision = cum / position
        relevant = cum[:, -1]
        sums["ap"] += float(((precision * hits).sum(1) / relevant.clamp_min(1)).sum())
        d = min(map_at, ng)
        sums["ap_at"] += float(((precision[:, :d] * hits[:, :d]).sum(1) / cum[:, d - 1].clamp_min(1)).sum())
        for i, (k, k_cut) in enumerate(zip(precision_at, ks)):  # hits in the top K / K, also when K > gallery
            sums["p"][i] += float((cum[:, k_cut - 1] / k).sum())
        # interpolated precision at recall r: the best precision at any depth whose recall is >= r
        recall = cum / relevant.clamp_min(1)[:, None]
        best_after = precision.flip(1).cummax(1).values.flip(1)  # max precision from each depth on
        reach = torch.searchsorted(recall.contiguous(), levels.expand(len(recall), -1).contiguous())
        got = reach < ng
        interp = torch.where(got, best_after.gather(1, reach.clamp_max(ng - 1)), torch.zeros_like(best_after[:, :1]))
        interp = interp * (relevant > 0)[:, None]
        sums["pr"] += interp.double().sum(0).cpu()
    return sums


def label_metrics(image_emb: ArrayLike, caption_emb: ArrayLike, image_labels: ArrayLike | Sequence[int],
                  caption_labels: ArrayLike | Sequence[int], *, metric: str = "cosine", map_at: int = MAP_AT,
                  precision_at: Sequence[int] = PRECISION_AT, chunk_size: int = 256,
                  device: str | torch.device | None = None) -> dict[str, Any]:
    """Label-relevance retrieval metrics both ways (the protocol of ACMR and the cross-modal label benchmarks).

    Every image queries all captions (``i2t``) and every caption all images (``t2i``); a retrieved item is
    relevant when it shares a label with the query (equal class ids, or a common label of multi-hot rows).
    Ranked by ``metric`` ("cosine" or "euclidean"), ties to the lower gallery index. Keys, for each direction:
    ``{d}_map`` (mAP over the whole ranking), ``{d}_map@{map_at}`` (AP over the top ``map_at``, normalised by
    the relevant items found there, the ACMR demo's mAP@50), ``{d}_p@K`` (precision at K, in [0, 1]) and
    ``{d}_pr`` (interpolated precision at recall 0, 0.1, ..., 1); ``map_avg`` is the mean of the two mAPs.
    Vectorised, queries ``chunk_size`` at a time (memory O(chunk_size x gallery)).
    """
    if map_at < 1 or any(k < 1 for k in precision_at):
        raise EvaluationError("map_at and precision_at must be positive")
    il, cl, dev, dtype = _label_inputs(image_emb, caption_emb, image_labels, caption_labels, metric,
                                       ("image", "caption"), device)
    out: dict[str, Any] = {}
    for d, (q, g, ql, gl) in (("i2t", (image_emb, caption_emb, il, cl)), ("t2i", (caption_emb, image_emb, cl, il))):
        s = _label_stats(q, g, ql, gl, metric, chunk_size, dev, dtype, map_at, precision_at)
        nq = int(q.shape[0])
        out[f"{d}_map"] = s["ap"] / nq
        out[f"{d}_map@{map_at}"] = s["ap_at"] / nq
        for k, v in zip(precision_at, s["p"]):
            out[f"{d}_p@{k}"] = v / nq
        out[f"{d}_pr"] = [float(v) / nq for v in s["pr"]]
    out["map_avg"] = (out["i2t_map"] + out["t2i_map"]) / 2
    return out
