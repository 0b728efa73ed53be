"""Weights a user brings: read from a local file without running code, and never downloaded.

A ``.safetensors`` file is read with safetensors; anything else with ``torch.load(weights_only=True)``,
whose unpickler builds tensors and plain containers only. A state dict wrapped in a training checkpoint
(``{"state_dict": ...}``, ``{"model": ...}``) or saved from ``DataParallel`` (``module.`` prefixes) is
unwrapped. Every problem is one line naming the file and the config key that gave it.

While a checkpoint is being rebuilt (:func:`restoring_weights`), encoders skip their initial weights files:
the checkpoint's own weights replace them next, so a fine-tuned model opens on a machine that does not hold
the weights it was started from.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from vsekit.errors import VsekitError


class PretrainedWeightsMissing(VsekitError, FileNotFoundError):
    """Pretrained weights were asked for but are not on this machine (vsekit never downloads them)."""


class WeightsFileError(VsekitError, ValueError):
    """A weights file cannot be read, or does not fit the model it is meant for."""


_RESTORING = contextvars.ContextVar("vsekit_restoring_weights", default=False)
_WRAPPERS = ("state_dict", "model", "module", "state_dict_ema", "model_ema")


@contextlib.contextmanager
def restoring_weights() -> Iterator[None]:
    """Inside this block encoders do not read their initial weights files (a checkpoint's weights follow)."""
    token = _RESTORING.set(True)
    try:
        yield
    finally:
        _RESTORING.reset(token)


def initial_weights_wanted() -> bool:
    """False while a checkpoint is rebuilt (:func:`restoring_weights`): its own weights replace the initial ones."""
    return not _RESTORING.get()


def read_state_dict(path: str | Path, where: str) -> dict[str, torch.Tensor]:
    """The tensors of a local weights file; ``where`` is the config key or flag that named it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise PretrainedWeightsMissing(f"{where}: no such file {path} (vsekit reads weights from local files only)")
    from vsekit.utils.archives import check_safetensors_sizes, check_zip_sizes

    try:
        # sizes first, from the file's own directory: a file that would inflate far past its size is refused
        (check_safetensors_sizes if path.suffix == ".safetensors" else check_zip_sizes)(path)
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch and safetensors raise many kinds for a bad file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise WeightsFileError(f"{where}: {path} is not a readable weights file (plain tensors, read without "
                               f"running code): {type(e).__name__}: {first}") from None
    for _ in range(2):  # a training checkpoint around the state dict, possibly twice ({"model": {"state_dict"}})
        if isinstance(state, dict):
            inner = next((state[k] for k in _WRAPPERS if isinstance(state.get(k), dict)), None)
            if inner is not None and not any(isinstance(v, torch.Tensor) for v in state.values()):
                state = inner
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsFileError(f"{where}: {path} holds no state dict (a mapping of parameter names to tensors)")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _show(keys: Iterable[str], n: int = 4) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_into(module: nn.Module, state: dict[str, torch.Tensor], where: str, path: str | Path,
              ignore: Iterable[str] = ()) -> None:
    """Load ``state`` into ``module`` exactly (every parameter and buffer, no extra key), except the keys
    under the prefixes ``ignore`` that the module does not have (a classifier head it was built without)."""
    own = module.state_dict()
    ignore = tuple(ignore)
    state = {k: v for k, v in state.items()
             if k in own or not any(k == p or k.startswith(p + ".") for p in ignore)}
    missing, unexpected = own.keys() - state.keys(), state.keys() - own.keys()
    if missing or unexpected:
        parts = [f"missing {_show(missing)}" if missing else "", f"unexpected {_show(unexpected)}" if unexpected else ""]
        raise WeightsFileError(f"{where}: {path} does not fit the model ({'; '.join(p for p in parts if p)}): "
                               "weights of another architecture?")
    bad = [k for k, v in state.items() if v.shape != own[k].shape]
    if bad:
        k = bad[0]
        raise WeightsFileError(f"{where}: {path}: {k} has shape {tuple(state[k].shape)}, the model's is "
                               f"{tuple(own[k].shape)} ({len(bad)} tensors differ)")
    module.load_state_dict(state, strict=True)
