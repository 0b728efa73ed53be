"""Dual-Path on the demo data set: instance loss alone, ranking loss alone, and the two-stage schedule.

Every arm is `configs/dualpath_demo.yaml` (same model, data, optimiser, epochs and LR schedule: two stages of 12
and 8 epochs, the optimiser rebuilt at the boundary and decayed x0.1 after 4 epochs of the second) and differs
only in the objective weights of its stages:

- instance only:  instance (image 1, text 1) in both stages;
- ranking only:   the mined-negative ranking loss (weight 2) in both stages;
- two-stage:      instance in stage I, then rank : image : text = 2 : 1 : 0.1 (the paper's schedule);
- joint:          2 : 1 : 0.1 from the first epoch (separates "instance loss as a start" from "instance loss as
                  an extra term"; ``--arms`` can leave it out).

Reports test R@1/5/10 both ways and rsum of the LAST checkpoint (300 test images, 1,500 captions), mean ± std
over seeds, the validation rsum curves (100 images) and the mean mined ranking loss of the last epoch.
Runs use one intra-op thread each (steadier on a shared CPU); ``--jobs 2`` runs two at a time.

    .venv/bin/python benchmarks/dualpath_demo.py --jobs 2        # 4 arms x 3 seeds, ~15-25 min on 2 cores
    .venv/bin/python benchmarks/dualpath_demo.py --quick         # smoke run
    .venv/bin/python benchmarks/dualpath_demo.py --collection emoji --seeds 0 1 --jobs 2   # real data (real_data.py)

With ``--collection`` the same recipe trains on a real collection from ``real_data.py`` (its first 600 training
images are the instance classes) and the results are written as ``dualpath_<collection>.{md,json,png}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from _plots import plot_rsum_curves

RECIPE = Path(__file__).resolve().parents[1] / "vsekit" / "configs" / "dualpath_demo.yaml"
KEYS = ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"]

INSTANCE = {"loss_weight": 0.0, "instance": {"image_weight": 1.0, "text_weight": 1.0}, "mined": {"weight": 0.0}}
RANKING = {"loss_weight": 0.0, "instance": {"image_weight": 0.0, "text_weight": 0.0}, "mined": {"weight": 2.0}}
JOINT = {"loss_weight": 0.0, "instance": {"image_weight": 1.0, "text_weight": 0.1}, "mined": {"weight": 2.0}}
ARMS = {  # objective of stage I, of stage II
    "instance only": (INSTANCE, INSTANCE),
    "ranking only": (RANKING, RANKING),
    "two-stage (paper)": (INSTANCE, JOINT),
    "joint from start": (JOINT, JOINT),
}


def arm_config(arm: str, seed: int, out: Path, overrides: list[str]) -> dict:
    from vsekit.config import resolve_config

    cfg = resolve_config(RECIPE, [f"output_dir={out}", f"seed={seed}", "train.progress=false", *overrides]).to_dict()
    for stage, objective in zip(cfg["train"]["stages"], ARMS[arm]):
        stage["objective"] = copy.deepcopy(objective)
    return cfg


def run_one(arm: str, seed: int, out: Path, overrides: list[str], stage_epochs: tuple[int, int] | None) -> dict:
    import torch

    torch.set_num_threads(1)
    from vsekit.data.sources import data_config, load_split
    from vsekit.inference import Embedder
    from vsekit.train.trainer import Trainer

    cfg = arm_config(arm, seed, out, overrides)
    if stage_epochs:
        for stage, n in zip(cfg["train"]["stages"], stage_epochs):
            stage["epochs"] = n
        cfg["train"]["epochs"] = sum(stage_epochs)
    t0 = time.perf_counter()
    result = Trainer(cfg).fit()
    train_s = time.perf_counter() - t0
    emb = Embedder.from_checkpoint(out / "last.pt")
    test_data = data_config({**cfg["data"], "max_images": None})  # the whole test split
    test = load_split(test_data, test_data.test_split)
    m = emb.evaluate(test)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last_epoch = max(r["epoch"] for r in records)
    mined = [r["term_mined"] for r in records if r["kind"] == "train" and r["epoch"] == last_epoch
             and "term_mined" in r]
    return {"arm": arm, "seed": seed, "test": m, "val_rsum": [h["rsum"] for h in result["history"]],
            "last_epoch_mined_loss": float(np.mean(mined)) if mined else None, "train_s": train_s,
            "num_test_images": test.num_images, "num_test_captions": test.num_captions}


def fmt(vals: list[float]) -> str:
    return f"{np.mean(vals):.1f} ± {np.std(vals):.1f}"


def write_plot(results: dict, boundary: int, path: Path) -> None:
    plot_rsum_curves(results, path, "Dual-Path demo: validation rsum per epoch (mean, min-max over seeds)",
                     ylabel="validation rsum (100 images)", boundary=boundary)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (each uses one thread)")
    p.add_argument("--out", type=Path, default=Path("runs/dualpath_demo_bench"))
    p.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 1 + 1 epochs, 3 steps each")
    p.add_argument("--collection", choices=["emoji", "tabler"], help="a real collection instead of the demo set")
    args = p.parse_args(argv)
    overrides: list[str] = ["train.log_every=1"]
    if args.collection:
        from real_data import prepare

        info = prepare(args.collection)
        overrides += ["data.format=karpathy", f"data.path={info['path']}", f"data.image_root={info['image_root']}"]
    stage_epochs = None
    if args.quick:
        args.seeds = args.seeds[:1]
        overrides += ["train.max_steps_per_epoch=3"]
        stage_epochs = (1, 1)
    args.results.mkdir(parents=True, exist_ok=True)

    jobs = [(arm, seed) for seed in args.seeds for arm in args.arms]
    results: dict[str, list[dict]] = {arm: [] for arm in args.arms}
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(run_one, arm, seed, args.out / f"{arm.split()[0].replace('-', '')}_s{seed}",
                               overrides, stage_epochs): (arm, seed) for arm, seed in jobs}
        for fut in futures:
            r = fut.result()
            results[r["arm"]].append(r)
            print(f"{r['arm']:20s} seed {r['seed']}: test rsum {r['test']['rsum']:.1f}, last val rsum "
                  f"{r['val_rsum'][-1]:.1f}, {r['train_s'] / 60:.1f} min", flush=True)
    wall = time.perf_counter() - t0

    cfg = arm_config(args.arms[0], 0, args.out / "cfg", overrides)
    s1 = stage_epochs[0] if stage_epochs else cfg["train"]["stages"][0]["epochs"]
    s2 = stage_epochs[1] if stage_epochs else cfg["train"]["stages"][1]["epochs"]
    n_test = next(iter(results.values()))[0]["num_test_images"]
    n_caps = next(iter(results.values()))[0]["num_test_captions"]
    lines = [
        f"{args.collection or 'Demo'} set, `configs/dualpath_demo.yaml` ({cfg['data']['max_images']} training images = instance classes, "
        f"32 px, small CNN + 1-block-per-stage text CNN, SGD Nesterov lr {cfg['optim']['lr']}, batch "
        f"{cfg['train']['batch_size']}), {s1} + {s2} epochs for every arm, seeds {args.seeds}; test metrics of the "
        f"last checkpoint on {n_test} test images ({n_caps} captions), mean ± std over seeds.",
        "",
        "| objective (stage I → stage II) | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 | rsum | "
        "mined rank loss, last epoch | min / run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        cells = [fmt([r["test"][k] for r in runs]) for k in KEYS]
        mined = [r["last_epoch_mined_loss"] for r in runs if r["last_epoch_mined_loss"] is not None]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {fmt(mined) if mined else '–'} | "
                     f"{np.mean([r['train_s'] for r in runs]) / 60:.1f} |")
    lines += ["", f"Validation rsum at the end of stage I (epoch {s1}) and at the end (epoch {s1 + s2}):", ""]
    for name, runs in results.items():
        lines.append(f"- {name}: {fmt([r['val_rsum'][s1 - 1] for r in runs])} → "
                     f"{fmt([r['val_rsum'][-1] for r in runs])}")
    import torch

    lines += ["", f"Wall time {wall / 60:.1f} min with {args.jobs} job(s) of one thread each. Machine: "
              f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
              f"Python {sys.version.split()[0]}."]
    table = "\n".join(lines)
    print(table)
    tag = ("_" + args.collection if args.collection else "") + ("_quick" if args.quick else "")
    (args.results / f"dualpath_demo{tag}.md").write_text(table + "\n")
    (args.results / f"dualpath_demo{tag}.json").write_text(json.dumps(
        {"results": results, "overrides": overrides, "stage_epochs": [s1, s2], "wall_s": wall}, indent=1))
    write_plot(results, s1, args.results / f"dualpath_demo{tag}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
