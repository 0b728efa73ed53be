"""The ``vsekit`` command line: a thin layer over the library, one module per verb group.

Every error a user can cause (a bad config key, a missing file, a foreign checkpoint) is printed as one
``vsekit: error: ...`` line with exit code 2; a training run stopped for collapse exits with 3. An error of
the system (a read-only folder, a full disk, a file-size limit) is one ``vsekit: error: <path>: <reason>``
line with a hint and exit code 1 (``VSEKIT_DEBUG=1`` shows its traceback instead), and so is an allocation
that fails (a model or batch too large for the machine). A training run stopped by SIGTERM, SIGINT or SIGHUP
saves its state and exits with 128 + the signal's number (143, 130, 129); any other command stopped by
SIGTERM or SIGHUP says so in one line, with the same exit codes."""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import re
import signal
import sys

from vsekit.cli.common import RECIPES, recipe_path

__all__ = ["RECIPES", "build_parser", "main", "recipe_path"]


def build_parser() -> argparse.ArgumentParser:
    from vsekit.cli import caption, demo, evaluate, features, imagine, index, semantics, shards, train

    p = argparse.ArgumentParser(prog="vsekit", description="Visual-semantic embeddings for image-text retrieval.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="verb", required=True)
    for module in (train, evaluate, caption, demo, semantics, index, features, shards, imagine):
        module.add_cli(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.INFO
    from vsekit.utils import distributed

    world = distributed.init_from_env()  # under torchrun: join the process group; rank 0 speaks for all
    if not world.is_main:
        level = logging.WARNING
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    logging.basicConfig(level=level, format="%(message)s")
    from vsekit.errors import TrainingCollapsed, VsekitError
    from vsekit.train.signals import Terminated, TrainingInterrupted, terminate_raises

    _ignore_file_size_signal()
    try:
        with terminate_raises():
            return args.fn(args)
    except (VsekitError, FileNotFoundError) as e:
        print(f"vsekit: error: {e}", file=sys.stderr)
        return 2
    except (TrainingCollapsed, TrainingInterrupted) as e:
        print(f"vsekit: {e}", file=sys.stderr)
        return e.exit_code if isinstance(e, TrainingInterrupted) else 3
    except KeyboardInterrupt:
        print("vsekit: interrupted", file=sys.stderr)
        return 130
    except Terminated as e:
        print(f"vsekit: {e}; files are written whole or not at all, work folders were removed", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        if os.environ.get("VSEKIT_DEBUG"):
            raise
        print(f"vsekit: error: {describe_os_error(e)}", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError) as e:
        if os.environ.get("VSEKIT_DEBUG") or not is_out_of_memory(e):
            raise
        print(f"vsekit: error: {describe_out_of_memory(e)}", file=sys.stderr)
        return 1
    finally:
        distributed.shutdown()


_HINTS = {
    errno.ENOSPC: "free space there, or write elsewhere",
    errno.EDQUOT: "free space there (disk quota), or write elsewhere",
    errno.EFBIG: "the file-size limit (ulimit -f) or the file system's largest file is too small; raise it, or "
                 "write elsewhere",
    errno.EACCES: "make it writable for this user, or choose another path",
    errno.EPERM: "it may be immutable (chattr +i) or protected; make it writable, or choose another path",
    errno.EROFS: "the file system is read-only; choose another path",
    errno.ENOTDIR: "a part of the path is a file, not a folder; choose another path",
    errno.EISDIR: "it is a folder; name a file",
}


def describe_os_error(e: OSError) -> str:
    """``<path>: <reason> (<hint>)`` for an :class:`OSError` that reached the command line (no traceback; set
    VSEKIT_DEBUG=1 for one)."""
    where = f"{e.filename}: " if e.filename is not None else ""
    reason = e.strerror or str(e) or type(e).__name__
    hint = _HINTS.get(e.errno or 0, "check the path and its permissions; VSEKIT_DEBUG=1 shows a traceback")
    return f"{where}{reason} ({hint})"


# What torch says when an allocation fails (CPU, CUDA, MPS): a RuntimeError, not a MemoryError
_OUT_OF_MEMORY = ("can't allocate memory", "out of memory", "failed to allocate")


def is_out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is an allocation that failed: Python's MemoryError or torch's allocator errors."""
    return isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and any(
        m in str(e).lower() for m in _OUT_OF_MEMORY))


def describe_out_of_memory(e: BaseException) -> str:
    """One line for an allocation that failed: what torch asked for (its allocator's message names the bytes)
    and what to lower; no traceback (VSEKIT_DEBUG=1 shows one)."""
    text = " ".join(str(e).split())
    asked = re.search(r"tried to allocate [0-9.]+ ?[KMGTP]?i?B|tried to allocate [0-9]+ bytes", text)
    what = f" ({asked.group(0)})" if asked else ""
    return (f"out of memory{what}: a size in the config or the options is too large for this machine (a model "
            "size such as model.embed_size, train.batch_size, transform.image_size, --batch-size); lower it")


def _ignore_file_size_signal() -> None:
    """Past a file-size limit (RLIMIT_FSIZE) the kernel sends SIGXFSZ, which kills a process by default; ignored,
    the write fails with EFBIG instead, which vsekit reports (and the old file stays)."""
    if hasattr(signal, "SIGXFSZ"):
        with contextlib.suppress(ValueError, OSError):  # not the main thread
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


if __name__ == "__main__":
    sys.exit(main())
