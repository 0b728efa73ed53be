"""The ``vsekit`` command line: a thin layer over the library."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

RECIPES = Path(__file__).parent / "configs"


def _recipe_path(name: str) -> Path:
    """A recipe file path, or the name of a recipe shipped with vsekit (``vsepp_f30k_precomp``)."""
    p = Path(name)
    if p.is_file():
        return p
    shipped = RECIPES / (name if name.endswith(".yaml") else f"{name}.yaml")
    if shipped.is_file():
        return shipped
    known = ", ".join(sorted(f.stem for f in RECIPES.glob("*.yaml")))
    raise SystemExit(f"vsekit: no recipe {name!r} (not a file, not a shipped recipe; shipped: {known})")


def data_spec_from_arg(arg: str | None, image_root: str | None = None, base: dict | None = None) -> dict:
    """``--data`` value -> a data spec: ``demo``, a Karpathy ``dataset_*.json``, a precomputed-feature folder,
    or a pairs ``.csv``/``.jsonl`` file. Without ``--data`` the checkpoint's own data spec is used."""
    spec = dict(base or {})
    if arg is None:
        if not spec:
            raise SystemExit("vsekit: --data is required (the checkpoint names no data set)")
        if image_root:
            spec["image_root"] = image_root
        return spec
    keep = {k: spec[k] for k in ("image_size", "resize") if k in spec}
    p = Path(arg)
    if arg == "demo":
        return {**{k: v for k, v in spec.items() if spec.get("format") == "demo"}, "format": "demo", **keep}
    if p.is_dir() and any(p.glob("*_caps.txt")):
        out = {"format": "precomp", "path": str(p)}
    elif p.suffix.lower() == ".json":
        out = {"format": "karpathy", "path": str(p), "image_root": image_root or str(p.parent)}
    elif p.suffix.lower() in (".csv", ".jsonl"):
        out = {"format": "pairs", "path": str(p), "image_root": image_root}
    elif not p.exists():
        raise SystemExit(f"vsekit: --data {arg}: no such file or folder")
    else:
        raise SystemExit(f"vsekit: --data {arg}: expected 'demo', a dataset_*.json, a folder with "
                         "{split}_caps.txt/{split}_ims.npy, or a .csv/.jsonl pairs file")
    return {**out, **keep}


# -- verbs ------------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from vsekit.config import resolve_config
    from vsekit.train.trainer import train

    cfg = resolve_config(_recipe_path(args.config), args.overrides)
    result = train(cfg, resume=args.resume)
    print(f"best validation rsum {result['best_rsum']:.2f}; checkpoints in {result['output_dir']}")
    return 0


def _load_eval_corpus(emb, args):
    from vsekit.train.trainer import load_split

    cfg = {"data": {**emb.config.get("data", {}), **data_spec_from_arg(args.data, args.image_root,
                                                                        emb.config.get("data"))}}
    return load_split(cfg, args.split, args.max_images)


def cmd_eval(args: argparse.Namespace) -> int:
    from vsekit.eval import format_metrics_table, retrieval_metrics
    from vsekit.inference import Embedder
    from vsekit.utils.io import atomic_write_json

    emb = Embedder.from_checkpoint(args.checkpoint, device=args.device)
    corpus = _load_eval_corpus(emb, args)
    img, cap = emb.encode_corpus(corpus, batch_size=args.batch_size, progress=True)
    result = retrieval_metrics(img, cap, corpus.caption_to_image, protocol=args.protocol,
                               similarity=emb.similarity)
    title = f"{corpus.name}: {corpus.num_images} images, {corpus.num_captions} captions, protocol {args.protocol}"
    print(format_metrics_table(result, title=title))
    if args.out:
        atomic_write_json(args.out, {"checkpoint": str(args.checkpoint), "split": args.split,
                                     "protocol": args.protocol, "num_images": corpus.num_images,
                                     "num_captions": corpus.num_captions, "metrics": result})
        print(f"wrote {args.out}")
    return 0


IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise SystemExit(f"vsekit: --images {folder}: not a folder")
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())


def cmd_encode(args: argparse.Namespace) -> int:
    import numpy as np

    from vsekit.data.corpus import Corpus
    from vsekit.inference import Embedder
    from vsekit.utils.io import atomic_write, atomic_write_text

    emb = Embedder.from_checkpoint(args.checkpoint, device=args.device)
    out = Path(args.out)
    if args.captions:
        path = Path(args.captions)
        if not path.is_file():
            raise SystemExit(f"vsekit: --captions {path}: no such file")
        lines = path.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines, 1):
            if not line.strip():
                raise SystemExit(f"vsekit: {path}:{i}: empty caption")
        vecs = emb.encode_captions(lines, batch_size=args.batch_size, progress=True)
        ids = [f"{path.name}:{i}" for i in range(1, len(lines) + 1)]
    else:
        src = Path(args.images)
        if src.is_dir() and not any(src.glob("*_caps.txt")):
            paths = list_images(src)
            if not paths:
                raise SystemExit(f"vsekit: --images {src}: no image files found")
            corpus = Corpus(name=str(src), captions=[], caption_to_image=np.zeros(0, np.int64),
                            image_ids=[str(p.relative_to(src)) for p in paths], image_paths=paths)
        else:
            from vsekit.train.trainer import load_split

            spec = data_spec_from_arg(args.images, args.image_root, emb.config.get("data"))
            corpus = load_split({"data": {**emb.config.get("data", {}), **spec}}, args.split)
        vecs = emb.encode_corpus_images(corpus, batch_size=args.batch_size, progress=True)
        ids = list(corpus.image_ids)
    atomic_write(out, lambda f: np.save(f, vecs))
    atomic_write_text(out.with_suffix(".ids.txt"), "\n".join(ids) + "\n")
    print(f"wrote {out} {vecs.shape} and {out.with_suffix('.ids.txt')}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from vsekit.demo import run_demo

    return run_demo(fast=args.fast, overrides=args.overrides)


def cmd_semantics_fit(args: argparse.Namespace) -> int:
    from vsekit.data.load import load_corpus
    from vsekit.semantics import fit_to_folder

    spec = {**data_spec_from_arg(args.data, args.image_root), "check_images": False}  # captions only
    if args.restval:
        spec["restval_into_train"] = True
    corpus = load_corpus(spec, args.split)
    kw = {"n_components": args.n_components, "random_state": args.seed}
    if args.n_iter is not None:
        kw["n_iter"] = args.n_iter
    fit_to_folder(corpus.captions, corpus.caption_ids, Path(args.out), **kw)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vsekit", description="Visual-semantic embeddings for image-text retrieval.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="verb", required=True)

    t = sub.add_parser("train", help="train a model from a YAML recipe")
    t.add_argument("config", help="recipe file, or the name of a shipped recipe (e.g. vsepp_f30k_precomp)")
    t.add_argument("overrides", nargs="*", help="key.sub=value overrides (YAML values), e.g. optim.lr=1e-3")
    t.add_argument("--resume", action="store_true", help="continue output_dir/last.pt where it stopped")
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("eval", help="evaluate a checkpoint by the field's retrieval protocol")
    e.add_argument("checkpoint", help="a .pt checkpoint or a run folder (best.pt is used)")
    e.add_argument("--data", help="demo | dataset_*.json | precomp folder | pairs .csv/.jsonl "
                                  "(default: the checkpoint's training data)")
    e.add_argument("--image-root", help="folder the data set's image paths are relative to")
    e.add_argument("--split", default="test")
    e.add_argument("--protocol", choices=["full", "1k5fold"], default="full",
                   help="full (e.g. F30K 1K, COCO 5K) or 1k5fold (COCO 1K: mean over 5 folds)")
    e.add_argument("--max-images", type=int, default=None, help="first N images of the split only")
    e.add_argument("--batch-size", type=int, default=128)
    e.add_argument("--device", default="auto")
    e.add_argument("--out", help="also write the results as JSON here")
    e.set_defaults(fn=cmd_eval)

    n = sub.add_parser("encode", help="embed images or captions to a .npy file")
    n.add_argument("checkpoint")
    g = n.add_mutually_exclusive_group(required=True)
    g.add_argument("--images", help="a folder of images, or a data set (as for eval --data)")
    g.add_argument("--captions", help="a text file, one caption per line")
    n.add_argument("--image-root")
    n.add_argument("--split", default="test", help="split when --images is a data set")
    n.add_argument("--out", required=True, help="output .npy (ids go to OUT.ids.txt)")
    n.add_argument("--batch-size", type=int, default=128)
    n.add_argument("--device", default="auto")
    n.set_defaults(fn=cmd_encode)

    d = sub.add_parser("demo", help="build the demo data, train VSE++ for a few minutes, evaluate, search")
    d.add_argument("--fast", action="store_true", help="a one-minute smoke version")
    d.add_argument("overrides", nargs="*", help="key.sub=value overrides of the demo recipe")
    d.set_defaults(fn=cmd_demo)

    s = sub.add_parser("semantics", help="LSA caption semantics for the LSEH loss")
    ssub = s.add_subparsers(dest="semantics_verb", required=True)
    f = ssub.add_parser("fit", help="fit LSA on the training captions and store one vector per caption")
    f.add_argument("--data", required=True, help="demo | dataset_*.json | precomp folder | pairs file")
    f.add_argument("--image-root")
    f.add_argument("--split", default="train")
    f.add_argument("--restval", action="store_true", help="Karpathy COCO: merge restval into train")
    f.add_argument("--out", required=True, help="output folder")
    f.add_argument("--n-components", type=int, default=400)
    f.add_argument("--n-iter", type=int, default=None)
    f.add_argument("--seed", type=int, default=122)
    f.set_defaults(fn=cmd_semantics_fit)

    from vsekit.index.cli import add_cli  # index build/add/remove/info, search, serve

    add_cli(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    from vsekit.checkpoint import CheckpointError
    from vsekit.config import ConfigError
    from vsekit.data.corpus import DataError
    from vsekit.models.image import PretrainedWeightsMissing

    try:
        return args.fn(args)
    except (ConfigError, DataError, CheckpointError, PretrainedWeightsMissing, FileNotFoundError) as e:
        print(f"vsekit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vsekit: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as e:
        from vsekit.train.monitor import TrainingCollapsed

        if not isinstance(e, TrainingCollapsed):
            raise
        print(f"vsekit: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
