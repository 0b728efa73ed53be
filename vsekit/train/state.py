"""Seeding and the RNG states that a checkpoint carries, so that a resumed run draws what an uninterrupted
one would.

The states are plain data, as a checkpoint must be (``torch.load(weights_only=True)`` opens it): python's
``random`` state is a tuple of ints, torch's and CUDA's are byte tensors, and numpy's legacy ``MT19937``
state, a tuple holding an ndarray, is stored as a dict of its fields with the key as an int64 tensor.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def numpy_rng_state() -> dict[str, Any]:
    """``np.random.get_state()`` as plain data."""
    name, key, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {"bit_generator": str(name), "key": torch.from_numpy(np.asarray(key).astype(np.int64)),
            "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}


def set_numpy_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`numpy_rng_state`."""
    key = np.asarray(torch.as_tensor(state["key"]).numpy(), dtype=np.int64).astype(np.uint32)
    np.random.set_state((state["bit_generator"], key, int(state["pos"]), int(state["has_gauss"]),
                         float(state["cached_gaussian"])))


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": numpy_rng_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    set_numpy_rng_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
