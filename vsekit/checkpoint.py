"""Checkpoints: plain dicts with a format version, written atomically.

A checkpoint holds the model, the optimizer, the LR scheduler, the RNG states, the epoch/step counters,
the vocabulary and the resolved config, so that a run can be resumed exactly and a model can be used for
search without the training code.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from vsekit.errors import VsekitError
from vsekit.utils.io import atomic_write

CHECKPOINT_FORMAT = "vsekit-checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(VsekitError, ValueError):
    pass


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    state = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}
    return atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():  # a run folder: take its best checkpoint, else its last
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                path = path / name
                break
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a vsekit checkpoint")
    if state.get("version", 0) > CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {state['version']} is newer than this vsekit "
                              f"understands ({CHECKPOINT_VERSION}); upgrade vsekit")
    state["path"] = str(path)
    return state


def model_fingerprint(model_state: dict[str, torch.Tensor]) -> str:
    """A short hash of the model weights: identifies which model produced an embedding collection."""
    h = hashlib.sha256()
    for k in sorted(model_state):
        t = model_state[k]
        h.update(k.encode())
        if isinstance(t, torch.Tensor):
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                     if t.numel() else b"")
    return h.hexdigest()[:16]
