"""Optional dependencies: imported where they are used, with a one-line error that says how to install them."""

from __future__ import annotations

import importlib
from types import ModuleType

from vsekit.errors import VsekitError


class MissingDependency(VsekitError, ImportError):
    """A feature needs a package that is not installed; the message names the package and the extra."""


def import_optional(module: str, extra: str, purpose: str) -> ModuleType:
    """``import module``, or a :class:`MissingDependency` naming ``purpose`` and ``pip install 'vsekit[extra]'``."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependency(f"{purpose} needs the Python package {module!r}, which is not installed "
                                f"({e}); install it with: pip install 'vsekit[{extra}]'") from None
