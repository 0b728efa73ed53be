"""Recipes: YAML files with optional ``_base_`` inheritance, and ``key.sub=value`` command-line overrides.

These work on plain dicts; :func:`vsekit.config.resolve.validate_config` then checks the result against
the typed schema (a typo anywhere is an error naming the key).
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from vsekit.errors import ConfigError

# Sections that name a registered component by `name`: switching to another component drops the old one's
# options (objective.mined keeps the objective's own keys). A section that leaves `name` out uses the default.
_COMPONENT_KEY = "name"
_COMPONENTS = {"loss": (), "model.image_encoder": (), "model.text_encoder": (), "model.similarity": (),
               "objective.mined": ("weight", "pool_size"), "objective.embedding.loss": ()}
# the loss of an objective term (objective.terms.<term>.loss) is a component too; the schema has no default for
# it, so only a section that names its loss switches
_TERM_LOSS = re.compile(r"objective\.terms\.[^.]+\.loss")
# the data section names its source by `format`; switching keeps the options every source shares
_SOURCE_KEY = "format"
_SOURCE = "data"


def _common_data_keys() -> set[str]:
    from vsekit.data.sources import common_keys

    return common_keys()


def _default_format() -> str:
    from vsekit.data.sources import DataConfig

    return DataConfig.model_fields["format"].default


@functools.cache
def _default_name(path: str) -> str:
    """The component a section names when it leaves ``name`` out (the schema's default; computed once)."""
    from vsekit.config.schema import RunConfig

    node: Any = RunConfig().to_dict()
    for part in path.split("."):
        node = node[part]
    return node["name"] if isinstance(node, dict) else node  # model.similarity's default is a bare name


def _switched(old: Any, new: Any, path: str) -> dict | None:
    """When ``new`` (the section at ``path``) names another component or data source than ``old``: what of
    ``old`` to keep; None when nothing switches."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return None
    kept = _COMPONENTS.get(path, () if _TERM_LOSS.fullmatch(path) else None)
    if kept is not None and _COMPONENT_KEY in new:
        # a section without a name uses the schema's default; a term's loss has none, so it merges then
        default = _default_name(path) if path in _COMPONENTS else new[_COMPONENT_KEY]
        if old.get(_COMPONENT_KEY, default) != new[_COMPONENT_KEY]:
            return {k: v for k, v in old.items() if k in kept}
        return None
    if path == _SOURCE and _SOURCE_KEY in new and old.get(_SOURCE_KEY, _default_format()) != new[_SOURCE_KEY]:
        keep = _common_data_keys()
        return {k: v for k, v in old.items() if k in keep}
    return None


def deep_merge(base: dict, update: dict, _path: str = "") -> dict:
    """A copy of ``base`` with ``update`` merged in (dicts merge recursively, everything else replaces).

    A component section (also an objective term's ``loss``) that switches component (``loss: {name: lseh}``
    over ``{name: hinge, margin: 0.2}``) replaces the old one's options instead of merging with them; a
    ``data`` section that switches ``format`` keeps only the options every data source shares (splits, image
    checks, ...). Other sections with a
    ``name`` (``optim.name``) merge like any other.
    """
    out = copy.deepcopy(base)
    for k, v in update.items():
        path = f"{_path}.{k}" if _path else k
        kept = _switched(out.get(k), v, path)
        if kept is not None:
            out[k] = deep_merge(kept, v, path)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v, path)
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
        parts = _key_parts(key, item)
        for depth, part in enumerate(parts[:-1]):
            where = ".".join(parts[: depth + 1])
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
        path = ".".join(parts[:-1])
        if last in (_COMPONENT_KEY, _SOURCE_KEY) and path:
            kept = _switched(node, {last: value}, path)
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
