"""The evaluation protocols by name (:data:`EVAL_PROTOCOLS`): what ``vsekit eval --protocol``, ``eval.protocol``
(validation) and :meth:`~vsekit.inference.Embedder.evaluate` run. A protocol turns a corpus's scored inputs
into metrics; a new one is a function registered here with :func:`eval_protocol`, which gives the CLI its
choice, help and table."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from vsekit.data.corpus import Corpus
from vsekit.errors import did_you_mean
from vsekit.eval import report
from vsekit.eval.metrics import (
    ArrayLike,
    BlockScorer,
    EvaluationError,
    Similarity,
    label_metrics,
    retrieval_metrics,
)
from vsekit.utils.io import atomic_write_json

Result = tuple[dict[str, Any], list[dict[str, Any]]]  # (metrics, per-fold metrics)


@dataclass(frozen=True)
class EvalInputs:
    """What a protocol reads: the corpus; the model's similarity name, then (once encoded) the embeddings and
    the similarity that scores them, or a :class:`BlockScorer` and no embeddings; the run's ``semantics``
    section and ``eval.thresholds`` (protocol semantic)."""

    corpus: Corpus
    similarity: Similarity
    learned: bool = False  # the model scores pairs through a similarity network
    images: ArrayLike | None = None
    captions: ArrayLike | None = None
    chunk_size: int | Sequence[int] | None = None
    train_captions: Sequence[str] | None = None
    semantics: Any = None
    thresholds: Sequence[float] = ()

    def captions_at(self, rows: np.ndarray) -> EvalInputs:
        if isinstance(self.similarity, BlockScorer):
            return replace(self, similarity=self.similarity.captions_at(rows))
        return replace(self, captions=self.captions[rows])


@dataclass(frozen=True)
class EvalProtocol:
    """``run(inputs) -> (metrics, folds)``; ``check(inputs)`` refuses a corpus or model before anything is
    encoded; ``table(metrics, title=)``: the CLI's table; ``json_folds``: its JSON holds the folds too."""

    name: str
    run: Callable[[EvalInputs], Result]
    help: str
    table: Callable[..., str] = report.format_metrics_table
    check: Callable[[EvalInputs], Any] | None = None
    json_folds: bool = False

    def write(self, path: Any, metrics: dict[str, Any], folds: list[dict[str, Any]], **context: Any) -> Any:
        """The results as JSON at ``path`` (``context``: checkpoint, split, ...), written atomically."""
        if self.table is report.format_metrics_table:  # exact pairs: the keys of retrieval_metrics
            return report.write_metrics_json(path, metrics, folds=folds if self.json_folds else None, **context)
        return atomic_write_json(path, {**context, "metrics": metrics})


EVAL_PROTOCOLS: dict[str, EvalProtocol] = {}


def eval_protocol(name: str, **spec: Any) -> Callable[[Callable[[EvalInputs], Result]], Any]:
    """Register ``fn(inputs) -> (metrics, folds)`` as protocol ``name`` (``spec``: help, table, ...)."""

    def deco(fn: Callable[[EvalInputs], Result]) -> Callable[[EvalInputs], Result]:
        if name in EVAL_PROTOCOLS:
            raise KeyError(f"evaluation protocol {name!r} is registered twice")
        EVAL_PROTOCOLS[name] = EvalProtocol(name, fn, **spec)
        return fn

    return deco


def get_protocol(name: str) -> EvalProtocol:
    if name not in EVAL_PROTOCOLS:
        raise EvaluationError(f"unknown protocol {name!r}{did_you_mean(name, EVAL_PROTOCOLS)}; expected one of "
                              f"{', '.join(EVAL_PROTOCOLS)}")
    return EVAL_PROTOCOLS[name]


def _exact_pairs(protocol: str) -> Callable[[EvalInputs], Result]:
    def run(x: EvalInputs) -> Result:
        return retrieval_metrics(x.images, x.captions, x.corpus.caption_to_image, protocol=protocol,
                                 similarity=x.similarity, chunk_size=x.chunk_size, return_folds=True)

    return run


eval_protocol("full", help="full (e.g. F30K 1K, COCO 5K)")(_exact_pairs("full"))
eval_protocol("1k5fold", help="1k5fold (COCO 1K: mean over 5 folds)", json_folds=True)(_exact_pairs("1k5fold"))


def _labels_and_embeddings(x: EvalInputs) -> None:
    if x.learned:
        raise EvaluationError(f"protocol 'label_map' ranks by distances between embeddings; this model scores "
                              f"pairs with the {x.similarity!r} similarity network (use full, 1k5fold, semantic or "
                              "eccv)")
    if x.corpus.labels is None:
        raise EvaluationError(f"{x.corpus.name} has no class labels: protocol 'label_map' needs them")


@eval_protocol("label_map", table=report.format_label_table, check=_labels_and_embeddings,
               help="label_map (label relevance: mAP, mAP@50, precision@K both ways, as ACMR; needs class labels)")
def _label_map(x: EvalInputs) -> Result:
    metric = x.similarity if x.similarity in ("cosine", "euclidean") else "cosine"  # else: cosine
    m = label_metrics(x.images, x.captions, x.corpus.labels, x.corpus.caption_labels(), metric=metric)
    return m, [m]


def _coco_5k(x: EvalInputs):
    from vsekit.eval.eccv import coco_ids_from_corpus

    return coco_ids_from_corpus(x.corpus)  # COCO 5K test only; its 25,000 captions


@eval_protocol("eccv", table=report.format_eccv_table, check=_coco_5k,
               help="eccv (COCO 5K test from the Karpathy JSON: ECCV Caption and CxC positives beside the original "
                    "protocol)")
def _eccv(x: EvalInputs) -> Result:
    from vsekit.eval.eccv import eccv_metrics

    ids = _coco_5k(x)
    x, c2i = x.captions_at(ids.caption_rows), x.corpus.caption_to_image[ids.caption_rows]
    m = retrieval_metrics(x.images, x.captions, c2i, protocol="full", similarity=x.similarity,
                          chunk_size=x.chunk_size)
    m.update(eccv_metrics(x.images, x.captions, ids.image_cocoids, ids.caption_ids, similarity=x.similarity))
    m["eccv_map_at_r"] = (m["eccv_i2t_map_at_r"] + m["eccv_t2i_map_at_r"]) / 2
    return m, [m]


def _has_train_captions(x: EvalInputs) -> None:
    if x.train_captions is None:
        raise EvaluationError("protocol 'semantic' needs the training captions (the LSA model is fitted on them, as "
                              "LSEH's)")


@eval_protocol("semantic", table=report.format_semantic_table, check=_has_train_captions,
               help="semantic (any data set: a caption also counts when its LSA semantics are close to a "
                    "ground-truth caption's; R@K, mAP@R, R-Precision per threshold)")
def _semantic(x: EvalInputs) -> Result:
    from vsekit.eval.semantic import lsa_vectors_for, semantic_metrics

    s, c2i = x.semantics, x.corpus.caption_to_image  # LSA fitted once per caption set, in LSEH's cache
    vectors = lsa_vectors_for(x.train_captions, x.corpus.captions, cache_dir=s.cache_path(), **s.lsa_params())
    m = retrieval_metrics(x.images, x.captions, c2i, protocol="full", similarity=x.similarity,
                          chunk_size=x.chunk_size)
    m.update(semantic_metrics(x.images, x.captions, c2i, vectors, thresholds=tuple(x.thresholds),
                              similarity=x.similarity))
    return m, [m]
