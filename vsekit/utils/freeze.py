"""Freezing parts of a model by parameter / module name prefix: the one mechanism behind ``train.freeze``,
``model.*_encoder.finetune`` and training stages."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from torch import nn


def matches(name: str, prefixes: Iterable[str]) -> bool:
    """True when ``name`` is one of ``prefixes`` or lies under one (``a.b`` is under ``a``, not under ``a.``)."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


class Freezer:
    """Freezes parameters and modules by name prefix, and undoes exactly what it froze.

    A frozen parameter gets ``requires_grad=False`` (so an optimizer that holds it skips it: no update, no
    weight decay, no momentum, and autograd records nothing through it); a frozen module is put back in eval
    mode by :meth:`hold_eval` after every ``train()``, so its batch-norm statistics do not move and its
    dropout is off.
    """

    def __init__(self) -> None:
        self.prefixes: list[str] = []
        self._params: list[nn.Parameter] = []
        self._modules: list[nn.Module] = []

    def release(self) -> None:
        for p in self._params:
            p.requires_grad_(True)
        self.prefixes, self._params, self._modules = [], [], []

    def freeze(self, prefixes: Iterable[str], named_parameters: Iterator[tuple[str, nn.Parameter]],
               named_modules: Iterator[tuple[str, nn.Module]], what: str = "train.freeze") -> None:
        """Freeze everything under ``prefixes`` (replacing what was frozen before); a prefix that names
        nothing is an error (``what`` says which option gave it)."""
        from vsekit.errors import ConfigError

        self.release()
        prefixes = [str(p) for p in prefixes or []]
        if not prefixes:
            return
        params = list(named_parameters)
        modules = list(named_modules)
        unknown = [p for p in prefixes if not any(matches(n, [p]) for n, _ in params)
                   and not any(matches(n, [p]) for n, _ in modules)]
        if unknown:
            raise ConfigError(f"{what} names nothing in the model: {unknown}")
        self.prefixes = prefixes
        for name, p in params:
            if matches(name, prefixes) and p.requires_grad:
                p.requires_grad_(False)
                self._params.append(p)
        self._modules = [m for name, m in modules if name and matches(name, prefixes)]

    def hold_eval(self) -> None:
        for m in self._modules:
            m.eval()
