"""``vsekit demo``: build the demo data set, train VSE++ on it, evaluate on its test split, search it."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from vsekit.cli.common import RECIPES

RECIPE = RECIPES / "demo_vsepp.yaml"


def cmd_demo(args: argparse.Namespace) -> int:
    from vsekit.config import resolve_config
    from vsekit.data.demo import DEMO_QUERIES
    from vsekit.data.sources import load_split
    from vsekit.eval import format_metrics_table
    from vsekit.eval.chance import chance_rsum
    from vsekit.inference import Embedder
    from vsekit.train.trainer import train

    extra = ["train.epochs=2", "train.max_steps_per_epoch=40", "name=demo_vsepp_fast"] if args.fast else []
    cfg = resolve_config(RECIPE, [*extra, *args.overrides])
    t0 = time.perf_counter()
    print(f"[1/3] training {cfg.name} ({cfg.train.epochs} epochs) -> {cfg.output_dir}", flush=True)
    result = train(cfg)
    minutes = (time.perf_counter() - t0) / 60
    print(f"      done in {minutes:.1f} min, best validation rsum {result['best_rsum']:.1f}")

    print("[2/3] evaluating best.pt on the test split")
    emb = Embedder.from_checkpoint(Path(cfg.output_dir) / "best.pt")
    test = load_split(cfg.data, cfg.data.test_split)
    metrics = emb.evaluate(test)
    img = emb.encode_images(test)
    print(format_metrics_table(metrics, title=f"demo test: {test.num_images} images, {test.num_captions} captions"))
    print(f"      chance level rsum = {chance_rsum(test.caption_to_image, test.num_images):.1f}")

    print("[3/3] text -> image search on the test images")
    queries = list(DEMO_QUERIES)[:4]
    scores = emb.score(img, emb.encode_texts(queries)).T  # (queries, images), by the model's similarity
    first_caption: dict[int, str] = {}
    for j, i in enumerate(test.caption_to_image):
        first_caption.setdefault(int(i), test.captions[j])
    for query, row in zip(queries, scores):
        top = np.argsort(-row, kind="stable")[:3]
        print(f'  "{query}"')
        for r, i in enumerate(top, 1):
            print(f"     {r}. {row[i]:+.3f}  {test.image_paths[i].name}  ({first_caption.get(int(i), '')})")
    return 0


def add_cli(sub) -> None:
    d = sub.add_parser("demo", help="build the demo data, train VSE++ for a few minutes, evaluate, search")
    d.add_argument("--fast", action="store_true", help="a one-minute smoke version")
    d.add_argument("overrides", nargs="*", help="key.sub=value overrides of the demo recipe")
    d.set_defaults(fn=cmd_demo)
