"""``vsekit caption``: captions from a checkpoint trained with a caption term; ``--eval``: BLEU-4 and CIDEr-D."""

from __future__ import annotations

import argparse


def _rows(text: str) -> list[int]:
    from vsekit.cli.common import non_negative_int

    try:
        rows = [non_negative_int(x.strip()) for x in text.split(",") if x.strip()]
    except argparse.ArgumentTypeError:
        rows = []
    if not rows:
        raise argparse.ArgumentTypeError(f"rows must be a comma-separated list of row numbers 0, 1, ..., "
                                         f"got {text[:60]!r}")
    return rows


def cmd_caption(args: argparse.Namespace) -> int:
    from vsekit.captioning import Captioner
    from vsekit.cli.common import data_from_arg
    from vsekit.data.corpus import DataError
    from vsekit.data.sources import load_split
    from vsekit.errors import ConfigError

    decode = {"beam_size": args.beam, "max_len": args.max_len, "length_norm": args.length_norm}
    if args.images and (args.data or args.eval or args.rows is not None):
        raise ConfigError("vsekit caption: give image files, or --data (with --rows or --eval), not both")
    if not args.images and not args.data and not args.eval and args.rows is None:
        raise ConfigError("vsekit caption: give image files, or data-set rows (--data SPEC --split SPLIT --rows "
                          "0,1,2; without --data, the checkpoint's own data), or --eval")
    cap = Captioner.from_checkpoint(args.checkpoint, device=args.device)
    if args.images:
        from vsekit.data.images import load_rgb

        if cap.reads_features:
            raise ConfigError("this checkpoint's model reads precomputed image features, not image files: caption "
                              "rows of a data set with --data SPEC --split test --rows 0,1,2")
        images = [load_rgb(p) for p in args.images]  # an unreadable file: an ImageLoadError naming it
        for path, c in zip(args.images, cap.caption_pil_images(images, batch_size=args.batch_size, **decode)):
            print(f"{path}\t{c}")
        return 0
    corpus = load_split(data_from_arg(args.data, args.image_root, cap.embedder.config.data), args.split,
                        args.max_images)
    if args.eval:
        from vsekit.utils.io import atomic_write_json

        scores = cap.evaluate(corpus, batch_size=args.batch_size, progress=True, **decode)
        how = "greedy" if args.beam == 1 else f"beam {args.beam}"
        print(f"{corpus.name}: {scores['num_images']} images, {how}, at most {args.max_len or cap.term.max_len} tokens")
        print(f"BLEU-1 {scores['bleu1']:.4f}  BLEU-2 {scores['bleu2']:.4f}  BLEU-3 {scores['bleu3']:.4f}  "
              f"BLEU-4 {scores['bleu4']:.4f}  CIDEr-D {scores['cider_d']:.4f}")
        if args.out:
            atomic_write_json(args.out, {"checkpoint": str(args.checkpoint), "split": args.split, "decode": decode,
                                         "metrics": scores})
            print(f"wrote {args.out}")
        return 0
    rows = args.rows if args.rows is not None else list(range(corpus.num_images))
    bad = [r for r in rows if r >= corpus.num_images]
    if bad:
        raise DataError(f"--rows: {corpus.name} has {corpus.num_images} images; row {bad[0]} does not exist")
    for r, c in zip(rows, cap.caption_corpus(corpus, rows, batch_size=args.batch_size, **decode)):
        print(f"{corpus.image_ids[r]}\t{c}")
    return 0


def add_cli(sub) -> None:
    from vsekit.cli.common import finite_non_negative, positive_int

    p = sub.add_parser("caption", help="caption images with a checkpoint's caption decoder (or score it: --eval)")
    p.add_argument("checkpoint", help="a .pt checkpoint or a run folder (best.pt is used), trained with "
                                      "objective.terms.caption")
    p.add_argument("images", nargs="*", help="image files (models over image files); prints PATH<TAB>caption")
    p.add_argument("--beam", type=positive_int, default=1, help="beam size (1: greedy decoding)")
    p.add_argument("--max-len", type=positive_int, default=None,
                   help="most tokens per caption, the end token included (default: the term's max_len)")
    p.add_argument("--length-norm", type=finite_non_negative, default=0.0,
                   help="beam search ranks by sum log p / length**L (0: the plain sum, 1: per word)")
    p.add_argument("--data", help="caption rows of a data set instead (demo | dataset_*.json | precomp folder | "
                                  "pairs file | image folder); needed for a model over precomputed features")
    p.add_argument("--image-root", help="folder the data set's image paths are relative to")
    p.add_argument("--split", default="test")
    p.add_argument("--rows", type=_rows, default=None, help="with --data: image rows, e.g. 0,1,5 (default: all)")
    p.add_argument("--max-images", type=positive_int, default=None, help="with --data: first N images of the split only")
    p.add_argument("--eval", action="store_true",
                   help="score one caption per image of the split against its references: BLEU-1..4 and "
                        "CIDEr-D (document frequencies from the split's references, as the COCO caption "
                        "evaluation)")
    p.add_argument("--out", help="with --eval: also write the scores as JSON here")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--device", default="auto")
    p.set_defaults(fn=cmd_caption)
