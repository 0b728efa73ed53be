"""Retrieval evaluation: VSE++-protocol recall/medr/meanr/rsum (chunked, exact) and label mAP."""

from vsekit.eval.metrics import (
    EXTENDED_PROTOCOLS,
    LABEL_PROTOCOL,
    METRIC_KEYS,
    PROTOCOLS,
    EvaluationError,
    label_metrics,
    mean_average_precision,
    mean_over_folds,
    metrics_from_ranks,
    retrieval_metrics,
    retrieval_ranks,
)
from vsekit.eval.report import (
    format_eccv_table,
    format_label_table,
    format_metrics_table,
    format_semantic_table,
    write_metrics_json,
)

__all__ = [
    "EvaluationError",
    "METRIC_KEYS",
    "EXTENDED_PROTOCOLS",
    "LABEL_PROTOCOL",
    "PROTOCOLS",
    "label_metrics",
    "format_eccv_table",
    "format_label_table",
    "format_metrics_table",
    "format_semantic_table",
    "mean_average_precision",
    "mean_over_folds",
    "metrics_from_ranks",
    "retrieval_metrics",
    "retrieval_ranks",
    "write_metrics_json",
]
