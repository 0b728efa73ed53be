"""Name -> factory registries, so that methods plug in through configs (cf. timm's ``register_model``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class Registry:
    """A named table of factories.

    >>> LOSSES = Registry("loss")
    >>> @LOSSES.register("hinge")
    ... def make_hinge(**kw): ...
    >>> LOSSES.build({"name": "hinge", "margin": 0.2})  # doctest: +SKIP
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._table: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._table:
                raise KeyError(f"{self.kind} {name!r} is registered twice")
            self._table[name] = fn
            return fn

        return deco

    def get(self, name: str) -> Callable[..., Any]:
        try:
            return self._table[name]
        except KeyError:
            known = ", ".join(sorted(self._table)) or "(none)"
            raise KeyError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def build(self, spec: dict[str, Any] | str, **extra: Any) -> Any:
        """Build from ``{"name": ..., **kwargs}`` (or just a name); ``extra`` kwargs are passed through."""
        if isinstance(spec, str):
            spec = {"name": spec}
        spec = dict(spec)
        if "name" not in spec:
            raise KeyError(f"{self.kind} spec needs a 'name' field, got keys {sorted(spec)}")
        name = spec.pop("name")
        factory = self.get(name)
        try:
            return factory(**spec, **extra)
        except TypeError as e:
            raise TypeError(f"bad options for {self.kind} {name!r}: {e}") from None

    def names(self) -> list[str]:
        return sorted(self._table)

    def __contains__(self, name: str) -> bool:
        return name in self._table
