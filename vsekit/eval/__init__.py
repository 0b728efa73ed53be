"""Retrieval evaluation: VSE++-protocol recall/medr/meanr/rsum (chunked, exact), label mAP, and the evaluation
protocols by name (:data:`EVAL_PROTOCOLS`)."""

from vsekit.eval.metrics import (
    METRIC_KEYS,
    BlockScorer,
    EvaluationError,
    label_metrics,
    mean_average_precision,
    mean_over_folds,
    metrics_from_ranks,
    retrieval_metrics,
    retrieval_ranks,
)
from vsekit.eval.protocols import EVAL_PROTOCOLS, EvalInputs, get_protocol
from vsekit.eval.report import (
    format_eccv_table,
    format_label_table,
    format_metrics_table,
    format_semantic_table,
    write_metrics_json,
)

__all__ = ["BlockScorer", "EVAL_PROTOCOLS", "EvalInputs", "EvaluationError", "METRIC_KEYS", "get_protocol",
           "label_metrics", "format_eccv_table", "format_label_table", "format_metrics_table",
           "format_semantic_table", "mean_average_precision", "mean_over_folds", "metrics_from_ranks",
           "retrieval_metrics", "retrieval_ranks", "write_metrics_json"]
