"""``vsekit semantics fit``: LSA caption vectors for LSEH, fitted once and stored."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_semantics_fit(args: argparse.Namespace) -> int:
    from vsekit.data.sources import data_config, load_split, sniff_source
    from vsekit.semantics import fit_to_folder
    from vsekit.utils.io import check_writable_dir

    # before the captions are read and the LSA fitted: a folder that cannot be written is said at once
    check_writable_dir(Path(args.out), "--out", create=False)
    data = sniff_source(args.data, args.image_root)
    spec = {**data.model_dump(), "check_images": False}  # captions only
    if args.restval:
        spec["restval_into_train"] = True
    corpus = load_split(data_config(spec), args.split)
    kw = {"n_components": args.n_components, "random_state": args.seed}
    if args.n_iter is not None:
        kw["n_iter"] = args.n_iter
    fit_to_folder(corpus.captions, corpus.caption_ids, Path(args.out), **kw)
    return 0


def add_cli(sub) -> None:
    from vsekit.cli.common import positive_int, seed_int
    from vsekit.semantics import DEFAULT_N_COMPONENTS, DEFAULT_RANDOM_STATE

    s = sub.add_parser("semantics", help="LSA caption semantics for the LSEH loss")
    ssub = s.add_subparsers(dest="semantics_verb", required=True)
    f = ssub.add_parser("fit", help="fit LSA on the training captions and store one vector per caption")
    f.add_argument("--data", required=True, help="demo | dataset_*.json | precomp folder | pairs file")
    f.add_argument("--image-root")
    f.add_argument("--split", default="train")
    f.add_argument("--restval", action="store_true", help="Karpathy COCO: merge restval into train")
    f.add_argument("--out", required=True, help="output folder")
    f.add_argument("--n-components", type=positive_int, default=DEFAULT_N_COMPONENTS)
    f.add_argument("--n-iter", type=positive_int, default=None)
    f.add_argument("--seed", type=seed_int, default=DEFAULT_RANDOM_STATE)
    f.set_defaults(fn=cmd_semantics_fit)
