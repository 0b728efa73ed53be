"""The tiny run config that the trainer tests build (:func:`tiny_config`)."""

from __future__ import annotations

from vsekit.config import RunConfig, resolve_config

# What every tiny run shares: the default data set (the synthetic demo set, ``data.format=demo``), a vocabulary
# of every word (a few dozen captions), no progress bar in the test log.
TINY = ("text.min_count=1", "train.progress=false")


def tiny_config(out, *overrides: str) -> RunConfig:
    """The default config with :data:`TINY`, written to ``out``; each test passes exactly the keys it changes
    (its size, model, loss, seed), so what it trains reads at the call."""
    return resolve_config(None, [f"output_dir={out}", *TINY, *overrides])
