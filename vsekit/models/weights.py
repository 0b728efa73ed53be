"""Weights a user brings: read from a local file without running code.

A ``.safetensors`` file is read with safetensors; anything else with ``torch.load(weights_only=True)``,
whose unpickler builds tensors and plain containers only. A state dict wrapped in a training checkpoint
(``{"state_dict": ...}``, ``{"model": ...}``) or saved from ``DataParallel`` (``module.`` prefixes) is
unwrapped. Every problem is one line naming the file and the config key that gave it.

A file named by the user is never downloaded. Only ``pretrained: true`` (torchvision's ImageNet weights of the
``cnn`` backbones, timm's of a timm model without ``weights``) and open_clip's pretrained tags (``weights:
openai``) use the library's own download into its own cache, as that library's users expect, when the file is not there yet and :func:`downloads_allowed`
(``VSEKIT_OFFLINE`` unset; the tests set it). A failed download is the same one-line error as a missing file.

While a checkpoint is being rebuilt (:func:`restoring_weights`), encoders skip their initial weights files:
the checkpoint's own weights replace them next, so a fine-tuned model opens on a machine that does not hold
the weights it was started from.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from vsekit.errors import VsekitError, first_line

log = logging.getLogger("vsekit.models")


class PretrainedWeightsMissing(VsekitError, FileNotFoundError):
    """Pretrained weights were asked for but are not on this machine, and could not (or may not) be fetched."""


OFFLINE_ENV = "VSEKIT_OFFLINE"


def downloads_allowed() -> bool:
    """False when ``$VSEKIT_OFFLINE`` is 1/true/yes/on: pretrained weights then come from the caches only."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() not in ("1", "true", "yes", "on")


T = TypeVar("T")


def library_download(fetch: Callable[[], T], *, announce: str, offline: str, failed: Callable[[str], str],
                     catch: tuple[type[BaseException], ...] = (Exception,)) -> T:
    """A library's own download of its pretrained weights into its own cache (torchvision, timm, open_clip):
    refused with the message ``offline`` while :func:`downloads_allowed` says no, announced in the log, and any
    failure of ``fetch`` among ``catch`` (no network, a proxy, a bad hash, a full disk: all the same to the user)
    turned into one :class:`PretrainedWeightsMissing` line, ``failed("Type: first line of the error")``."""
    if not downloads_allowed():
        raise PretrainedWeightsMissing(offline)
    log.info("%s", announce)
    try:
        return fetch()
    except catch as e:
        raise PretrainedWeightsMissing(failed(f"{type(e).__name__}: {first_line(e, default='')}")) from None


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
        first = first_line(e, limit=None)
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
              ignore: Iterable[str] = (), by_position: bool = False, head_features: int | None = None) -> None:
    """Load ``state`` into ``module`` exactly (every parameter and buffer, no extra key), except the keys
    under the prefixes ``ignore`` that the module does not have (a classifier head it was built without).

    ``by_position``: when the names do not fit, a file whose tensors have, in the file's order, exactly the
    shapes of the module's is loaded tensor by tensor in that order (see :func:`positional_state`: weights
    converted from another implementation of the same network, whose names differ). ``head_features``: the
    width of the pooled features of a module built without its classifier; a linear classifier at the end of
    the file (a ``(K, head_features)`` weight and its ``(K,)`` bias) is then dropped."""
    own = module.state_dict()
    ignore = tuple(ignore)
    state = {k: v for k, v in state.items()
             if k in own or not any(k == p or k.startswith(p + ".") for p in ignore)}
    missing, unexpected = own.keys() - state.keys(), state.keys() - own.keys()
    if missing or unexpected:
        n = 1 if by_position else 4  # a failed position load names its own first mismatch: keep this short
        parts = [f"missing {_show(missing, n)}" if missing else "",
                 f"unexpected {_show(unexpected, n)}" if unexpected else ""]
        names = f"{path} does not fit the model ({'; '.join(p for p in parts if p)})"
        if not by_position:
            raise WeightsFileError(f"{where}: {names}: weights of another architecture?")
        state, note = positional_state(own, state, where, path, head_features, names)
        log.warning("%s: %s: parameter names differ from the model's; loaded by position (%d tensors, same order "
                    "and shapes%s)", where, path, sum(1 for k in state if not _counter(k)), note)
        module.load_state_dict(state, strict=True)
        return
    bad = [k for k, v in state.items() if v.shape != own[k].shape]
    if bad:
        k = bad[0]
        raise WeightsFileError(f"{where}: {path}: {k} has shape {tuple(state[k].shape)}, the model's is "
                               f"{tuple(own[k].shape)} ({len(bad)} tensors differ)")
    module.load_state_dict(state, strict=True)


def _counter(name: str) -> bool:
    """Batch norm's step counter: not a weight, and absent from many converted files."""
    return name.endswith("num_batches_tracked")


def positional_state(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], where: str, path: str | Path,
                     head_features: int | None = None, names: str = "") -> tuple[dict[str, torch.Tensor], str]:
    """``state`` re-keyed with ``own``'s names by position: the i-th tensor of the file becomes the module's
    i-th. Only when the ordered list of shapes matches exactly (batch norm step counters aside, taken from the
    file where both have them, else kept); otherwise an error naming the file and the first position where
    the shapes part. Two tensors of one shape swapped cannot be told apart: this is for weights converted
    from another implementation of the same network, whose file keeps the network's order. Returns the
    re-keyed state and a note naming the classifier dropped, if any."""
    theirs = [(k, v) for k, v in state.items() if not _counter(k)]
    mine = [(k, v) for k, v in own.items() if not _counter(k)]
    dropped = ""
    if head_features is not None and len(theirs) > len(mine):
        tail = theirs[len(mine):]
        shapes = [tuple(v.shape) for _, v in tail]
        if (len(shapes) in (1, 2) and len(shapes[0]) == 2 and shapes[0][1] == head_features
                and (len(shapes) == 1 or shapes[1] == (shapes[0][0],))):
            theirs, dropped = theirs[:len(mine)], f"; classifier {', '.join(k for k, _ in tail)} dropped"
    prefix = f"{where}: {names}, and it cannot be loaded by position either: " if names else f"{where}: {path}: "
    for i, ((k, v), (m, w)) in enumerate(zip(theirs, mine)):
        if v.shape != w.shape:
            raise WeightsFileError(f"{prefix}tensor {i} of the file ({k}, shape {tuple(v.shape)}) does not have "
                                   f"the shape of the model's tensor {i} ({m}, {tuple(w.shape)})")
    if len(theirs) != len(mine):
        first = (f"the file's extra {theirs[len(mine)][0]}" if len(theirs) > len(mine)
                 else f"the model's {mine[len(theirs)][0]} has no tensor in the file")
        raise WeightsFileError(f"{prefix}the file has {len(theirs)} tensors, the model {len(mine)} (first "
                               f"unmatched at position {min(len(theirs), len(mine))}: {first})")
    out = {m: v for (_, v), (m, _) in zip(theirs, mine)}
    their_counters = [v for k, v in state.items() if _counter(k)]
    my_counters = [k for k in own if _counter(k)]
    same = len(their_counters) == len(my_counters) and all(
        v.shape == own[k].shape for v, k in zip(their_counters, my_counters))
    for i, k in enumerate(my_counters):
        out[k] = their_counters[i] if same else own[k]
    return out, dropped
