"""From a recipe (file or dict) and overrides to a validated :class:`~vsekit.config.schema.RunConfig`."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from vsekit.config.recipes import apply_overrides, deep_merge, load_recipe
from vsekit.config.schema import (
    CONFIG_FORMAT,
    MINED_OWN_KEYS,
    ModelConfig,
    ObjectiveConfig,
    OptimConfig,
    RunConfig,
)
from vsekit.data.sources import data_config
from vsekit.errors import ConfigError, did_you_mean
from vsekit.registry import config_error_from, short_repr, validate_section

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


def _component(registry: Any, spec: Any, default: dict[str, Any], where: str,
               also: tuple[str, ...] = ()) -> dict[str, Any]:
    if spec is None:
        spec = default
    if isinstance(spec, dict) and "name" not in spec:
        spec = {"name": default["name"], **spec}
    return registry.validate(spec, where, also=also)


def _validate_components(raw: dict[str, Any], prefix: str = "") -> None:
    """Check, in place, the sections that name registered components against those components."""
    from vsekit.losses import LOSSES, MINED_LOSS, OBJECTIVE_TERMS
    from vsekit.models import IMAGE_ENCODERS, TEXT_ENCODERS
    from vsekit.models.similarity import check_similarity_spec

    model = raw.get("model")
    if isinstance(model, dict):
        defaults = ModelConfig()
        model["image_encoder"] = _component(IMAGE_ENCODERS, model.get("image_encoder"), defaults.image_encoder,
                                            f"{prefix}model.image_encoder")
        model["text_encoder"] = _component(TEXT_ENCODERS, model.get("text_encoder"), defaults.text_encoder,
                                           f"{prefix}model.text_encoder")
        if model.get("similarity") is not None:
            model["similarity"] = check_similarity_spec(model["similarity"], f"{prefix}model.similarity")
    if "loss" in raw:
        raw["loss"] = _component(LOSSES, raw["loss"], RunConfig().loss, f"{prefix}loss")
    objective = raw.get("objective")
    if isinstance(objective, dict) and isinstance(objective.get("embedding"), dict) and "loss" in objective["embedding"]:
        term = objective["embedding"]
        term["loss"] = _component(LOSSES, term["loss"], {"name": "hinge"}, f"{prefix}objective.embedding.loss")
    if isinstance(objective, dict) and isinstance(objective.get("mined"), dict):
        mined = objective["mined"]
        default = ObjectiveConfig().mined
        own = {k: mined[k] for k in MINED_OWN_KEYS if k in mined and k != "name"}
        for k, typ in (("weight", float), ("pool_size", int)):
            if k in own:
                try:
                    own[k] = typ(own[k])
                except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf)
                    kind = "an integer" if typ is int else "a number"
                    raise ConfigError(f"{prefix}objective.mined.{k}: expected {kind}, got {own[k]!r}") from None
        if own.get("pool_size", 1) < 1:
            raise ConfigError(f"{prefix}objective.mined.pool_size: must be >= 1, got {own['pool_size']}")
        if mined.get("name", MINED_LOSS) != MINED_LOSS:
            raise ConfigError(f"{prefix}objective.mined.name: unknown mined-negative loss {mined['name']!r} "
                              f"(known: {MINED_LOSS})")
        spec = {"name": "mined", **{k: v for k, v in mined.items() if k not in own and k != "name"}}
        checked = OBJECTIVE_TERMS.validate(spec, f"{prefix}objective.mined", also=MINED_OWN_KEYS)
        objective["mined"] = {**checked, "name": default["name"], **own}
    if isinstance(objective, dict) and objective.get("terms") is not None:
        objective["terms"] = _validate_terms(objective["terms"], f"{prefix}objective.terms")


def _validate_terms(terms: Any, where: str) -> dict[str, dict[str, Any]]:
    """``objective.terms``: each key a registered term, its section the term's options plus ``weight`` and
    ``optim`` (an optimizer section for the term's own parts, over the stage's ``optim``)."""
    from vsekit.losses.terms import OBJECTIVE_TERMS, TERM_OWN_KEYS, term_options

    if not isinstance(terms, dict):
        raise ConfigError(f"{where}: expected a mapping of term name -> options, got {terms!r}")
    out: dict[str, dict[str, Any]] = {}
    for name, section in terms.items():
        section = {} if section is None else section
        if name not in OBJECTIVE_TERMS:
            raise ConfigError(f"{where}.{name}: unknown key: not a registered objective term"
                              f"{did_you_mean(name, OBJECTIVE_TERMS.names())} "
                              f"(known: {', '.join(OBJECTIVE_TERMS.names()) or 'none'})")
        if not isinstance(section, dict):
            raise ConfigError(f"{where}.{name}: expected a mapping of options, got {section!r}")
        own: dict[str, Any] = {}
        if "weight" in section:
            try:
                own["weight"] = float(section["weight"])
            except (TypeError, ValueError, OverflowError):  # OverflowError: float(10**400)
                raise ConfigError(f"{where}.{name}.weight: expected a number, got {section['weight']!r}") from None
        if section.get("optim") is not None:
            optim = section["optim"]
            if not isinstance(optim, dict):
                raise ConfigError(f"{where}.{name}.optim: expected a mapping of optimizer options, got {optim!r}")
            validate_section(OptimConfig, {**OptimConfig().model_dump(), **optim}, f"{where}.{name}.optim")
            own["optim"] = dict(optim)
        checked = OBJECTIVE_TERMS.validate({"name": name, **term_options(section)}, f"{where}.{name}",
                                           also=TERM_OWN_KEYS)
        checked.pop("name")
        if isinstance(checked.get("loss"), dict) and "name" in checked["loss"]:
            # a term's ranking loss (level_ranking) is a LOSSES component: checked now, not when training starts
            from vsekit.losses import LOSSES

            checked["loss"] = LOSSES.validate(checked["loss"], f"{where}.{name}.loss")
        out[name] = {**checked, **own}
    return out


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
    data = data_config(raw.pop("data", None) or {}, f"{prefix}data")
    _validate_components(raw, prefix)
    try:
        cfg = RunConfig.model_validate({**raw, "data": data})
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
    if recipe is None:
        data: dict = {}
    elif isinstance(recipe, RunConfig):
        data = recipe.to_dict()
    elif isinstance(recipe, dict):
        data = copy.deepcopy(recipe)
    else:
        data = load_recipe(recipe)
    cfg = validate_config(apply_overrides(data, list(overrides)))
    if "${name}" in cfg.output_dir:
        cfg.output_dir = cfg.output_dir.replace("${name}", cfg.name)
    return cfg
