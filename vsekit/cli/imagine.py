"""``vsekit imagine``: images sampled for captions by a checkpoint's text-to-image GAN, as one PNG grid."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_imagine(args: argparse.Namespace) -> int:
    from vsekit.cli.evaluate import check_out_file
    from vsekit.errors import ConfigError
    from vsekit.imagine import MAX_SAMPLES, MAX_TEXTS, Imaginer, image_grid
    from vsekit.utils.io import atomic_write

    if len(args.texts) > MAX_TEXTS:
        raise ConfigError(f"at most {MAX_TEXTS} texts per grid, got {len(args.texts)}")
    if args.n > MAX_SAMPLES:
        raise ConfigError(f"--n: at most {MAX_SAMPLES} images per text, got {args.n}")
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise ConfigError(f"--out {out}: the grid is written as a PNG; name it *.png")
    check_out_file(out)  # before the model is loaded: a link, a device or a folder that cannot be written
    imaginer = Imaginer.from_checkpoint(args.checkpoint, device=args.device)
    grid = image_grid(imaginer.generate(args.texts, n=args.n, seed=args.seed))
    atomic_write(out, lambda f: grid.save(f, format="PNG"))
    s = imaginer.image_size
    rows = f"{len(args.texts)} row{'s' if len(args.texts) != 1 else ''}"
    print(f"wrote {out} ({grid.width} x {grid.height}: {rows} of {args.n} images of {s} x {s}, seed {args.seed})")
    return 0


def add_cli(sub) -> None:
    from vsekit.cli.common import positive_int, seed_int

    p = sub.add_parser("imagine", help="sample images for captions from a checkpoint's text-to-image GAN (GXN)")
    p.add_argument("checkpoint", help="a .pt checkpoint or a run folder (best.pt is used) trained with the gan term")
    p.add_argument("texts", nargs="+", metavar="TEXT", help="captions, one grid row each")
    p.add_argument("--n", type=positive_int, default=8, help="images per caption (default 8, at most 64)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the noise: the same seed gives the same grid")
    p.add_argument("--out", required=True, help="the PNG grid to write")
    p.add_argument("--device", default="auto")
    p.set_defaults(fn=cmd_imagine)
