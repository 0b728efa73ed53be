"""Data parallelism over ``torch.distributed`` (launched by ``torchrun``): who am I, gather, average.

One process per device. ``torchrun`` sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` (and the rendezvous
variables); :func:`init_from_env` joins the process group they describe -- NCCL on CUDA, gloo on CPU -- and
does nothing in a plain single-process run, where every helper here is the identity.

Training gathers the batch's embeddings from every process (:func:`all_gather_with_grad`: the local shard
keeps its gradient, the others are constants), so that hard negatives are mined over the global batch exactly
as one process holding the whole batch would, and averages the gradients (:func:`average_gradients`).
Encoding for evaluation and indexing is sharded by rows and gathered (:func:`gather_rows`, :func:`map_blocks`);
what only one process may do (write an index) runs on rank 0 (:func:`run_on_main`), and a failure there, or in
any process's block, stops every process with an error instead of leaving the others waiting.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from vsekit.errors import VsekitError

T = TypeVar("T")
R = TypeVar("R")
_alone = 0  # > 0 inside alone(): this process works as if it were the only one
_joined = False  # True once init_from_env made the process group (shutdown leaves one made by others alone)


class PeerError(VsekitError):
    """Another process of the group failed; this one stops too (the message names that process and its error)."""


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
    """The current process group (a single process when none was joined, or inside :func:`alone`)."""
    if not _alone and dist.is_available() and dist.is_initialized():
        return World(dist.get_world_size(), dist.get_rank(), _env_int("LOCAL_RANK", 0))
    return World()


def init_from_env(device_type: str | None = None, timeout_s: float = 1800.0) -> World:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1); a no-op otherwise or when joined.

    ``device_type`` "cuda" picks NCCL and pins this process to GPU ``LOCAL_RANK``; anything else gloo.
    """
    global _joined
    size = _env_int("WORLD_SIZE", 1)
    if size <= 1 or not dist.is_available():
        return world()
    if not dist.is_initialized():
        use_cuda = device_type == "cuda" or (device_type in (None, "auto") and torch.cuda.is_available())
        if use_cuda:
            torch.cuda.set_device(_env_int("LOCAL_RANK", 0))
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
        _joined = True
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
    out = np.concatenate(gather_objects(local), 0)
    if len(out) != n:
        raise RuntimeError(f"gathered {len(out)} rows from {w.size} processes, expected {n}")
    return out


def gather_objects(obj: T, dst: int | None = None) -> list[T] | None:
    """Every process's ``obj`` (picklable), in rank order: on every process, or with ``dst`` on that one only
    (the others get None). ``[obj]`` in one process."""
    w = world()
    if not w.distributed:
        return [obj]
    if dst is None:
        objs: list = [None] * w.size
        dist.all_gather_object(objs, obj)
        return objs
    objs = [None] * w.size if w.rank == dst else None
    dist.gather_object(obj, objs, dst=dst)
    return objs


def shard_list(items: Sequence[T]) -> list[T]:
    """This process's contiguous block of ``items`` (:func:`shard_rows` over their positions)."""
    return [items[i] for i in shard_rows(len(items))]


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """Within the block this process works as the only one: :func:`world` is a single process, the gathers are
    the identity (a block of rows given to code that shards by itself is not sharded again)."""
    global _alone
    _alone += 1
    try:
        yield
    finally:
        _alone -= 1


def _attempt(fn: Callable[[], R]) -> tuple[R | None, Exception | None]:
    try:
        return fn(), None
    except Exception as e:  # noqa: BLE001 - told to every process, then raised again here
        return None, e


def _describe(error: Exception | None) -> str | None:
    return None if error is None else f"{type(error).__name__}: {error}"


def _raise_first(own: Exception | None, texts: Sequence[str | None], size: int) -> None:
    """Raise this process's own error, else a :class:`PeerError` for the first process that reported one."""
    if own is not None:
        raise own
    for rank, text in enumerate(texts):
        if text is not None:
            raise PeerError(f"process {rank} of {size} failed: {text}")


def map_blocks(fn: Callable[[Sequence[T]], R], items: Sequence[T], join: Callable[[list[R]], R]) -> R | None:
    """``fn(items)``, computed in blocks under torchrun: each process calls ``fn`` on its contiguous block of
    ``items`` (:func:`shard_list`, run :func:`alone`), and rank 0 returns ``join`` of the results of every
    process in rank order; the other processes return None. One process: just ``fn(items)``.

    An error in any process's block is raised on every process (its own error there, a :class:`PeerError`
    on the others) before anything is gathered."""
    w = world()
    if not w.distributed:
        return fn(items)
    block = shard_list(items)
    with alone():
        value, error = _attempt(lambda: fn(block))
    _raise_first(error, gather_objects(_describe(error)), w.size)
    parts = gather_objects(value, dst=0)
    return join(parts) if w.is_main else None


def run_on_main(fn: Callable[[], R], share: Callable[[R], Any] = lambda result: result) -> Any:
    """``fn()`` on rank 0 only (:func:`alone`), which returns its result; every other process returns
    ``share(result)``, broadcast from rank 0 (the result itself by default). An error in ``fn`` is raised on
    rank 0 and as a :class:`PeerError` on the others, so no process waits for one that stopped."""
    w = world()
    if not w.distributed:
        return fn()
    result, shared, error = None, None, None
    if w.is_main:
        with alone():
            pair, error = _attempt(lambda: _with_share(fn(), share))
        result, shared = pair or (None, None)
    shared, text = broadcast_object((shared, _describe(error)), src=0)
    _raise_first(error, [text], w.size)
    return result if w.is_main else shared


def _with_share(result: R, share: Callable[[R], Any]) -> tuple[R, Any]:
    return result, share(result)


def broadcast_object(obj, src: int = 0):
    """``obj`` of process ``src`` on every process."""
    w = world()
    if not w.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shutdown() -> None:
    """Leave the process group :func:`init_from_env` joined, at the end of a command: a gloo process that exits
    with the group open may abort in its teardown ("terminate called without an active exception")."""
    global _joined
    if _joined and dist.is_initialized():
        dist.destroy_process_group()
    _joined = False


def barrier() -> None:
    if world().distributed:
        dist.barrier()
