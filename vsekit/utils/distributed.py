"""Data parallelism over ``torch.distributed`` (launched by ``torchrun``): who am I, gather, average.

One process per device. ``torchrun`` sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` (and the rendezvous
variables); :func:`init_from_env` joins the process group they describe -- NCCL on CUDA, gloo on CPU -- and
does nothing in a plain single-process run, where every helper here is the identity.

Training gathers the batch's embeddings from every process (:func:`all_gather_with_grad`, autograd-aware), so
that hard negatives are mined over the global batch exactly as one process holding the whole batch would;
DistributedDataParallel averages the gradients, overlapping the all-reduce with the backward pass
(:class:`vsekit.train.optim.OptimizerSet`).
Encoding for evaluation and indexing is sharded by rows and gathered (:func:`gather_rows`, :func:`map_blocks`);
what only one process may do (write an index) runs on rank 0 (:func:`run_on_main`), and a failure there, or in
any process's block, stops every process with an error instead of leaving the others waiting.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from vsekit.errors import VsekitError

T = TypeVar("T")
D = TypeVar("D")
R = TypeVar("R")
_alone = 0  # > 0 inside alone(): this process works as if it were the only one
_joined = False  # True once init_from_env made the process group (shutdown leaves one made by others alone)


class PeerError(VsekitError):
    """Another process of the group failed; this one stops too (the message names that process and its error)."""


@dataclass(frozen=True)
class World:
    """This process's place: ``rank`` of ``size`` processes."""

    size: int = 1
    rank: int = 0

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
        return World(dist.get_world_size(), dist.get_rank())
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


def _row_counts(xs: Sequence[torch.Tensor], w: World) -> list[list[int]]:
    """Every process's dim-0 size of each of ``xs`` (they may differ: the last batch of an epoch), with one
    all_gather for all of them."""
    local = torch.tensor([x.shape[0] for x in xs], dtype=torch.long, device=xs[0].device)
    sizes = [torch.empty_like(local) for _ in range(w.size)]
    dist.all_gather(sizes, local)
    return [[int(s[i]) for s in sizes] for i in range(len(xs))]


def all_gather_with_grad(*xs: torch.Tensor) -> list[torch.Tensor]:
    """Each of ``xs`` concatenated over every process along dim 0, in rank order, for a loss every process
    computes alike on the global batch: one all_gather for the sizes, then one per tensor.

    The gather is autograd-aware (:func:`torch.distributed.nn.functional.all_gather`): its backward gives each
    process the sum over processes of the gradient for its own rows, i.e. the one-process gradient times the
    number of processes, which DistributedDataParallel's average turns back into the one-process gradient of
    a parameter below the gather (an encoder); a parameter above it (a loss's temperature) gets the same full
    gradient on every process, which the average leaves as it is."""
    w = world()
    if not w.distributed or not xs:
        return list(xs)
    from torch.distributed.nn.functional import all_gather as gather_with_grad

    gathered = []
    for x, rows in zip(xs, _row_counts(xs, w)):
        pad = max(rows) - x.shape[0]
        padded = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))]) if pad else x
        with warnings.catch_warnings():  # deprecated for a private module; still the public autograd gather
            warnings.simplefilter("ignore", FutureWarning)
            parts = gather_with_grad(padded.contiguous())
        gathered.append(torch.cat([p[:n] for p, n in zip(parts, rows)], 0))
    return gathered


def tensor_fields(obj: Any) -> list[torch.Tensor]:
    """The tensors a dataclass holds that require a gradient."""
    values = [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    return [v for v in values if isinstance(v, torch.Tensor) and v.requires_grad]


def all_gather_fields(obj: D, skip: tuple[str, ...] = ()) -> D:
    """A copy of the dataclass ``obj`` with its tensors (one row per example, dim 0) but ``skip`` gathered over
    processes by :func:`all_gather_with_grad`."""
    names = [f.name for f in dataclasses.fields(obj)
             if f.name not in skip and isinstance(getattr(obj, f.name), torch.Tensor)]
    return dataclasses.replace(obj, **dict(zip(names, all_gather_with_grad(*(getattr(obj, n) for n in names)))))


def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every process's ``x`` (no gradient) along dim 0, in rank order."""
    return all_gather_with_grad(x.detach())[0]


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Average the gradients of ``params`` over processes with one all-reduce of a flat buffer: for the parts
    that DistributedDataParallel does not hold (an objective term's discriminator, trained by its own optimizer
    outside the model's forward).

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
    ``items`` (:func:`shard_rows` over their positions, run :func:`alone`), and rank 0 returns ``join`` of the results of every
    process in rank order; the other processes return None. One process: just ``fn(items)``.

    An error in any process's block is raised on every process (its own error there, a :class:`PeerError`
    on the others) before anything is gathered."""
    w = world()
    if not w.distributed:
        return fn(items)
    block = [items[i] for i in shard_rows(len(items))]
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
