"""ACMR with and without its adversarial path, on labelled data: the demo set and a real collection.

Every arm is `configs/acmr_demo.yaml` (small CNN + FC/tanh image projector, bag-of-words text projector, 40-d
common space, label classifier x100, label triplets, Adam beta1 0.5) for the same epochs and differs only in
what the modality discriminator's loss does to the projectors:

- adversary:      gradient reversal with the DANN schedule λ_p = 2/(1+exp(-10p)) - 1 (ACMR as published);
- no adversary:   λ = 0: the discriminator still trains on the embeddings (so its accuracy is measured the
                  same way) but its reversed gradient into the projectors is zero (the released demo's
                  behaviour, whose adversarial op is never run).

Reported: label-relevance mAP both ways on the test split (last checkpoint; mAP over the whole ranking and the
demo's mAP@50), the discriminator's training accuracy per epoch, and a probe: a logistic regression trained
afresh on the final test embeddings to tell images from captions (5-fold cross-validated accuracy; 0.5 =
the modalities are indistinguishable). Mean ± std over seeds.

On pretrained features (issue 22, ``--collection emoji_224`` or ``tabler_224``): the precomputed pooled
EfficientNet-Lite0 (ImageNet) vectors of the collection rendered at 224 px (``$VSEKIT_CACHE/benchmarks/
<name>_pooled``: ``{split}_ims.npy`` N x 1280, ``{split}_caps.txt``, ``{split}_labels.npy``; the classes are the
CLDR groups for emoji, the icon categories for tabler), the setting ACMR was published in (projectors on
fixed CNN vectors): the image projector reads the vector (1280 -> 512 -> 100 -> 40, FC + tanh, acmr_base's
sizes), the text projector the caption's bag of words as in the demo recipe, at the paper's Adam 1e-4 (the
demo's 1e-3 is for a CNN from random weights) for 50 epochs (acmr_base's), one caption per image per epoch.
These collections have a validation split of their own. Also reported: test rsum of the exact pairs (VSE++
protocol, all captions, ranked by the model's Euclidean distance) and, per seed, the paired difference of
the two arms (the same seed: the same initial weights and batch order).

    .venv/bin/python benchmarks/acmr_adversary.py --jobs 2                      # demo set, 3 seeds
    .venv/bin/python benchmarks/acmr_adversary.py --collection emoji --jobs 2   # CLDR groups as classes
    .venv/bin/python benchmarks/acmr_adversary.py --collection emoji_224 --jobs 2   # pretrained pooled features
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

RECIPE = Path(__file__).resolve().parents[1] / "vsekit" / "configs" / "acmr_demo.yaml"
ARMS = {
    "adversary (GRL, DANN)": [],
    "no adversary (λ = 0)": ["objective.adversarial.schedule=constant", "objective.adversarial.lam=0.0"],
}
KEYS = ["i2t_map", "t2i_map", "map_avg", "i2t_map@50", "t2i_map@50"]
PRETRAINED = {  # collection -> its classes
    "emoji_224": "Noto emoji rendered at 224 px, CLDR groups as classes",
    "tabler_224": "tabler outline icons rendered at 224 px, icon categories as classes",
}
# acmr_demo with the image projector on the precomputed vector instead of a CNN, at acmr_base's settings
PRETRAINED_RECIPE = ["model.image_encoder={name: projector, hidden: [512, 100], activation: tanh}",
                     "optim.lr=1.0e-4", "train.epochs=50"]


def probe_accuracy(img: np.ndarray, cap: np.ndarray, seed: int) -> float:
    """5-fold accuracy of a fresh logistic regression telling image from caption embeddings (balanced)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    rng = np.random.default_rng(seed)
    n = min(len(img), len(cap))
    x = np.concatenate([img[rng.choice(len(img), n, replace=False)], cap[rng.choice(len(cap), n, replace=False)]])
    y = np.r_[np.zeros(n), np.ones(n)]
    return float(cross_val_score(LogisticRegression(max_iter=2000), x, y, cv=5).mean())


def run_one(arm: str, seed: int, out: Path, overrides: list[str]) -> dict:
    import torch

    torch.set_num_threads(1)
    from vsekit.config import resolve_config
    from vsekit.data.sources import load_split
    from vsekit.inference import Embedder
    from vsekit.train.trainer import Trainer

    cfg = resolve_config(RECIPE, [f"output_dir={out}", f"seed={seed}", "train.progress=false", *overrides,
                                  *ARMS[arm]])
    t0 = time.perf_counter()
    Trainer(cfg).fit()
    train_s = time.perf_counter() - t0
    emb = Embedder.from_checkpoint(out / "last.pt")
    test = load_split(cfg.data, cfg.data.test_split)
    m = emb.evaluate(test, "label_map")
    exact = emb.evaluate(test)  # exact pairs: R@K and rsum, all captions, by the model's own similarity
    img, cap = emb.encode_images(test), emb.encode_texts(test)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in records if r["kind"] == "val"]
    return {"arm": arm, "seed": seed, "test": {k: m[k] for k in KEYS}, "test_pr": [m["i2t_pr"], m["t2i_pr"]],
            "test_rsum": exact["rsum"], "test_exact": exact,
            "val_map": [r["map_avg"] for r in vals], "disc_acc": [r["train_term_adv_accuracy"] for r in vals],
            "lambda": [r["train_term_adv_lambda"] for r in vals], "probe_acc": probe_accuracy(img, cap, seed),
            "train_s": train_s, "num_test_images": test.num_images, "num_classes": int(np.max(test.labels)) + 1}


def fmt(vals: list[float], scale: float = 100.0) -> str:
    return f"{scale * np.mean(vals):.1f} ± {scale * np.std(vals):.1f}"


def write_plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, runs in results.items():
        for ax, key, label in ((axes[0], "disc_acc", "discriminator accuracy (train)"),
                               (axes[1], "val_map", "validation mAP (avg of both ways)")):
            curves = np.array([r[key] for r in runs])
            x = np.arange(1, curves.shape[1] + 1)
            ax.plot(x, curves.mean(0), marker="o", ms=3, label=name)
            ax.fill_between(x, curves.min(0), curves.max(0), alpha=0.15)
            ax.set_xlabel("epoch")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
    axes[0].axhline(0.5, color="grey", ls="--", lw=1)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (each uses one thread)")
    p.add_argument("--epochs", type=int, default=None, help="default: the recipe's")
    p.add_argument("--out", type=Path, default=Path("runs/acmr_bench"))
    p.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--collection", choices=["emoji", *PRETRAINED],
                   help="a real labelled collection instead of the demo set (emoji: raw 64 px images and the small "
                        "CNN; emoji_224, tabler_224: pooled pretrained EfficientNet-Lite0 features)")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 2 epochs of 3 steps")
    args = p.parse_args(argv)
    overrides: list[str] = []
    source = "the embedded demo set (15 classes: main shape x number of objects)"
    if args.collection in PRETRAINED:
        from real_data import cache_dir

        feats = cache_dir() / f"{args.collection}_pooled"
        for split in ("train", "val", "test"):  # ACMR needs the classes: say which file is missing, up front
            for what in ("ims.npy", "caps.txt", "labels.npy"):
                if not (feats / f"{split}_{what}").is_file():
                    p.error(f"{feats / f'{split}_{what}'} not found: the pooled features with their labels "
                            "(vsekit features extract --pool global on the collection's JSON writes them)")
        overrides += ["data.format=precomp", f"data.path={feats}", "data.train_split=train", "data.val_split=val",
                      "data.test_split=test", "data.val_max_images=null", *PRETRAINED_RECIPE]
        source = f"{args.collection} ({PRETRAINED[args.collection]}; pooled pretrained EfficientNet-Lite0 features)"
    elif args.collection:
        from real_data import SOURCES, prepare

        info = prepare(args.collection)
        overrides += ["data.format=karpathy", f"data.path={info['path']}", f"data.image_root={info['image_root']}",
                      "data.val_max_images=null"]
        source = f"{args.collection} ({SOURCES[args.collection]}), CLDR groups as classes"
    if args.epochs:
        overrides.append(f"train.epochs={args.epochs}")
    if args.quick:
        args.seeds = args.seeds[:1]
        overrides += ["train.epochs=2", "train.max_steps_per_epoch=3"]
    args.results.mkdir(parents=True, exist_ok=True)
    tag = args.collection or "demo"
    results: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(run_one, arm, seed, args.out / tag / f"{'adv' if not ARMS[arm] else 'noadv'}_s{seed}",
                               overrides) for seed in args.seeds for arm in ARMS]
        for fut in futures:
            r = fut.result()
            results[r["arm"]].append(r)
            print(f"{r['arm']:24s} seed {r['seed']}: test mAP {r['test']['map_avg']:.4f}, probe "
                  f"{r['probe_acc']:.3f}, disc {r['disc_acc'][0]:.3f} -> {r['disc_acc'][-1]:.3f}, "
                  f"{r['train_s'] / 60:.1f} min", flush=True)
    wall = time.perf_counter() - t0
    first = next(iter(results.values()))[0]
    recipe = ("`configs/acmr_demo.yaml` with " + ", ".join(f"`{o}`" for o in PRETRAINED_RECIPE)
              if args.collection in PRETRAINED else "`configs/acmr_demo.yaml`")
    lines = [f"{source}: {recipe}, {len(first['val_map'])} epochs, seeds {args.seeds}; test split "
             f"({first['num_test_images']} images, {first['num_classes']} classes), last checkpoint, mean ± std.",
             "",
             "| arm | i2t mAP | t2i mAP | mean mAP | i2t mAP@50 | t2i mAP@50 | test rsum (exact pairs) | "
             "discriminator accuracy, first → last epoch | probe accuracy on test embeddings | min / run |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, runs in results.items():
        cells = [fmt([r["test"][k] for r in runs]) for k in KEYS]
        disc = f"{fmt([r['disc_acc'][0] for r in runs])} → {fmt([r['disc_acc'][-1] for r in runs])}"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {fmt([r['test_rsum'] for r in runs], 1.0)} | {disc} | "
                     f"{fmt([r['probe_acc'] for r in runs])} | {np.mean([r['train_s'] for r in runs]) / 60:.1f} |")
    adv, noadv = ({r["seed"]: r for r in runs} for runs in results.values())
    seeds = [s for s in args.seeds if s in adv and s in noadv]
    d_map = [100 * (adv[s]["test"]["map_avg"] - noadv[s]["test"]["map_avg"]) for s in seeds]
    d_rsum = [adv[s]["test_rsum"] - noadv[s]["test_rsum"] for s in seeds]
    lines += ["", "Paired, with minus without the adversary, seed by seed (" + ", ".join(map(str, seeds)) + "): mean "
              f"mAP {', '.join(f'{d:+.1f}' for d in d_map)} (mean {np.mean(d_map):+.1f}, ahead in "
              f"{sum(d > 0 for d in d_map)} of {len(d_map)}); test rsum {', '.join(f'{d:+.1f}' for d in d_rsum)} "
              f"(mean {np.mean(d_rsum):+.1f}, ahead in {sum(d > 0 for d in d_rsum)} of {len(d_rsum)})."]
    import torch

    lines += ["", "mAP and accuracies in percent; rsum = R@1 + R@5 + R@10 both ways, in percent.", "",
              f"Wall time {wall / 60:.1f} min with {args.jobs} job(s) of one thread each. Machine: {os.cpu_count()}-core "
              f"CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}, Python "
              f"{sys.version.split()[0]}."]
    table = "\n".join(lines)
    print(table)
    suffix = tag + ("_quick" if args.quick else "")
    (args.results / f"acmr_adversary_{suffix}.md").write_text(table + "\n")
    (args.results / f"acmr_adversary_{suffix}.json").write_text(json.dumps(
        {"results": results, "overrides": overrides, "wall_s": wall}, indent=1))
    write_plot(results, args.results / f"acmr_adversary_{suffix}.png",
               f"ACMR on {tag}: with vs without the adversarial path (mean, min-max over seeds)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
