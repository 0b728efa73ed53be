"""The ``vsekit`` command line: a thin layer over the library, one module per verb group.

Every error a user can cause (a bad config key, a missing file, a foreign checkpoint) is printed as one
``vsekit: error: ...`` line with exit code 2; a training run stopped for collapse exits with 3.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from vsekit.cli.common import RECIPES, recipe_path

_recipe_path = recipe_path  # the name benchmarks and older scripts import

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

    try:
        return args.fn(args)
    except (VsekitError, FileNotFoundError) as e:
        print(f"vsekit: error: {e}", file=sys.stderr)
        return 2
    except TrainingCollapsed as e:
        print(f"vsekit: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("vsekit: interrupted", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
