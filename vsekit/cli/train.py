"""``vsekit train``: train a model from a recipe."""

from __future__ import annotations

import argparse


def cmd_train(args: argparse.Namespace) -> int:
    from vsekit.cli.common import recipe_path
    from vsekit.config import resolve_config
    from vsekit.errors import ConfigError
    from vsekit.train.trainer import train

    cfg = resolve_config(recipe_path(args.config), args.overrides)
    if args.resume and args.overwrite:
        raise ConfigError("--resume continues the run in output_dir and --overwrite replaces it: pass one of them")
    result = train(cfg, resume=args.resume, overwrite=args.overwrite)
    print(f"best validation {result['select_metric']} {result['best_rsum']:.4g}; checkpoints in "
          f"{result['output_dir']}")
    return 0


def add_cli(sub) -> None:
    t = sub.add_parser("train", help="train a model from a YAML recipe")
    t.add_argument("config", help="recipe file, or the name of a shipped recipe (e.g. vsepp_f30k_precomp)")
    t.add_argument("overrides", nargs="*", help="key.sub=value overrides (YAML values), e.g. optim.lr=1e-3")
    t.add_argument("--resume", action="store_true", help="continue output_dir/last.pt where it stopped (after "
                   "SIGTERM, Ctrl-C, train.max_minutes or a crash); the config may change only train.epochs, "
                   "train.max_minutes and similar settings")
    t.add_argument("--overwrite", action="store_true",
                   help="start a new run in an output_dir that holds an earlier run, replacing its checkpoints "
                        "and metrics.jsonl (without it, that is refused)")
    t.set_defaults(fn=cmd_train)
