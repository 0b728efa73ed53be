"""Recipes: YAML files with optional ``_base_`` inheritance, and ``key.sub=value`` command-line overrides.

These work on plain dicts; :func:`vsekit.config.resolve.validate_config` then checks the result against
the typed schema (a typo anywhere is an error naming the key).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from vsekit.config.schema import RunConfig
from vsekit.errors import ConfigError
from vsekit.registry import Component, component_of, model_of


def _child(node: Any, part: str, section: Any) -> Any:
    """The schema of ``section[part]``, ``node`` being the schema of ``section``: a pydantic model class, a
    :class:`Component` (its ``default`` filled in), or None where the schema says nothing (an untyped mapping)."""
    if isinstance(node, Component):
        if node.keyed:
            return node.registry.options_model(part) if part in node.registry else None
        name = node.entry or (section.get(node.key, node.default) if isinstance(section, dict) else None)
        if node.check is not None or not isinstance(name, str) or name not in node.registry:
            return None
        node = node.registry.options_model(name)
    info = getattr(node, "model_fields", {}).get(part)
    if info is None:
        return None
    comp = component_of(info)
    return replace(comp, default=comp.default_name(info.get_default(call_default_factory=True))) if comp else \
        model_of(info.annotation)


def _switched(old: Any, new: Any, node: Any) -> dict | None:
    """When ``new``, a component section (``node``), names another component than ``old``: what of ``old`` to
    keep (the owner's keys, e.g. the data options every format shares); None when nothing switches."""
    if not (isinstance(node, Component) and isinstance(old, dict) and isinstance(new, dict)) or node.keyed:
        return None
    if node.key in new and old.get(node.key, node.default) != new[node.key]:
        return {k: v for k, v in old.items() if k in node.own}
    return None


def deep_merge(base: dict, update: dict, _node: Any = RunConfig) -> dict:
    """A copy of ``base`` with ``update`` merged in (dicts merge recursively, everything else replaces).

    A component section (:class:`~vsekit.registry.Component` in the schema, at any depth: also an objective
    term's ``loss``) that switches component (``loss: {name: lseh}`` over ``{name: hinge, margin: 0.2}``)
    replaces the old one's options instead of merging with them; a ``data`` section that switches ``format``
    keeps only the options every data source shares (splits, image checks, ...). Other sections with a
    ``name`` (``optim.name``) merge like any other.
    """
    out = copy.deepcopy(base)
    section = {**base, **update}
    for k, v in update.items():
        node = _child(_node, k, section)
        kept = _switched(out.get(k), v, node)
        if kept is not None:
            out[k] = deep_merge(kept, v, node)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v, node)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict | None):
        raise ConfigError(f"{path}: a recipe must be a mapping at the top level")
    return data or {}


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


def apply_overrides(cfg: dict, overrides: Iterable[str]) -> dict:
    """Apply ``key.sub=value`` strings; values are parsed as YAML (``true``, ``1e-3``, ``[1, 2]``, ``null``).

    Setting ``name`` of a component section (``loss.name=lseh``) drops the old component's options;
    setting ``data.format`` keeps only the options every data source shares. Whether a key exists is
    checked afterwards, by the schema.
    """
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if key.startswith("+"):
            raise ConfigError(f"override {item!r}: write it without the '+' ({item.strip().lstrip('+')!r})")
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node: Any = cfg
        schema: Any = RunConfig  # the schema of node
        parts = _key_parts(key, item)
        for depth, part in enumerate(parts[:-1]):
            where = ".".join(parts[: depth + 1])
            schema = _child(schema, part, node)
            if isinstance(node, list):
                node = _list_item(node, part, where, item)
                continue
            if not isinstance(node.get(part), (dict, list)):
                if part in node and node[part] is not None:
                    raise ConfigError(f"override {item!r}: {where} is a value ({node[part]!r}), not a section")
                node[part] = {}
            node = node[part]
        last = parts[-1]
        if isinstance(node, list):
            node[_index(node, last, ".".join(parts), item)] = value
            continue
        kept = _switched(node, {last: value}, schema)
        if kept is not None:
            node.clear()
            node.update(kept)
        node[last] = value
    return cfg


def _key_parts(key: str, item: str) -> list[str]:
    """``train.stages[1].epochs`` or ``train.stages.1.epochs`` -> ``["train", "stages", "1", "epochs"]``."""
    parts = re.sub(r"\[(\d+)\]", r".\1", key).split(".")
    if any(not p or "[" in p or "]" in p for p in parts):
        raise ConfigError(f"override {item!r}: bad key {key!r} (use key.sub=value, list items as key[0])")
    return parts


def _index(items: list, part: str, where: str, item: str) -> int:
    if not part.isdigit():
        raise ConfigError(f"override {item!r}: {where.rsplit('.', 1)[0]} is a list; give an item number, "
                          f"e.g. {where.rsplit('.', 1)[0]}[0]")
    i = int(part)
    if i >= len(items):
        raise ConfigError(f"override {item!r}: {where.rsplit('.', 1)[0]} has {len(items)} items, no item {i}")
    return i


def _list_item(items: list, part: str, where: str, item: str) -> Any:
    value = items[_index(items, part, where, item)]
    if not isinstance(value, dict):
        raise ConfigError(f"override {item!r}: {where} is a value ({value!r}), not a section")
    return value


def dump_config(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)
