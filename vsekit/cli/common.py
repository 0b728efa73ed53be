"""What the verbs share: recipe names, ``--data`` arguments, argument types."""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path
from typing import Any

from vsekit.errors import ConfigError

RECIPES = Path(__file__).resolve().parent.parent / "configs"
_SIZE = re.compile(r"^\s*([0-9]+)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)  # [0-9]: \d is any Unicode digit
_WHOLE = re.compile("[0-9]+")
_FLOAT = re.compile(r"-?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")
MAX_CLI_INT = 2**63 - 1  # what torch, NumPy and the data loaders take as an integer
MAX_THREADS = 4096
MAX_SEED = 2**32  # seeds reach NumPy, whose seeds are 32-bit (as the config's seed and random_state)


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


def whole_number(text: str, low: int = 0, high: int = MAX_CLI_INT) -> int:
    """A command-line integer in ``low..high``: ASCII digits 0-9 only (a leading ``-`` for a negative one), so
    that what Python's ``int()`` also reads (``1_0``, ``+5``, Arabic-Indic or full-width digits) is refused,
    as the server refuses it in ``k``, and a number too large for the libraries it reaches is said here."""
    digits = text[1:] if text.startswith("-") else text
    if not _WHOLE.fullmatch(digits):
        raise argparse.ArgumentTypeError(f"not a whole number in ASCII digits 0-9: {text[:40]!r}")
    if len(digits.lstrip("0")) > len(str(MAX_CLI_INT)):  # not converted: a number of a million digits is slow
        raise argparse.ArgumentTypeError(f"must be {low}..{high}, got a number of {len(digits)} digits")
    v = int(text)
    if not low <= v <= high:
        raise argparse.ArgumentTypeError(f"must be {low}..{high}, got {v}" if high < MAX_CLI_INT
                                         else f"must be >= {low}, got {v}")
    return v


def positive_int(text: str) -> int:
    return whole_number(text, 1)


def non_negative_int(text: str) -> int:
    return whole_number(text, 0)


def thread_count(text: str) -> int:
    """A number of threads, 1..:data:`MAX_THREADS` (torch refuses more than a C int with a traceback)."""
    return whole_number(text, 1, MAX_THREADS)


def seed_int(text: str) -> int:
    """A random seed, 0..2**32-1: the seeds NumPy takes (config ``seed`` and ``semantics.random_state`` too)."""
    return whole_number(text, 0, MAX_SEED - 1)


def read_float(text: str) -> float:
    """A command-line number written as ``12``, ``0.5``, ``.5``, ``1e-3`` or ``-2`` in ASCII: not the ``1_0``,
    ``+5``, full-width digits or surrounding spaces that Python's ``float()`` also reads; ``nan``/``inf`` are
    returned as such, for the caller's bounds to refuse."""
    if _FLOAT.fullmatch(text) or text.lower().lstrip("-") in ("nan", "inf", "infinity"):
        return float(text)
    raise argparse.ArgumentTypeError(f"not a number: {text[:40]!r}")


def finite_non_negative(text: str) -> float:
    """A finite number >= 0 (not nan or inf, which would turn every score into nan)."""
    v = read_float(text)
    if not (math.isfinite(v) and v >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text[:40]!r}")
    return v


