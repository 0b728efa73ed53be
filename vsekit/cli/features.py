"""``vsekit features extract``: precomputed image features from a backbone, in the precomp layout."""

from __future__ import annotations

import argparse


def cmd_features_extract(args: argparse.Namespace) -> int:
    from vsekit.cli.common import data_spec
    from vsekit.data.checks import check_images
    from vsekit.data.sources import load_split, read_folder
    from vsekit.features import ExtractOptions, build_backbone, extract_split

    opts = ExtractOptions(pool=args.pool, grid=args.grid, batch_size=args.batch_size, dtype=args.dtype,
                          image_size=args.image_size, resize=args.resize, num_workers=args.workers,
                          device=args.device)
    opts.check()
    model = build_backbone(args.backbone, args.weights, pretrained=args.pretrained)
    if args.images:
        splits = args.splits.split(",") if args.splits else ["test"]
        corpus = check_images(read_folder(args.images, captions=False))
        jobs = [(s, lambda c=corpus: c) for s in splits]
    else:
        data = data_spec(args.data, args.image_root)
        splits = args.splits.split(",") if args.splits else [data.train_split, data.val_split, data.test_split]
        jobs = [(s, lambda s=s: load_split(data, s, args.max_images)) for s in splits]
    for split, corpus_of in jobs:
        corpus = corpus_of()
        r = extract_split(corpus, model, args.out, split, opts, captions=not args.images,
                          captions_per_image=args.captions_per_image, restart=args.restart)
        shape = " x ".join(map(str, r.shape))
        what = f"{r.rows_computed} rows computed" if r.rows_computed else "already complete"
        print(f"{split}: {r.path} ({shape}, {what}), {r.captions} captions")
    return 0


def add_cli(sub) -> None:
    from vsekit.cli.common import non_negative_int, positive_int

    f = sub.add_parser("features", help="precomputed image features from a backbone (data.format=precomp)")
    fsub = f.add_subparsers(dest="features_verb", required=True)
    e = fsub.add_parser("extract", help="run a backbone over images and write {split}_ims.npy, ids and captions",
                        description="Writes the precomp layout (docs/data.md): {split}_ims.npy, {split}_ids.txt and, "
                                    "for --data, {split}_caps.txt (and labels). Resumable: run the same command "
                                    "again after an interruption.")
    e.add_argument("--backbone", required=True,
                   help="a torchvision backbone (resnet152, resnet50, vgg19, ...), timm:<name>, or "
                        "vsekit:<checkpoint> (the CNN of a model trained with vsekit)")
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="a folder of images: features and an ids file only")
    src.add_argument("--data", help="a data set (demo | dataset_*.json | pairs file | image folder | a YAML data "
                                    "section or recipe): per split features, captions and ids, ready for "
                                    "data.format=precomp")
    e.add_argument("--image-root", help="folder the data set's image paths are relative to")
    e.add_argument("--out", required=True, help="output folder")
    e.add_argument("--splits", help="comma-separated splits (default: the data set's train, val and test; "
                                    "'test' for --images)")
    e.add_argument("--max-images", type=positive_int, help="first N images of each split only")
    e.add_argument("--pool", choices=["global", "grid"], default="global",
                   help="global: one pooled vector per image (N x D); grid: the last conv map's cells as "
                        "regions (N x R x D)")
    e.add_argument("--grid", type=positive_int, help="with --pool grid: average-pool the map to G x G regions")
    e.add_argument("--weights", help="a local weights file (.safetensors / .pth; a file whose names differ from "
                                     "timm's loads by position when every shape fits, in order)")
    e.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                   help="without --weights: the library's own pretrained weights, from its cache (torchvision: "
                        "the torch hub cache; timm: the Hugging Face cache), downloaded there by the library "
                        "when missing unless VSEKIT_OFFLINE=1; --no-pretrained: random weights")
    e.add_argument("--image-size", type=positive_int, help="the crop the backbone sees (default 224; a timm "
                                                           "model's own input size; a vsekit checkpoint's own size)")
    e.add_argument("--resize", type=positive_int, help="short side before the centre crop")
    e.add_argument("--captions-per-image", type=positive_int,
                   help="keep each image's first K captions (needed when images have different numbers)")
    e.add_argument("--batch-size", type=positive_int, default=64)
    e.add_argument("--workers", type=non_negative_int, default=0, help="data-loader worker processes")
    e.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    e.add_argument("--device", default="auto")
    e.add_argument("--restart", action="store_true", help="discard an earlier (unfinished) extraction of a split")
    e.set_defaults(fn=cmd_features_extract)
