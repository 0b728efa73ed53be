"""Retrieval evaluation: VSE++-protocol recall/medr/meanr/rsum (chunked, exact) and label mAP."""

from vsekit.eval.metrics import (
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
from vsekit.eval.report import format_label_table, format_metrics_table, write_metrics_json

__all__ = [
    "EvaluationError",
    "METRIC_KEYS",
    "LABEL_PROTOCOL",
    "PROTOCOLS",
    "label_metrics",
    "format_label_table",
    "format_metrics_table",
    "mean_average_precision",
    "mean_over_folds",
    "metrics_from_ranks",
    "retrieval_metrics",
    "retrieval_ranks",
    "write_metrics_json",
]
