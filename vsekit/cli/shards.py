"""``vsekit shards``: a data set's split as webdataset tar shards (read back with ``data.format=shards``)."""

from __future__ import annotations

import argparse


def cmd_shards(args: argparse.Namespace) -> int:
    from vsekit.cli.common import data_spec
    from vsekit.data.formats.shards import write_shards
    from vsekit.data.sources import load_split

    data = data_spec(args.data, args.image_root)
    for split in args.split.split(","):
        corpus = load_split(data, split, args.max_images)
        r = write_shards(corpus, args.out, split, max_per_shard=args.max_per_shard,
                         max_shard_bytes=args.max_shard_size, overwrite=args.overwrite)
        print(f"{split}: {r.samples} images, {r.captions} captions in {len(r.files)} shards "
              f"({r.files[0].name} ...), index {r.index}")
    return 0


def add_cli(sub) -> None:
    from vsekit.cli.common import parse_size, positive_int

    s = sub.add_parser("shards", help="write a data set's split as webdataset tar shards",
                       description="One sample per image: its file bytes (or precomputed features as .npy) and a "
                                   ".json with its id, captions, caption ids and label. Train or evaluate from them "
                                   "with data.format=shards data.path=OUT (docs/data.md).")
    s.add_argument("--data", required=True, help="demo | dataset_*.json | precomp folder | pairs file | image folder | shards | "
                                                 "a YAML data section or recipe")
    s.add_argument("--image-root", help="folder the data set's image paths are relative to")
    s.add_argument("--split", default="train", help="split to write (comma-separated for several)")
    s.add_argument("--out", required=True, help="output folder ({split}-000000.tar, ... and {split}.index.json)")
    s.add_argument("--max-per-shard", type=positive_int, default=10_000, help="samples per shard")
    s.add_argument("--max-shard-size", type=parse_size, default=1 << 30,
                   help="start a new shard past this size (e.g. 512M, 1G)")
    s.add_argument("--max-images", type=positive_int, help="first N images of the split only")
    s.add_argument("--overwrite", action="store_true", help="replace shards of the split written before")
    s.set_defaults(fn=cmd_shards)
