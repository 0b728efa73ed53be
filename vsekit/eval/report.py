"""Human- and machine-readable retrieval results: a fixed-width table and an atomically written JSON."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vsekit.eval.metrics import DIRECTIONS, METRIC_KEYS
from vsekit.utils.io import atomic_write_json

# (header, key suffix, format): medr is an integer by construction (floor(median) + 1)
_COLUMNS = (("R@1", "r1", ".2f"), ("R@5", "r5", ".2f"), ("R@10", "r10", ".2f"), ("medr", "medr", ".0f"),
            ("meanr", "meanr", ".2f"))
_LABELS = {"i2t": "image->text", "t2i": "text->image"}
_WIDTH = max(len(v) for v in _LABELS.values())


def format_metrics_table(metrics: Mapping[str, float], title: str | None = None) -> str:
    """A fixed-width table of :func:`retrieval_metrics` output: one row per direction, then rsum.

    Recalls in percent with two decimals (enough to tell two runs apart; the JSON keeps full precision).
    """
    missing = [k for k in METRIC_KEYS if k not in metrics]
    if missing:
        raise KeyError(f"metrics lack {missing}; expected the keys of retrieval_metrics")
    lines = [title] if title else []
    lines.append(f"{'':<{_WIDTH}}" + "".join(f"{name:>9}" for name, _, _ in _COLUMNS))
    for d in DIRECTIONS:
        cells = "".join(f"{metrics[f'{d}_{key}']:>9{fmt}}" for _, key, fmt in _COLUMNS)
        lines.append(f"{_LABELS[d]:<{_WIDTH}}{cells}")
    lines.append(f"{'rsum':<{_WIDTH}}{metrics['rsum']:>9.2f}")
    return "\n".join(lines)


def write_metrics_json(path: str | os.PathLike, metrics: Mapping[str, float], *,
                       folds: Sequence[Mapping[str, float]] | None = None, **context: Any) -> Path:
    """Write ``{"metrics": ..., "folds": [...], **context}`` to ``path`` atomically (a crash leaves the old
    file or the new one, never half of one). ``context`` is free-form: checkpoint, split, protocol, ..."""
    record: dict[str, Any] = dict(context)
    record["metrics"] = {k: float(metrics[k]) for k in METRIC_KEYS}
    if folds is not None:
        record["folds"] = [{k: float(f[k]) for k in METRIC_KEYS} for f in folds]
    return atomic_write_json(path, record)


def format_label_table(metrics: Mapping[str, Any], title: str | None = None) -> str:
    """A fixed-width table of :func:`~vsekit.eval.metrics.label_metrics` output: mAP, mAP@K and precision@K per
    direction, then their average mAP."""
    keys = [k[4:] for k in metrics if k.startswith("i2t_") and k != "i2t_pr"]
    lines = [title] if title else []
    lines.append(f"{'':<{_WIDTH}}" + "".join(f"{k:>10}" for k in keys))
    for d in DIRECTIONS:
        lines.append(f"{_LABELS[d]:<{_WIDTH}}" + "".join(f"{100 * metrics[f'{d}_{k}']:>10.2f}" for k in keys))
    lines.append(f"{'mAP (avg)':<{_WIDTH}}{100 * metrics['map_avg']:>10.2f}")
    return "\n".join(lines)


def format_eccv_table(metrics: Mapping[str, Any], title: str | None = None) -> str:
    """COCO 5K with extended positives beside the original protocol: ECCV Caption mAP@R, R-Precision, R@1;
    CxC R@1/5/10; the exact pairs' R@1/5/10 and rsum."""
    cols = [("ECCV mAP@R", "eccv_{d}_map_at_r"), ("ECCV R-P", "eccv_{d}_rprecision"), ("ECCV R@1", "eccv_{d}_r1"),
            ("CxC R@1", "cxc_{d}_r1"), ("CxC R@5", "cxc_{d}_r5"), ("CxC R@10", "cxc_{d}_r10"),
            ("R@1", "{d}_r1"), ("R@5", "{d}_r5"), ("R@10", "{d}_r10")]
    lines = [title] if title else []
    lines.append(f"{'':<{_WIDTH}}" + "".join(f"{name:>11}" for name, _ in cols))
    for d in DIRECTIONS:
        cells = "".join(f"{metrics[key.format(d=d)]:>11.2f}" for _, key in cols)
        lines.append(f"{_LABELS[d]:<{_WIDTH}}{cells}")
    lines.append(f"{'rsum (exact pairs)':<{_WIDTH}}{metrics['rsum']:>11.2f}")
    return "\n".join(lines)


def format_semantic_table(metrics: Mapping[str, Any], title: str | None = None) -> str:
    """Semantic recall: for the exact pairs and each LSA-cosine threshold, R@1/5/10, mAP@R and R-Precision both
    ways (:func:`vsekit.eval.semantic.semantic_metrics`)."""
    levels = ["exact"] + [str(c["threshold"]) for c in metrics.get("curve", [])]
    cols = [("R@1", "r1"), ("R@5", "r5"), ("R@10", "r10"), ("mAP@R", "map_at_r"), ("R-P", "rprec")]
    lines = [title] if title else []
    lines.append(f"{'plausible at':<17}{'':<5}" + "".join(f"{name:>8}" for name, _ in cols) + f"{'rsum':>9}")
    for level in levels:
        for d in DIRECTIONS:
            cells = "".join(f"{metrics[f'sem@{level}_{d}_{k}']:>8.2f}" for _, k in cols)
            rsum = f"{metrics[f'sem@{level}_rsum']:>9.2f}" if d == "i2t" else ""
            lines.append(f"{('exact pairs' if level == 'exact' else 'LSA cos >= ' + level):<17}{d:<5}{cells}{rsum}")
    return "\n".join(lines)
