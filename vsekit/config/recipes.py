"""Recipes: YAML files with optional ``_base_`` inheritance, plus ``key.sub=value`` command-line overrides.

The resolved config is a plain dict; it is saved next to every run and inside every checkpoint.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

CONFIG_FORMAT = 1

# Every key a recipe may set, with its default. Overriding a key that is not here (or in the recipe) is a
# typo guard error; prefix the key with "+" to add a new one deliberately.
DEFAULTS: dict[str, Any] = {
    "name": "run",
    "seed": 0,
    "device": "auto",
    "output_dir": "runs/${name}",
    "data": {
        "format": "demo",
        "path": None,
        "image_root": None,
        "restval_into_train": False,
        "train_split": "train",
        "val_split": "val",
        "test_split": "test",
        "val_max_images": 1000,
        "image_size": 224,
        "resize": None,
        "resize_policy": "short_side",  # evaluation: short_side (Resize + CenterCrop, VSE++) | square
        # training augmentation (vsekit/data/images.py AUGMENT_DEFAULTS); the defaults are VSE++'s
        "augment": {"crop": "random_resized", "scale": [0.08, 1.0], "ratio": [0.75, 1.3333333333333333],
                    "hflip": True, "color_jitter": 0.0},
        "skip_missing_images": False,
        "check_images": True,
        "num_workers": 0,
        "sample": "caption",
    },
    "text": {"min_count": 4, "max_len": None},
    "model": {
        "embed_size": 1024,
        "similarity": "cosine",
        "use_abs": False,
        "image_encoder": {"name": "precomp"},
        "text_encoder": {"name": "gru", "word_dim": 300, "num_layers": 1, "bidirectional": False},
    },
    "loss": {"name": "hinge", "margin": 0.2, "reduction": "max"},
    # weighted terms of the training objective (vsekit/train/objective.py); the defaults are `loss:` alone
    "objective": {
        "loss_weight": 1.0,
        "instance": {"image_weight": 0.0, "text_weight": 0.0, "dropout": 0.0, "bias": True, "num_classes": None,
                     "init_std": 0.001},
        "mined": {"name": "dualpath_rank", "weight": 0.0, "margin": 1.0, "pool_size": 256},
    },
    "semantics": {"n_components": 400, "n_iter": None, "random_state": 122, "cache_dir": None},
    "optim": {
        "name": "adam",
        "lr": 2e-4,
        "weight_decay": 0.0,
        "grad_clip": 2.0,
        "lr_decay_every": 15,
        "lr_decay_factor": 0.1,
        "lr_milestones": None,
        "lr_mult": {},
    },
    "train": {
        "epochs": 30,
        "batch_size": 128,
        "amp": True,
        "log_every": 10,
        "checkpoint_every_steps": 0,
        "max_steps_per_epoch": None,
        "init_from": None,
        "progress": True,
        "freeze": [],  # parameter/module name prefixes kept frozen (batch norm in eval mode)
        "stages": [],  # consecutive epoch ranges with their own overrides (vsekit/train/stages.py)
        "max_minutes": None,  # wall-clock budget: stop cleanly, save, validate (compare methods at equal time)
        # collapse detection and recovery (vsekit/train/monitor.py)
        "collapse": {"action": "fallback", "patience": 50, "loss_tol": 0.02, "max_mean_cos": 0.98,
                     "lr_factor": 0.1, "fallback_epochs": 1, "max_fallbacks": 3},
    },
    "eval": {"protocol": "full", "chunk_size": 1024, "batch_size": 256},
}


class ConfigError(ValueError):
    pass


def deep_merge(base: dict, update: dict) -> dict:
    """A copy of ``base`` with ``update`` merged in (dicts merge recursively, everything else replaces)."""
    out = copy.deepcopy(base)
    for k, v in update.items():
        if _switches_component(out.get(k), v):
            out[k] = copy.deepcopy(v)  # another registered component: the old one's options do not apply
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _switches_component(old: Any, new: Any) -> bool:
    return (isinstance(old, dict) and isinstance(new, dict) and "name" in old and "name" in new
            and old["name"] != new["name"])


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping at the top level")
    return data


def load_recipe(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """Read a recipe, resolving ``_base_`` (a path, or a list of paths, relative to the recipe)."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: _base_ cycle")
    data = _read_yaml(path)
    bases = data.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    merged: dict = {}
    for b in bases:
        merged = deep_merge(merged, load_recipe(path.parent / b, _seen + (path,)))
    return deep_merge(merged, data)


def _has_key(cfg: dict, dotted: str) -> bool:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def apply_overrides(cfg: dict, overrides: Iterable[str]) -> dict:
    """Apply ``key.sub=value`` strings; values are parsed as YAML (``true``, ``1e-3``, ``[1, 2]``, ``null``)."""
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        add = key.startswith("+")
        key = key.lstrip("+").strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        if not add and not _has_key(cfg, key):
            # a key under a mapping the recipe leaves open (e.g. model.image_encoder.*) may be new
            parent = key.rsplit(".", 1)[0] if "." in key else ""
            if not (parent and _has_key(cfg, parent) and parent.split(".")[-1] in _OPEN_SECTIONS):
                raise ConfigError(f"override {item!r}: no key {key!r} in the config (typo? use +{key}=... to add)")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = cfg
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        if len(parts) > 1 and parts[-1] == "name" and node.get("name") not in (None, value):
            node.clear()  # switching component (e.g. loss.name=lseh): drop the old one's options
        node[parts[-1]] = value
    return cfg


# sections whose keys depend on the registered component chosen, so any key may be set there
_OPEN_SECTIONS = {"image_encoder", "text_encoder", "loss", "lr_mult", "data", "semantics", "instance", "mined"}


def _interpolate(cfg: dict) -> dict:
    out = copy.deepcopy(cfg)
    od = out.get("output_dir")
    if isinstance(od, str):
        out["output_dir"] = od.replace("${name}", str(out.get("name", "run")))
    return out


def resolve_config(recipe: str | Path | dict | None, overrides: Iterable[str] = ()) -> dict:
    """Defaults <- recipe (with its bases) <- overrides, then ``${name}`` interpolation."""
    if recipe is None:
        data: dict = {}
    elif isinstance(recipe, dict):
        data = recipe
    else:
        data = load_recipe(recipe)
    cfg = deep_merge(DEFAULTS, data)
    cfg = apply_overrides(cfg, overrides)
    cfg["config_format"] = CONFIG_FORMAT
    return _interpolate(cfg)


def dump_config(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)
