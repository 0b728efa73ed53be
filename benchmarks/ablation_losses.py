"""Loss ablation on the demo data set (issue: LSEH evidence).

VSE0 (sum of hinges), VSE++ (max of hinges), VSE++ with a 1-epoch sum-of-hinges warm-up, LSEH and InfoNCE,
with the same model, data, optimizer and budget, over several seeds.

The setting is the LSEH paper's VSE++ one: precomputed region features + GRU text encoder, image regions
flattened into one linear layer. With no pretrained CNN available offline, the region features are the 4x4
feature map (128-d per region) of a *fixed, randomly initialised* SmallCNN over each demo image, written once
in the VSE++/SCAN precomp layout ({split}_ims.npy, {split}_caps.txt) and read back by vsekit's precomp reader. Reports mean +- std of the test R@1/5/10
both ways and rsum (best-validation checkpoint), the epochs each loss needs to reach 95 % of its best
validation rsum, a plot of validation rsum per epoch, and the per-step time of LSEH over VSE++ measured in
the same run.

    .venv/bin/python benchmarks/ablation_losses.py                 # full: 5 losses x 3 seeds
    .venv/bin/python benchmarks/ablation_losses.py --quick         # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _plots import plot_rsum_curves  # benchmarks/ is on sys.path when run as a script

from vsekit.config import resolve_config
from vsekit.data.sources import load_split
from vsekit.inference import Embedder
from vsekit.losses import build_loss
from vsekit.train.trainer import Trainer

RECIPE = Path(__file__).resolve().parents[1] / "vsekit" / "configs" / "demo_vsepp.yaml"
BASE = ["data.format=precomp", "model.image_encoder.name=precomp", "model.image_encoder.pooling=flatten",
        "model.embed_size=256", "model.text_encoder.word_dim=128", "data.val_split=val", "optim.lr=5e-4",
        "optim.lr_decay_every=6"]


@torch.no_grad()
def make_precomp(out: Path, num_images: int = 3000) -> Path:
    """Random-CNN region features of the demo set in the precomp layout (cached in ``out``)."""
    from vsekit.data.demo import build_demo
    from vsekit.data.formats.karpathy import read_karpathy
    from vsekit.data.images import build_transform, load_rgb
    from vsekit.models.image import SmallCNN

    if (out / "test_caps.txt").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    js = build_demo(num_images=num_images)
    torch.manual_seed(1234)
    net = SmallCNN(32).eval()
    trunk = net.features[:-4]  # stem + 3 blocks: 64x64 -> 4x4 x 128
    tf = build_transform(train=False, image_size=64, resize=64)
    for split in ("train", "val", "test"):
        c = read_karpathy(js, js.parent, split)
        feats = []
        for a in range(0, c.num_images, 256):
            x = torch.stack([tf(load_rgb(p)) for p in c.image_paths[a: a + 256]])
            f = trunk(x).flatten(2).transpose(1, 2)  # (B, 16, 128)
            feats.append(torch.nn.functional.normalize(f, dim=-1).numpy())
        order = np.argsort(c.caption_to_image, kind="stable")
        assert (np.bincount(c.caption_to_image) == 5).all()
        np.save(out / f"{split}_ims.npy", np.concatenate(feats).astype(np.float32))
        (out / f"{split}_caps.txt").write_text("\n".join(c.captions[j] for j in order) + "\n")
    return out
LOSSES = {
    "VSE0 (sum of hinges)": {"name": "hinge", "margin": 0.2, "reduction": "sum"},
    "VSE++ (max of hinges)": {"name": "hinge", "margin": 0.2, "reduction": "max"},
    "VSE++ + warm-up": {"name": "hinge_warmup", "margin": 0.2, "warmup_epochs": 1},
    "LSEH": {"name": "lseh", "alpha": 0.185, "lam": 0.025, "reduction": "max"},
    "LSEH + warm-up": {"name": "lseh", "alpha": 0.185, "lam": 0.025, "reduction": "max", "warmup_epochs": 1},
    "InfoNCE": {"name": "infonce", "temperature": 0.07},
}
KEYS = ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"]


def epochs_to_95(rsums: list[float]) -> int:
    best = max(rsums)
    return next(e + 1 for e, r in enumerate(rsums) if r >= 0.95 * best)


def run_one(loss: dict, seed: int, out: Path, overrides: list[str]) -> dict:
    cfg = resolve_config(RECIPE, [*BASE, f"output_dir={out}", f"seed={seed}", "train.progress=false", *overrides])
    cfg.loss = dict(loss)
    t0 = time.perf_counter()
    result = Trainer(cfg).fit()
    train_s = time.perf_counter() - t0
    emb = Embedder.from_checkpoint(out / "best.pt")
    m = emb.evaluate(load_split(cfg.data, cfg.data.test_split))
    rsums = [h["rsum"] for h in result["history"]]
    return {"seed": seed, "test": m, "val_rsum": rsums, "epochs_to_95": epochs_to_95(rsums), "train_s": train_s}


def step_overhead(overrides: list[str], steps: int, out: Path) -> dict:
    """Time of full training steps (same batches, same model) with VSE++ vs LSEH loss, interleaved."""
    times: dict[str, list[float]] = {}
    trainers = {}
    for name in ("VSE++ (max of hinges)", "LSEH"):
        cfg = resolve_config(RECIPE, [*BASE, f"output_dir={out / name.split()[0]}", "train.progress=false",
                                      *overrides])
        cfg.loss = dict(LOSSES[name])
        trainers[name] = Trainer(cfg)
    first = next(iter(trainers.values()))
    batches = []
    for b in first.loader():
        batches.append(b)
        if len(batches) == steps:
            break
    for t in trainers.values():  # warm-up
        t.train_step(batches[0])
    for b in batches:
        for name, t in trainers.items():
            t0 = time.perf_counter()
            t.train_step(b)
            times.setdefault(name, []).append(time.perf_counter() - t0)
    # the loss alone (forward + backward) on a B x B similarity matrix, B = 128
    g = torch.Generator().manual_seed(0)
    sim = torch.randn(128, 128, generator=g).mul_(0.1).requires_grad_(True)
    ids = torch.arange(128)
    vecs = torch.randn(128, 400, generator=g)
    loss_only = {}
    for name in ("VSE++ (max of hinges)", "LSEH"):
        fn = build_loss(LOSSES[name])
        kw = {"caption_vectors": vecs} if name == "LSEH" else {}
        for _ in range(20):
            fn(sim, ids, **kw).backward()
        t0 = time.perf_counter()
        for _ in range(200):
            fn(sim, ids, **kw).backward()
        loss_only[name] = (time.perf_counter() - t0) / 200
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"step_median_s": med, "step_ratio": med["LSEH"] / med["VSE++ (max of hinges)"],
            "loss_only_s": loss_only, "loss_only_ratio": loss_only["LSEH"] / loss_only["VSE++ (max of hinges)"],
            "steps": steps}


def fmt(vals: list[float]) -> str:
    return f"{np.mean(vals):.1f} ± {np.std(vals):.1f}"


def write_plot(results: dict, path: Path) -> None:
    plot_rsum_curves(results, path, "Demo set: validation rsum per epoch (mean, min-max over seeds)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--losses", nargs="+", default=list(LOSSES), choices=list(LOSSES))
    p.add_argument("--tag", default="", help="suffix of the result files")
    p.add_argument("--no-overhead", action="store_true", help="skip the per-step overhead measurement")
    p.add_argument("--out", type=Path, default=Path("runs/ablation_losses"))
    p.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (2 epochs, 1 seed, few steps)")
    p.add_argument("--overhead-steps", type=int, default=20)
    args = p.parse_args(argv)
    overrides = [f"train.epochs={args.epochs}"]
    if args.quick:
        args.seeds = args.seeds[:1]
        overrides = ["train.epochs=2", "train.max_steps_per_epoch=5"]
        args.overhead_steps = 3
    feats = make_precomp(args.out / "demo_precomp")
    overrides.append(f"data.path={feats}")
    args.results.mkdir(parents=True, exist_ok=True)

    overhead = None if args.no_overhead else step_overhead(overrides, args.overhead_steps, args.out / "overhead")
    if overhead:
        print(f"per-step time: VSE++ {overhead['step_median_s']['VSE++ (max of hinges)'] * 1e3:.1f} ms, "
              f"LSEH {overhead['step_median_s']['LSEH'] * 1e3:.1f} ms, ratio {overhead['step_ratio']:.3f}; "
              f"loss only: ratio {overhead['loss_only_ratio']:.2f}", flush=True)

    results: dict[str, list[dict]] = {}
    for name in args.losses:
        for seed in args.seeds:
            tag = name.split()[0].replace("+", "p").replace("(", "") + ("_warmup" if "warm" in name else "")
            r = run_one(LOSSES[name], seed, args.out / f"{tag}_s{seed}", overrides)
            results.setdefault(name, []).append(r)
            print(f"{name:24s} seed {seed}: test rsum {r['test']['rsum']:.1f}, best val rsum "
                  f"{max(r['val_rsum']):.1f}, epochs to 95% {r['epochs_to_95']}, {r['train_s'] / 60:.1f} min",
                  flush=True)

    lines = [
        f"Demo set (3,000 images: 2,400 train / 300 val / 300 test, 5 captions each) as precomputed region "
        f"features (16 regions x 128-d from a fixed random CNN) + GRU, regions flattened into one linear layer "
        f"(the LSEH paper's VSE++ setting); joint space 256, Adam 5e-4 (x0.1 at epoch 6), batch 128, "
        f"{overrides[0].split('=')[1]} epochs, seeds {args.seeds}; test metrics of the best-validation "
        "checkpoint, mean ± std over seeds.",
        "",
        "| loss | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 | rsum | epochs to 95 % of best val rsum |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        cells = [fmt([r["test"][k] for r in runs]) for k in KEYS]
        e95 = [r["epochs_to_95"] for r in runs]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {np.mean(e95):.1f} ({', '.join(map(str, e95))}) |")
    lines += [] if overhead is None else [
        "",
        f"Per-step overhead of LSEH over VSE++ (same batches, interleaved, median of {overhead['steps']} full "
        f"training steps): VSE++ {overhead['step_median_s']['VSE++ (max of hinges)'] * 1e3:.1f} ms, LSEH "
        f"{overhead['step_median_s']['LSEH'] * 1e3:.1f} ms → **{(overhead['step_ratio'] - 1) * 100:+.1f} %**. "
        f"The loss alone (forward + backward, B = 128, 400-d LSA vectors): "
        f"{overhead['loss_only_s']['VSE++ (max of hinges)'] * 1e6:.0f} µs vs "
        f"{overhead['loss_only_s']['LSEH'] * 1e6:.0f} µs.",
        "",
        f"Machine: {os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, Python {sys.version.split()[0]}.",
    ]
    table = "\n".join(lines)
    print(table)
    tag = ("_quick" if args.quick else "") + args.tag
    (args.results / f"ablation_losses{tag}.md").write_text(table + "\n")
    (args.results / f"ablation_losses{tag}.json").write_text(json.dumps(
        {"results": results, "overhead": overhead, "overrides": overrides}, indent=1))
    write_plot(results, args.results / f"ablation_losses{tag}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
