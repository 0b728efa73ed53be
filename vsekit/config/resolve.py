"""From a recipe (file or dict) and overrides to a validated :class:`~vsekit.config.schema.RunConfig`."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from vsekit.config.recipes import apply_overrides, deep_merge, load_recipe
from vsekit.config.schema import CONFIG_FORMAT, RunConfig
from vsekit.errors import ConfigError
from vsekit.registry import check_components, config_error_from, short_repr

# keys of the data section that belong to `transform`
_TRANSFORM_KEYS = ("image_size", "resize", "resize_policy", "augment")
# every integer of a config fits torch's and NumPy's 64 bits
_INT64 = (-(2**63), 2**63 - 1)


def check_format(raw: dict[str, Any]) -> None:
    """Refuse a config of another format than this vsekit's (one format: :data:`CONFIG_FORMAT`)."""
    fmt = raw.get("config_format", CONFIG_FORMAT)
    if fmt == CONFIG_FORMAT and not isinstance(fmt, bool):
        return
    if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt < 1:
        raise ConfigError(f"config_format: {short_repr(fmt)} is not a config format (this vsekit reads "
                          f"{CONFIG_FORMAT}); leave it out")
    if fmt > CONFIG_FORMAT:
        raise ConfigError(f"config_format: {fmt} is newer than this vsekit reads ({CONFIG_FORMAT}); upgrade vsekit")
    raise ConfigError(f"config_format: {fmt} was written by a vsekit before 0.1.0, which this one does not read: "
                      "retrain with this vsekit")


def validate_config(raw: dict[str, Any] | RunConfig, where: str = "") -> RunConfig:
    """Check every section of ``raw`` (a plain-dict config) and return the typed config.

    An unknown key anywhere, a value of the wrong type or out of range, an unknown component or data
    format: a :class:`ConfigError` whose message names the dotted key and, for a typo, the nearest valid one.
    Every training stage's merged config is validated too.
    """
    if isinstance(raw, RunConfig):
        return raw
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping, got {type(raw).__name__}")
    check_format(raw)
    raw = copy.deepcopy(raw)
    check_numbers(raw, where)  # before the sections' own checks, which may quote a bad number under another key
    prefix = f"{where}." if where else ""
    moved = [k for k in _TRANSFORM_KEYS if k in (raw.get("data") or {})]
    if moved:
        raise ConfigError(f"{prefix}data.{moved[0]}: moved to {prefix}transform.{moved[0]} (the data section says "
                          "what to read, the transform section how images are resized and augmented)")
    raw.setdefault("data", None)  # checked by its format's options class even when left out
    check_components(RunConfig, raw, where)  # every component section, at any depth, before the typed sections
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as e:
        raise config_error_from(e, where, RunConfig) from None
    check_numbers(cfg.model_dump(), where)  # again: text such as "inf" became a number in validation
    stage_configs(cfg, where)
    return cfg


def check_numbers(node: Any, key: str = "") -> None:
    """Every number of a config (``node``: a plain dict, as given or validated) is finite and fits 64 bits.

    The typed sections already refuse a non-finite float; this also covers what they hold untyped (a stage's
    optimizer overrides, a component's options of type ``Any``, a BERT config) and the data sources' own
    options, so that no inf, nan or 100-digit integer reaches the trainer. A :class:`ConfigError` names the key.
    """
    if isinstance(node, bool):
        return
    if isinstance(node, float) and not math.isfinite(node):
        raise ConfigError(f"{key}: must be a finite number (got {node!r})")
    if isinstance(node, int) and not _INT64[0] <= node <= _INT64[1]:
        raise ConfigError(f"{key}: {short_repr(node)} does not fit a 64-bit integer")
    if isinstance(node, dict):
        for k, v in node.items():
            check_numbers(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            check_numbers(v, f"{key}[{i}]")


def stage_configs(cfg: RunConfig, where: str = "") -> list[RunConfig]:
    """The validated config of each training stage: the run's config with the stage's overrides merged in
    (a stage does not inherit the previous stage's overrides)."""
    prefix = f"{where}." if where else ""
    base = cfg.to_dict()
    base["train"]["stages"] = []
    return [validate_config(deep_merge(base, stage.overrides()), where=f"{prefix}train.stages[{i}]")
            for i, stage in enumerate(cfg.train.stages)]


def resolve_config(recipe: str | Path | dict | RunConfig | None, overrides: Iterable[str] = ()) -> RunConfig:
    """Defaults <- recipe (with its ``_base_`` chain) <- overrides, validated; ``${name}`` in ``output_dir``
    is replaced by the run's name."""
    if isinstance(recipe, RunConfig):
        data = recipe.to_dict()
    elif recipe is None or isinstance(recipe, dict):
        data = recipe or {}  # apply_overrides copies it
    else:
        data = load_recipe(recipe)
    cfg = validate_config(apply_overrides(data, list(overrides)))
    if "${name}" in cfg.output_dir:
        cfg.output_dir = cfg.output_dir.replace("${name}", cfg.name)
    return cfg
