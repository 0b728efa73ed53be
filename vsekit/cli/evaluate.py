"""``vsekit eval``: a checkpoint on a data split, by the field's protocol; ``vsekit encode``: embeddings."""

from __future__ import annotations

import argparse
from pathlib import Path

from vsekit.utils import distributed


def check_out_file(out: str | Path | None) -> None:
    """Before any encoding: ``out`` (with its ``.ids.txt`` sibling for ``encode``) can be written where it is
    (its folder takes a probe file) and replaces nothing but a regular file (a symlink or a device is refused)."""
    from vsekit.utils.io import check_replaceable, check_writable_dir

    if out is None or not distributed.world().is_main:
        return
    out = Path(out)
    check_replaceable(out)
    check_writable_dir(out.parent, "the folder of --out", create=False)


def _corpus(emb, args):
    from vsekit.cli.common import data_from_arg
    from vsekit.data.sources import load_split

    data = data_from_arg(args.data, args.image_root, emb.config.data)
    return load_split(data, args.split, args.max_images)


def cmd_eval(args: argparse.Namespace) -> int:
    from vsekit.eval import get_protocol
    from vsekit.inference import Embedder

    check_out_file(args.out)
    emb = Embedder.from_checkpoint(args.checkpoint, device=args.device)
    corpus = _corpus(emb, args)
    train_captions = None
    if args.protocol == "semantic":  # the LSA model is fitted on the checkpoint's training captions
        from vsekit.data.sources import data_config, load_split

        data = emb.config.data
        train = load_split(data_config({**data.model_dump(), "check_images": False}), data.train_split)
        train_captions = train.captions
    result, folds = emb.evaluate(corpus, args.protocol, batch_size=args.batch_size, progress=True,
                                 return_folds=True, train_captions=train_captions)
    title = f"{corpus.name}: {corpus.num_images} images, {corpus.num_captions} captions, protocol {args.protocol}"
    context = {"checkpoint": str(args.checkpoint), "split": args.split, "protocol": args.protocol,
               "num_images": corpus.num_images, "num_captions": corpus.num_captions}
    spec = get_protocol(args.protocol)
    print(spec.table(result, title=title))
    if args.out and distributed.world().is_main:
        spec.write(args.out, result, folds, **context)
    if args.out:
        print(f"wrote {args.out}")
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    import numpy as np

    from vsekit.cli.common import data_from_arg
    from vsekit.data.corpus import DataError
    from vsekit.data.sources import load_split
    from vsekit.data.textio import read_caption_lines
    from vsekit.inference import Embedder
    from vsekit.utils.io import atomic_write, atomic_write_text

    out = Path(args.out)
    check_out_file(out)
    check_out_file(out.with_suffix(".ids.txt"))
    emb = Embedder.from_checkpoint(args.checkpoint, device=args.device)
    if args.captions:
        path = Path(args.captions)
        if not path.is_file():
            raise DataError(f"--captions {path}: no such file")
        lines = read_caption_lines(path)
        vecs = emb.encode_texts(lines, batch_size=args.batch_size, progress=True)
        ids = [f"{path.name}:{i}" for i in range(1, len(lines) + 1)]
    else:
        corpus = load_split(data_from_arg(args.images, args.image_root, emb.config.data), args.split)
        vecs = emb.encode_images(corpus, batch_size=args.batch_size, progress=True)
        ids = list(corpus.image_ids)
    if distributed.world().is_main:  # under torchrun every process encoded a block; rank 0 writes
        atomic_write(out, lambda f: np.save(f, vecs))
        atomic_write_text(out.with_suffix(".ids.txt"), "\n".join(ids) + "\n")
    print(f"wrote {out} {vecs.shape} and {out.with_suffix('.ids.txt')}")
    return 0


def add_cli(sub) -> None:
    from vsekit.cli.common import positive_int
    from vsekit.eval import EVAL_PROTOCOLS

    e = sub.add_parser("eval", help="evaluate a checkpoint by the field's retrieval protocol")
    e.add_argument("checkpoint", help="a .pt checkpoint or a run folder (best.pt is used)")
    e.add_argument("--data", help="demo | dataset_*.json | precomp folder | pairs .csv/.jsonl | image folder "
                                  "(default: the checkpoint's training data)")
    e.add_argument("--image-root", help="folder the data set's image paths are relative to")
    e.add_argument("--split", default="test")
    e.add_argument("--protocol", choices=list(EVAL_PROTOCOLS), default="full",
                   help="; ".join(p.help for p in EVAL_PROTOCOLS.values()))
    e.add_argument("--max-images", type=positive_int, default=None, help="first N images of the split only")
    e.add_argument("--batch-size", type=positive_int, default=128)
    e.add_argument("--device", default="auto")
    e.add_argument("--out", help="also write the results as JSON here (with the per-fold results of 1k5fold)")
    e.set_defaults(fn=cmd_eval)

    n = sub.add_parser("encode", help="embed images or captions to a .npy file")
    n.add_argument("checkpoint")
    g = n.add_mutually_exclusive_group(required=True)
    g.add_argument("--images", help="a folder of images, or a data set (as for eval --data)")
    g.add_argument("--captions", help="a text file, one caption per line")
    n.add_argument("--image-root")
    n.add_argument("--split", default="test", help="split when --images is a data set")
    n.add_argument("--out", required=True, help="output .npy (ids go to OUT.ids.txt)")
    n.add_argument("--batch-size", type=positive_int, default=128)
    n.add_argument("--device", default="auto")
    n.set_defaults(fn=cmd_encode)
