"""``vsekit demo``: build the demo data set, train VSE++ on it, evaluate on its test split, search it."""

from __future__ import annotations

import time
from math import comb
from pathlib import Path

import numpy as np

RECIPE = Path(__file__).parent / "configs" / "demo_vsepp.yaml"


def chance_rsum(caption_to_image: np.ndarray, num_images: int) -> float:
    """Expected rsum of random embeddings: t2i R@K = K/N; i2t R@K = 1 - C(M-g, K)/C(M, K) for g captions."""
    m = len(caption_to_image)
    per_image = np.bincount(caption_to_image, minlength=num_images)
    total = 0.0
    for k in (1, 5, 10):
        total += 100.0 * min(k, num_images) / num_images
        total += 100.0 * float(np.mean([1 - comb(m - g, k) / comb(m, k) for g in per_image if g > 0]))
    return total


def run_demo(fast: bool = False, overrides: list[str] | None = None) -> int:
    from vsekit.config import resolve_config
    from vsekit.data.demo import DEMO_QUERIES
    from vsekit.eval import format_metrics_table, retrieval_metrics
    from vsekit.inference import Embedder
    from vsekit.train.trainer import load_split, train

    extra = ["train.epochs=2", "train.max_steps_per_epoch=40", "name=demo_vsepp_fast"] if fast else []
    cfg = resolve_config(RECIPE, [*extra, *(overrides or [])])
    t0 = time.perf_counter()
    print(f"[1/3] training {cfg['name']} ({cfg['train']['epochs']} epochs) -> {cfg['output_dir']}")
    result = train(cfg)
    minutes = (time.perf_counter() - t0) / 60
    print(f"      done in {minutes:.1f} min, best validation rsum {result['best_rsum']:.1f}")

    print("[2/3] evaluating best.pt on the test split")
    emb = Embedder.from_checkpoint(Path(cfg["output_dir"]) / "best.pt")
    test = load_split(cfg, cfg["data"]["test_split"])
    img, cap = emb.encode_corpus(test)
    metrics = retrieval_metrics(img, cap, test.caption_to_image, similarity=emb.similarity)
    print(format_metrics_table(metrics, title=f"demo test: {test.num_images} images, {test.num_captions} captions"))
    print(f"      chance level rsum = {chance_rsum(test.caption_to_image, test.num_images):.1f}")

    print("[3/3] text -> image search on the test images")
    queries = list(DEMO_QUERIES)[:4]
    q = emb.encode_captions(queries)
    scores = q @ img.T
    first_caption = {}
    for j, i in enumerate(test.caption_to_image):
        first_caption.setdefault(int(i), test.captions[j])
    for query, row in zip(queries, scores):
        top = np.argsort(-row, kind="stable")[:3]
        print(f'  "{query}"')
        for r, i in enumerate(top, 1):
            print(f"     {r}. {row[i]:+.3f}  {test.image_paths[i].name}  ({first_caption.get(int(i), '')})")
    return 0
