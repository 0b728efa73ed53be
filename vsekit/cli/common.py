"""What the verbs share: recipe names, ``--data`` arguments, argument types."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from vsekit.errors import ConfigError

RECIPES = Path(__file__).resolve().parent.parent / "configs"
_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)


def recipe_path(name: str) -> Path:
    """A recipe file path, or the name of a recipe shipped with vsekit (``vsepp_f30k_precomp``)."""
    p = Path(name)
    if p.is_file():
        return p
    shipped = RECIPES / (name if name.endswith(".yaml") else f"{name}.yaml")
    if shipped.is_file():
        return shipped
    known = ", ".join(sorted(f.stem for f in RECIPES.glob("*.yaml")))
    raise ConfigError(f"no recipe {name!r} (not a file, not a shipped recipe; shipped: {known})")


def data_from_arg(arg: str | None, image_root: str | None, base: Any) -> Any:
    """The data spec a ``--data`` argument names (``demo``, a dataset_*.json, a precomp folder, a pairs file,
    a folder of images), sharing the options of ``base`` (the checkpoint's own data section); without
    ``--data``, ``base`` itself (with ``--image-root`` applied)."""
    from vsekit.data.sources import data_config, sniff_source

    if arg is None:
        if image_root and "image_root" in type(base).model_fields:
            return data_config({**base.model_dump(), "image_root": image_root})
        return base
    return sniff_source(arg, image_root, base)


def data_spec(arg: str, image_root: str | None = None) -> Any:
    """``--data`` of the verbs that write data (``features extract``, ``shards``): anything ``--data``
    recognises, or a YAML file: a data section (``{format: demo, num_images: 500}``) or a recipe (its data)."""
    from vsekit.data.sources import data_config, sniff_source

    if arg.endswith((".yaml", ".yml")):
        from vsekit.config import load_recipe, resolve_config

        raw = load_recipe(arg)
        spec = data_config(raw, "data") if "format" in raw and "data" not in raw else resolve_config(arg).data
        if image_root and "image_root" in type(spec).model_fields:
            spec = data_config({**spec.model_dump(), "image_root": image_root})
        return spec
    return sniff_source(arg, image_root)


def parse_size(text: str) -> int:
    """``10485760``, ``512K``, ``10M``, ``1GiB`` -> bytes (K/M/G are powers of 1024)."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 10M, 512K, 1048576)")
    unit = (m.group(2) or "b")[0].lower()
    return int(m.group(1)) * {"b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[unit]


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def add_allow_legacy_checkpoint(p: argparse.ArgumentParser) -> None:
    """``--allow-legacy-checkpoint`` (-> ``args.allow_legacy_checkpoint``), for every verb that opens one."""
    p.add_argument("--allow-legacy-checkpoint", action="store_true",
                   help="also open a checkpoint that holds pickled Python objects (written by vsekit 0.1): "
                        "loading it can run code, so only for a file you trust")
