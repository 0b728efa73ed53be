"""Caption metrics on token ids: CIDEr-D (Vedantam et al., CVPR 2015) and corpus BLEU (Papineni et al., 2002).

Both sit this low because a training objective needs them: self-critical training rewards each sampled
caption by its CIDEr-D against the image's references, at every step. So they work on integer token ids
(``Vocabulary`` ids, or :func:`index_words` of word strings) and CIDEr-D is vectorised with numpy:

- an n-gram (n <= 4) is one uint64 key, four 16-bit digits of ``id + 1`` (token ids must be below 65535);
- :class:`CiderD` computes the document frequencies of a fixed reference corpus **once** (one document =
  the reference set of one image: df(g) = the number of images whose references contain g) and keeps the
  references, so scoring a batch only looks keys up.

CIDEr-D of candidate c against the references S of its image, with N documents::

    g_n(x)     = tf(g, x) * (log N - log max(1, df(g)))     for each n-gram g of length n, a vector per n
    sim_n(c,s) = sum_g min(g_n(c), g_n(s)) * g_n(s) / (|g_n(c)| |g_n(s)|)      (clipped: min of the weights)
    CIDEr-D(c) = 10 / |S| * sum_s exp(-(l(c) - l(s))^2 / (2 sigma^2)) * mean_{n=1..4} sim_n(c, s)

with l = length in tokens and sigma = 6. This is the computation of the COCO caption evaluation's CIDEr
scorer (pycocoevalcap 1.2 ``Cider``, which already applies the clipping and the length penalty); that scorer
takes df from the references of the captions it scores, which :func:`cider_d` does too.

BLEU-n is corpus-level: clipped n-gram matches (a candidate n-gram counts at most as often as in the
reference that has it most) summed over all candidates, divided by the candidate n-grams; the geometric mean
of the n = 1..N precisions times the brevity penalty exp(1 - r / c) when the candidates' total length c is
below r, the sum over candidates of the reference length closest to each (the shorter on a tie).
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

from vsekit.text.tokenizer import tokenize

MAX_N = 4
MAX_TOKEN_ID = (1 << 16) - 2  # id + 1 must fit 16 bits of a key

Tokens = Sequence[int]


# -- ragged token arrays ---------------------------------------------------------------------------------
def _ragged(seqs: Iterable[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(flat int64 ids, (S + 1,) offsets) of a list of token sequences."""
    seqs = [s.tolist() if isinstance(s, np.ndarray) else s for s in seqs]
    lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int64, count=int(offsets[-1]))
    if flat.size and (flat.min() < 0 or flat.max() > MAX_TOKEN_ID):
        raise ValueError(f"caption metrics need token ids in [0, {MAX_TOKEN_ID}], got {flat.min()}..{flat.max()}")
    return flat, offsets


def _take(flat: np.ndarray, offsets: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The sequences ``idx`` of a ragged array, as a new ragged array (vectorised gather)."""
    idx = np.asarray(idx, dtype=np.int64)
    starts, lengths = offsets[idx], offsets[idx + 1] - offsets[idx]
    new = np.zeros(len(idx) + 1, dtype=np.int64)
    np.cumsum(lengths, out=new[1:])
    pos = np.arange(new[-1], dtype=np.int64) - np.repeat(new[:-1], lengths) + np.repeat(starts, lengths)
    return flat[pos], new


def _ngram_rows(flat: np.ndarray, offsets: np.ndarray, n_max: int) -> tuple[np.ndarray, ...]:
    """Every n-gram occurrence (n = 1..n_max) of a ragged array: (seq, key, n) arrays, unsorted."""
    lengths = np.diff(offsets)
    seq_of = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    pos = np.arange(flat.size, dtype=np.int64) - offsets[:-1][seq_of] if flat.size else flat
    digits = flat.astype(np.uint64) + np.uint64(1)
    seqs, keys, ns = [], [], []
    key = np.zeros(flat.size, dtype=np.uint64)
    for n in range(1, n_max + 1):
        # the n-gram starting at each position: digits[i], ..., digits[i + n - 1] in 16-bit fields
        shifted = np.zeros(flat.size, dtype=np.uint64)
        if flat.size > n - 1:
            shifted[: flat.size - (n - 1)] = digits[n - 1:]
        key = key | (shifted << np.uint64(16 * (n - 1)))
        valid = pos + n <= lengths[seq_of]
        seqs.append(seq_of[valid])
        keys.append(key[valid])
        ns.append(np.full(int(valid.sum()), n, dtype=np.int64))
    return np.concatenate(seqs), np.concatenate(keys), np.concatenate(ns)


def _ngram_counts(flat: np.ndarray, offsets: np.ndarray, n_max: int) -> tuple[np.ndarray, ...]:
    """Every distinct (sequence, n-gram) of a ragged array with its count: (seq, key, n, tf) arrays, sorted
    by sequence, then key."""
    seq, key, n = _ngram_rows(flat, offsets, n_max)
    order = np.lexsort((key, seq))
    seq, key, n = seq[order], key[order], n[order]
    if seq.size == 0:
        return seq, key, n, np.zeros(0, dtype=np.float64)
    first = np.ones(seq.size, dtype=bool)
    first[1:] = (seq[1:] != seq[:-1]) | (key[1:] != key[:-1])
    starts = np.flatnonzero(first)
    tf = np.diff(np.append(starts, seq.size)).astype(np.float64)
    return seq[starts], key[starts], n[starts], tf


# -- CIDEr-D ---------------------------------------------------------------------------------------------
class CiderD:
    """CIDEr-D with the document frequencies of a fixed reference corpus, computed once.

    ``documents[i]`` holds the reference token sequences of image i. :meth:`score_documents` scores
    candidates against stored documents (the self-critical reward: a sampled caption against all training
    references of its image; each document of a batch is vectorised once however many candidates it has);
    :meth:`score` against references given with the call (same df).
    """

    def __init__(self, documents: Sequence[Sequence[Tokens]], n: int = MAX_N, sigma: float = 6.0) -> None:
        if not 1 <= n <= MAX_N:
            raise ValueError(f"n must be in 1..{MAX_N}, got {n}")
        if sigma <= 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        self.n, self.sigma = int(n), float(sigma)
        self.num_documents = len(documents)
        if self.num_documents == 0:
            raise ValueError("CIDEr-D needs at least one reference document")
        refs_per_doc = np.fromiter(map(len, documents), dtype=np.int64, count=self.num_documents)
        self.doc_offsets = np.zeros(self.num_documents + 1, dtype=np.int64)
        np.cumsum(refs_per_doc, out=self.doc_offsets[1:])
        self.ref_flat, self.ref_offsets = _ragged(itertools.chain.from_iterable(documents))
        ref_doc = np.repeat(np.arange(self.num_documents, dtype=np.int64), refs_per_doc)
        seq, key, _ = _ngram_rows(self.ref_flat, self.ref_offsets, self.n)
        # df(g): the number of documents with g in some reference -- count each (document, n-gram) once
        keys, dense = np.unique(key, return_inverse=True)
        u = np.int64(max(1, keys.size))
        per_doc = ref_doc[seq] * u + dense.reshape(-1)
        per_doc.sort()
        first = np.ones(per_doc.size, dtype=bool)
        first[1:] = per_doc[1:] != per_doc[:-1]
        self.df_keys = keys
        counts = np.bincount(per_doc[first] % u, minlength=keys.size)
        self.df_log = np.log(np.maximum(counts, 1).astype(np.float64))
        self.log_n = math.log(float(self.num_documents))

    def _idf(self, keys: np.ndarray) -> np.ndarray:
        """log N - log max(1, df) of each key (an n-gram no document has: log N)."""
        if self.df_keys.size == 0 or keys.size == 0:
            return np.full(keys.shape, self.log_n)
        order = np.argsort(keys, kind="stable")  # sorted queries: searchsorted narrows from the previous hit
        pos = np.empty(keys.size, dtype=np.int64)
        pos[order] = np.searchsorted(self.df_keys, keys[order])
        pos = np.minimum(pos, self.df_keys.size - 1)
        found = self.df_keys[pos] == keys
        return self.log_n - np.where(found, self.df_log[pos], 0.0)

    def _vectors(self, flat: np.ndarray, offsets: np.ndarray):
        """(seq, key, n, tf-idf weight) rows and the (S, n) norms and (S,) lengths of a ragged array."""
        seq, key, n, tf = _ngram_counts(flat, offsets, self.n)
        w = tf * self._idf(key)
        s = len(offsets) - 1
        norms = np.sqrt(np.bincount(seq * self.n + (n - 1), weights=w * w, minlength=s * self.n)).reshape(s, self.n)
        return seq, key, n, w, norms, np.diff(offsets).astype(np.float64)

    def score_documents(self, candidates: Sequence[Tokens], rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """(C,) CIDEr-D of candidate j against the stored references of document ``rows[j]``."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(rows) != len(candidates):
            raise ValueError(f"{len(candidates)} candidates but {len(rows)} document rows")
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_documents):
            raise ValueError(f"document rows outside [0, {self.num_documents})")
        docs, cand_set = np.unique(rows, return_inverse=True)
        counts = self.doc_offsets[docs + 1] - self.doc_offsets[docs]
        ref_idx = np.repeat(self.doc_offsets[docs], counts) + _within(counts)
        refs = _take(self.ref_flat, self.ref_offsets, ref_idx)
        return self._score(_ragged(candidates), refs, counts, cand_set.reshape(-1))

    def score(self, candidates: Sequence[Tokens], references: Sequence[Sequence[Tokens]]) -> np.ndarray:
        """(C,) CIDEr-D of candidate j against ``references[j]`` (df of this scorer's documents)."""
        if len(references) != len(candidates):
            raise ValueError(f"{len(candidates)} candidates but {len(references)} reference sets")
        counts = np.fromiter(map(len, references), dtype=np.int64, count=len(references))
        return self._score(_ragged(candidates), _ragged(itertools.chain.from_iterable(references)), counts,
                           np.arange(len(candidates)))

    def _score(self, cand: tuple[np.ndarray, np.ndarray], refs: tuple[np.ndarray, np.ndarray],
               refs_per_set: np.ndarray, cand_set: np.ndarray) -> np.ndarray:
        """Candidate j against reference set ``cand_set[j]``; set k is ``refs_per_set[k]`` consecutive refs."""
        c = len(cand[1]) - 1
        if c == 0:
            return np.zeros(0)
        if (refs_per_set < 1).any():
            raise ValueError("every candidate needs at least one reference")
        c_seq, c_key, c_n, c_w, c_norm, c_len = self._vectors(*cand)
        r_seq, r_key, _, r_w, r_norm, r_len = self._vectors(*refs)
        set_start = np.cumsum(refs_per_set) - refs_per_set
        # pairs (candidate, one of its references), candidate-major
        pairs_per_cand = refs_per_set[cand_set]
        pair_cand = np.repeat(np.arange(c, dtype=np.int64), pairs_per_cand)
        pair_ref = np.repeat(set_start[cand_set], pairs_per_cand) + _within(pairs_per_cand)
        pair_start = np.cumsum(pairs_per_cand) - pairs_per_cand
        # join candidate n-grams with the reference n-grams of the candidate's set, on (set, dense key id)
        uniq, inv = np.unique(np.concatenate([c_key, r_key]), return_inverse=True)
        u = np.int64(max(1, uniq.size))
        inv = inv.reshape(-1)
        ref_set = np.repeat(np.arange(refs_per_set.size, dtype=np.int64), refs_per_set)
        r_comp = ref_set[r_seq] * u + inv[c_key.size:]
        r_order = np.argsort(r_comp, kind="stable")
        r_sorted = r_comp[r_order]
        q_comp = cand_set[c_seq] * u + inv[: c_key.size]
        lo = np.searchsorted(r_sorted, q_comp, side="left")
        hits = np.searchsorted(r_sorted, q_comp, side="right") - lo
        qr = np.repeat(np.arange(c_key.size), hits)  # candidate row of each match
        pr = r_order[np.repeat(lo, hits) + _within(hits)]  # reference row of each match
        pair = pair_start[c_seq[qr]] + (r_seq[pr] - set_start[cand_set[c_seq[qr]]])
        num = np.bincount(pair * self.n + (c_n[qr] - 1), weights=np.minimum(c_w[qr], r_w[pr]) * r_w[pr],
                          minlength=pair_cand.size * self.n)
        num = num.reshape(pair_cand.size, self.n)
        denom = c_norm[pair_cand] * r_norm[pair_ref]
        sim = np.where(denom > 0, num / np.where(denom > 0, denom, 1.0), 0.0)
        penalty = np.exp(-((c_len[pair_cand] - r_len[pair_ref]) ** 2) / (2 * self.sigma ** 2))
        per_pair = sim.mean(1) * penalty
        return 10.0 * np.bincount(pair_cand, weights=per_pair, minlength=c) / pairs_per_cand


def _within(counts: np.ndarray) -> np.ndarray:
    """0, 1, ..., counts[0] - 1, 0, 1, ..., counts[1] - 1, ...: the position inside each group."""
    counts = np.asarray(counts, dtype=np.int64)
    return np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)


def cider_d(candidates: Sequence[Tokens], references: Sequence[Sequence[Tokens]], n: int = MAX_N,
            sigma: float = 6.0) -> tuple[float, np.ndarray]:
    """(mean, per-candidate) CIDEr-D of ``candidates[j]`` against ``references[j]``, with the document
    frequencies of these references (one document per candidate), as the COCO caption evaluation does."""
    scores = CiderD(references, n=n, sigma=sigma).score_documents(candidates, np.arange(len(candidates)))
    return float(scores.mean()) if len(scores) else 0.0, scores


# -- BLEU ------------------------------------------------------------------------------------------------
def _ngrams(seq: Sequence, n_max: int) -> Counter:
    seq = tuple(seq)
    return Counter(seq[i: i + n] for n in range(1, n_max + 1) for i in range(len(seq) - n + 1))


def corpus_bleu(candidates: Sequence[Sequence], references: Sequence[Sequence[Sequence]],
                n: int = MAX_N) -> list[float]:
    """Corpus BLEU-1..n of ``candidates[j]`` against ``references[j]`` (any hashable tokens): clipped
    n-gram precisions summed over the corpus, brevity penalty on the closest reference lengths. A precision
    of 0 makes that BLEU-k and every higher one 0."""
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference sets")
    correct, total = [0] * n, [0] * n
    cand_len = ref_len = 0
    for cand, refs in zip(candidates, references):
        if not refs:
            raise ValueError("every candidate needs at least one reference")
        counts = _ngrams(cand, n)
        best: Counter = Counter()
        for r in refs:
            best |= _ngrams(r, n)  # the most times each n-gram occurs in one reference
        for g, k in counts.items():
            correct[len(g) - 1] += min(k, best[g])
        for k in range(n):
            total[k] += max(0, len(cand) - k)
        cand_len += len(cand)
        ref_len += min((abs(len(r) - len(cand)), len(r)) for r in refs)[1]
    bp = 1.0 if cand_len >= ref_len else (math.exp(1 - ref_len / cand_len) if cand_len else 0.0)
    out, log_sum = [], 0.0
    for k in range(n):
        if correct[k] == 0 or total[k] == 0:
            out.extend([0.0] * (n - k))
            break
        log_sum += math.log(correct[k] / total[k])
        out.append(bp * math.exp(log_sum / (k + 1)))
    return out


# -- words -----------------------------------------------------------------------------------------------
def index_words(*collections: Sequence[Sequence[Sequence[str]]] | Sequence[Sequence[str]]) -> tuple[list, dict]:
    """Word strings -> integer ids, one table over all the given collections (nested lists of token
    lists, any depth); returns the collections with ids in place of words, and the table."""
    table: dict[str, int] = {}

    def convert(x):
        if isinstance(x, str):
            if x not in table:
                table[x] = len(table)
                if len(table) > MAX_TOKEN_ID + 1:
                    raise ValueError(f"more than {MAX_TOKEN_ID + 1} distinct words")
            return table[x]
        return [convert(y) for y in x]

    return [convert(c) for c in collections], table


def caption_scores(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """BLEU-1..4 (corpus) and CIDEr-D (df of these references) of caption strings, each tokenised by
    vsekit's caption tokenizer; ``references[j]`` are the reference strings of ``candidates[j]``'s image."""
    cand = [tokenize(c) for c in candidates]
    refs = [[tokenize(r) for r in rs] for rs in references]
    bleus = corpus_bleu(cand, refs)
    (cand_ids, ref_ids), _ = index_words(cand, refs)
    cider, _ = cider_d(cand_ids, ref_ids)
    return {**{f"bleu{k + 1}": b for k, b in enumerate(bleus)}, "cider_d": cider}


def distinct_share(captions: Sequence[str]) -> float:
    """The share of distinct captions among ``captions`` (after vsekit's tokenizer): 1 / N for a decoder that
    writes one caption for every image, 1 when every image gets its own."""
    if not captions:
        raise ValueError("distinct_share: no captions")
    return len({tuple(tokenize(c)) for c in captions}) / len(captions)
