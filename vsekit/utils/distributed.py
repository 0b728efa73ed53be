"""Data parallelism over ``torch.distributed`` (launched by ``torchrun``): who am I, gather, average.

One process per device. ``torchrun`` sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` (and the rendezvous
variables); :func:`init_from_env` joins the process group they describe -- NCCL on CUDA, gloo on CPU -- and
does nothing in a plain single-process run, where every helper here is the identity.

Training gathers the batch's embeddings from every process (:func:`all_gather_with_grad`: the local shard
keeps its gradient, the others are constants), so that hard negatives are mined over the global batch exactly
as one process holding the whole batch would, and averages the gradients (:func:`average_gradients`).
Encoding for evaluation and indexing is sharded by rows and gathered (:func:`gather_rows`).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place: ``rank`` of ``size`` processes, ``local_rank`` on its machine."""

    size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from None


def world() -> World:
    """The current process group (a single process when none was joined)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_world_size(), dist.get_rank(), _env_int("LOCAL_RANK", 0))
    return World()


def init_from_env(device_type: str | None = None, timeout_s: float = 1800.0) -> World:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1); a no-op otherwise or when joined.

    ``device_type`` "cuda" picks NCCL and pins this process to GPU ``LOCAL_RANK``; anything else gloo.
    """
    size = _env_int("WORLD_SIZE", 1)
    if size <= 1 or not dist.is_available():
        return world()
    if not dist.is_initialized():
        use_cuda = device_type == "cuda" or (device_type in (None, "auto") and torch.cuda.is_available())
        if use_cuda:
            torch.cuda.set_device(_env_int("LOCAL_RANK", 0))
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return world()


def _gather_parts(x: torch.Tensor, w: World) -> list[torch.Tensor]:
    """Every process's ``x`` (equal shapes but for dim 0, which may differ: the last batch of an epoch)."""
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(w.size)]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], dtype=torch.long, device=x.device))
    rows = [int(n) for n in sizes]
    pad = max(rows)
    buf = x.detach().contiguous()
    if buf.shape[0] < pad:
        buf = torch.cat([buf, buf.new_zeros((pad - buf.shape[0], *buf.shape[1:]))])
    parts = [torch.empty_like(buf) for _ in range(w.size)]
    dist.all_gather(parts, buf)
    return [p[:n] for p, n in zip(parts, rows)]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every process's ``x`` along dim 0, in rank order, for a loss every process computes
    alike on the global batch. Rows of other processes are constants; this process's rows carry its
    gradient, multiplied by the number of processes, so that after :func:`average_gradients` every
    parameter has the one-process gradient: a parameter below the gather (an encoder) collects its share from
    each process's rows, a parameter above it (a loss's temperature) the same full gradient on every process."""
    w = world()
    if not w.distributed:
        return x
    parts = _gather_parts(x, w)
    parts[w.rank] = x * w.size - x.detach() * (w.size - 1)  # the value of x, the gradient times the world
    return torch.cat(parts, 0)


def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every process's ``x`` (no gradient) along dim 0, in rank order."""
    w = world()
    if not w.distributed:
        return x
    return torch.cat(_gather_parts(x, w), 0)


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Average the gradients of ``params`` over processes with one all-reduce of a flat buffer.

    Parameters without a gradient are skipped; every process must have gradients for the same parameters
    (they run the same graph).
    """
    w = world()
    if not w.distributed:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= w.size
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset: offset + n].view_as(g))
        offset += n


def shard_rows(n: int) -> np.ndarray:
    """The rows ``0..n-1`` this process encodes: a contiguous block, sizes differing by at most one."""
    w = world()
    bounds = np.linspace(0, n, w.size + 1).round().astype(np.int64)
    return np.arange(bounds[w.rank], bounds[w.rank + 1])


def gather_rows(local: np.ndarray, n: int) -> np.ndarray:
    """The (n, ...) array from each process's :func:`shard_rows` block (every process gets all of it)."""
    w = world()
    if not w.distributed:
        return local
    objs: list = [None] * w.size
    dist.all_gather_object(objs, local)
    out = np.concatenate(objs, 0)
    if len(out) != n:
        raise RuntimeError(f"gathered {len(out)} rows from {w.size} processes, expected {n}")
    return out


def broadcast_object(obj, src: int = 0):
    """``obj`` of process ``src`` on every process."""
    w = world()
    if not w.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if world().distributed:
        dist.barrier()
