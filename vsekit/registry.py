"""Name -> factory registries, so that methods plug in through configs (cf. timm's ``register_model``).

A registry also knows which options each of its components takes: :meth:`Registry.validate` checks a
config section (``{"name": ..., **options}``) against the factory's signature and type hints, so that a
typo or a wrong type is a :class:`~vsekit.errors.ConfigError` naming the key, and the defaults stay where
they are written once (the factory's signature).
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ConfigDict, ValidationError, create_model

from vsekit.errors import ConfigError, VsekitError, did_you_mean


class Registry:
    """A named table of factories.

    >>> LOSSES = Registry("loss")
    >>> @LOSSES.register("hinge")
    ... def make_hinge(**kw): ...
    >>> LOSSES.build({"name": "hinge", "margin": 0.2})  # doctest: +SKIP

    ``injected`` names the factory arguments that the builder supplies (``embed_size``, ``vocab_size``):
    a config may not set them.
    """

    def __init__(self, kind: str, injected: Iterable[str] = ()) -> None:
        self.kind = kind
        self.injected = frozenset(injected)
        self._table: dict[str, Callable[..., Any]] = {}
        self._options: dict[str, Any] = {}

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
            raise KeyError(f"unknown {self.kind} {name!r}{did_you_mean(name, self._table)} (known: {known})") from None

    def build(self, spec: dict[str, Any] | str, **extra: Any) -> Any:
        """Build from ``{"name": ..., **kwargs}`` (or just a name); ``extra`` kwargs are passed through."""
        spec = {"name": spec} if isinstance(spec, str) else dict(spec)
        if "name" not in spec:
            raise ConfigError(f"{self.kind} spec needs a 'name' field, got keys {sorted(spec)}")
        name = spec.pop("name")
        factory = self.get(name)
        try:
            return factory(**spec, **extra)
        except VsekitError:
            raise
        except (TypeError, ValueError) as e:  # a constructor refusing its options: a config mistake
            raise ConfigError(f"bad options for {self.kind} {name!r}: {e}") from None

    def names(self) -> list[str]:
        return sorted(self._table)

    def __contains__(self, name: str) -> bool:
        return name in self._table

    # -- options ------------------------------------------------------------------------------------------
    def options_model(self, name: str):
        """A pydantic model of the options of component ``name``, made from its factory's signature."""
        if name not in self._options:
            self._options[name] = _options_model(f"{self.kind} {name}", self.get(name), self.injected)
        return self._options[name]

    def validate(self, spec: Any, where: str, also: Iterable[str] = ()) -> dict[str, Any]:
        """Check a config section for this registry: the name exists, every option is one the component
        takes, with a value of the right type. Returns the section as given (validated values), so the
        component's own defaults apply to what it leaves out. ``also``: keys the caller handles itself (they
        must be removed from ``spec``), offered as suggestions for a typo."""
        if isinstance(spec, str):
            spec = {"name": spec}
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: expected a mapping with a 'name', got {spec!r}")
        name = spec.get("name")
        if name is None:
            raise ConfigError(f"{where}.name: missing; choose one of {', '.join(self.names())}")
        if name not in self._table:
            raise ConfigError(f"{where}.name: unknown {self.kind} {name!r}{did_you_mean(name, self._table)} "
                              f"(known: {', '.join(self.names())})")
        options = {k: v for k, v in spec.items() if k != "name"}
        model = self.options_model(name)
        try:
            checked = model.model_validate(options)
        except ValidationError as e:
            raise config_error_from(e, where, model, also=also) from None
        out = {"name": name, **checked.model_dump(exclude_unset=True)}
        check_components(model, out, where)
        return out


@dataclass(frozen=True, eq=False)
class Component:
    """Marks a config field as a component section (``loss: Annotated[dict, Component(LOSSES)]``): a mapping that
    names a registered component by ``key`` and holds its options. Validation (:func:`check_components`, also of
    the components in a component's options) and recipe merging (a new ``name`` drops the old options) find
    these fields by walking the schema, so a component section is declared once: by its field.

    ``default``: the name of a section that leaves ``key`` out (else the field default's); ``own``: the owner's
    keys (a term's ``weight``), each with its check or None, kept when the component switches; ``keyed``: the
    mapping's keys name the components (``objective.terms``); ``entry``: the one registry entry checked (its one
    valid name: ``default``); ``check``: a validator replacing the registry's.
    """

    registry: Registry
    default: str | None = None
    own: Mapping[str, Callable[[Any, str], Any] | None] = field(default_factory=dict)
    keyed: bool = False
    entry: str | None = None
    kind: str | None = None
    key: str = "name"
    check: Callable[[Any, str], Any] | None = None

    def default_name(self, field_default: Any) -> str | None:
        """The name of a section that leaves ``key`` out, ``field_default`` being the field's default."""
        section = field_default.model_dump() if hasattr(field_default, "model_dump") else field_default
        return self.default or (section.get(self.key) if isinstance(section, dict) else section)

    def validate(self, spec: Any, where: str, default: str | None = None) -> Any:
        """The section ``spec`` at dotted key ``where``, checked; a :class:`ConfigError` names a bad key."""
        if self.check is not None:
            return self.check(spec, where)
        if not self.keyed:
            if isinstance(spec, dict) and self.key not in spec and default is not None:
                spec = {self.key: default, **spec}
            return self._one(spec, where, default)
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: expected a mapping of {self.registry.kind} name -> options, got {spec!r}")
        for name, section in spec.items():
            if name not in self.registry:
                known = self.registry.names()
                raise ConfigError(f"{where}.{name}: unknown key: not a registered {self.registry.kind}"
                                  f"{did_you_mean(name, known)} (known: {', '.join(known)})")
            if section is not None and not isinstance(section, dict):
                raise ConfigError(f"{where}.{name}: expected a mapping of options, got {section!r}")
        return {name: {k: v for k, v in self._one({**(section or {}), self.key: name}, f"{where}.{name}").items()
                       if k != self.key} for name, section in spec.items()}

    def _one(self, spec: Any, where: str, default: str | None = None) -> dict[str, Any]:
        if not isinstance(spec, dict):
            spec = {self.key: spec}
        own = {k: check(spec[k], f"{where}.{k}") for k, check in self.own.items() if k in spec and check}
        name = spec.get(self.key)
        spec = {k: v for k, v in spec.items() if k not in self.own}
        if self.entry is not None:
            if name != default:
                raise ConfigError(f"{where}.{self.key}: unknown {self.kind} {name!r} (known: {default})")
            spec[self.key] = self.entry
        checked = self.registry.validate(spec, where, also=tuple(self.own))
        return {**checked, self.key: name, **{k: v for k, v in own.items() if v is not None}}


def component_of(info: Any) -> Component | None:
    """The :class:`Component` marker of a pydantic field, or None."""
    return next((m for m in info.metadata if isinstance(m, Component)), None)


def check_components(model: Any, raw: dict[str, Any], where: str = "") -> None:
    """Check, in place, every component section of ``raw`` (a plain dict of pydantic model class ``model``) at
    any depth, each by its :class:`Component`; a section set to None is the field's default."""
    for name, info in model.model_fields.items():
        if name not in raw:
            continue
        key = f"{where}.{name}" if where else name
        comp = component_of(info)
        if comp is not None:
            default = info.get_default(call_default_factory=True)
            value = default if raw[name] is None else raw[name]
            if value is not None:
                raw[name] = comp.validate(value, key, comp.default_name(default))
        elif isinstance(raw[name], dict) and (sub := model_of(info.annotation)) is not None:
            check_components(sub, raw[name], key)


def _options_model(title: str, factory: Callable[..., Any], injected: frozenset[str]):
    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        hints = typing.get_type_hints(target, include_extras=True)  # extras: Component markers
    except Exception:  # noqa: BLE001 - unresolvable annotations: accept any value for those options
        hints = {}
    fields: dict[str, Any] = {}
    for p in inspect.signature(factory).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in injected or p.name == "self":
            continue
        default = ... if p.default is inspect.Parameter.empty else p.default
        # unannotated: the type of a plain default, else anything
        plain = type(default) if isinstance(default, (bool, int, float, str)) else Any
        fields[p.name] = (hints.get(p.name, plain), default)
    # allow_inf_nan=False: a float option (a margin, a temperature) must be finite, as in the typed sections
    return create_model(title.replace(" ", "_"), __config__=ConfigDict(extra="forbid", arbitrary_types_allowed=True,
                                                                      strict=False, allow_inf_nan=False), **fields)


def validate_section(model: Any, value: Any, where: str) -> Any:
    """``model.model_validate(value)`` (a pydantic model class), with any problem a one-line
    :class:`ConfigError` naming the dotted key under ``where``."""
    try:
        return model.model_validate(value)
    except ValidationError as e:
        raise config_error_from(e, where, model) from None


def config_error_from(err: Any, where: str, model: Any = None, also: Iterable[str] = ()) -> ConfigError:
    """One-line :class:`ConfigError` from a pydantic ``ValidationError``: the first problem, with its dotted
    key under ``where`` and, for an unknown key, the nearest valid one."""
    problems = []
    # a misspelt key usually also leaves a required one missing: report the typo first
    for e in sorted(err.errors(), key=lambda e: e.get("type") != "extra_forbidden"):
        raw_loc = list(e.get("loc", ()))
        loc = [str(p) for p in raw_loc]
        key = where
        for p in raw_loc:
            key += f"[{p}]" if isinstance(p, int) else (f".{p}" if key else str(p))
        if e.get("type") == "extra_forbidden":
            valid = _field_names(model, [str(p) for p in raw_loc[:-1] if not isinstance(p, int)])
            if len(raw_loc) == 1:
                valid = sorted({*valid, *also, "name"} if also else valid)
            parent = key[: -len(loc[-1])]
            hint = did_you_mean(loc[-1], valid) if valid else ""
            if hint:
                hint = f"; did you mean {parent}{hint[len('; did you mean '):].strip(chr(39) + '?')}?"
            elif valid:
                hint = f" (valid keys: {', '.join(valid)})"
            problems.append(f"{key}: unknown key{hint}")
        elif e.get("type") == "missing":
            problems.append(f"{key}: required, but missing")
        else:
            got = f" (got {short_repr(e['input'])})" if "input" in e else ""
            problems.append(f"{key}: {e.get('msg', 'invalid value')}{got}")
    n = len(problems) - 1
    more = f" (and {n} more problem{'s' if n > 1 else ''})" if n else ""
    return ConfigError(problems[0] + more if problems else f"{where}: invalid")


def short_repr(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for messages that quote a value the user gave."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _field_names(model: Any, path: list[str]) -> list[str]:
    """The field names of the (nested) pydantic model at ``path`` under ``model``."""
    node = model
    for part in path:
        field = getattr(node, "model_fields", {}).get(part)
        node = model_of(field.annotation) if field is not None else None
    return sorted(getattr(node, "model_fields", ()))


def model_of(annotation: Any) -> Any:
    """The pydantic model class in a field's type (``X``, ``X | None``, ``list[X]``), or None."""
    if hasattr(annotation, "model_fields"):
        return annotation
    for arg in typing.get_args(annotation):
        found = model_of(arg)
        if found is not None:
            return found
    return None
