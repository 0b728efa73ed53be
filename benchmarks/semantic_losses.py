"""The real-data loss comparison again, scored with plausible matches (issue 14): does LSEH gain when a
caption that is right for an image, but not one of its own, counts?

Same runs as ``real_data_losses.py losses`` (the ``scratch_small`` encoders and data settings, each loss at
equal wall-clock time, best validation checkpoint), then the test split scored by the exact pairs and by
``vsekit.eval.semantic``: a retrieved caption (image) also counts when its LSA semantics (fitted on the
training captions, as LSEH's) have cosine >= t with a ground-truth caption's. Runs use one thread each and
``--jobs 2`` runs two at a time, so budgets compare within this script only.

    .venv/bin/python benchmarks/semantic_losses.py --collection emoji --minutes 2 --seeds 0 1 2 --jobs 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
ARMS = ["vsepp_warmup", "lseh_warmup", "infonce"]
NAMES = {"vsepp_warmup": "VSE++ + warm-up", "lseh_warmup": "LSEH + warm-up", "infonce": "InfoNCE (scratch_small)"}
THRESHOLDS = (0.5, 0.7, 0.9)


def run_one(name: str, collection: str, seed: int, minutes: float) -> dict:
    import torch

    torch.set_num_threads(1)
    from real_data import prepare
    from real_data_losses import LOSSES, data_overrides

    from vsekit.cli import recipe_path
    from vsekit.config import resolve_config
    from vsekit.data.sources import load_split
    from vsekit.inference import Embedder
    from vsekit.train.trainer import Trainer

    info = prepare(collection)
    recipe, overrides = LOSSES[name]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = resolve_config(recipe_path(recipe), [*data_overrides(info), *overrides, f"seed={seed}",
                                                   f"train.max_minutes={minutes}", "train.epochs=1000",
                                                   f"output_dir={tmp}/run", f"semantics.cache_dir={tmp}/sem",
                                                   f"eval.thresholds={list(THRESHOLDS)}",
                                                   "eval.select_threshold=0.7"])
        t0 = time.perf_counter()
        Trainer(cfg).fit()
        train_s = time.perf_counter() - t0
        emb = Embedder.from_checkpoint(Path(tmp) / "run" / "best.pt")
        train = load_split(cfg.data, cfg.data.train_split)
        test = load_split(cfg.data, cfg.data.test_split)
        m = emb.evaluate(test, "semantic", train_captions=train.captions)
    return {"name": name, "seed": seed, "train_s": train_s,
            "metrics": {k: v for k, v in m.items() if isinstance(v, float)}}


def fmt(vals: list[float]) -> str:
    return f"{np.mean(vals):.1f} ± {np.std(vals):.1f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--collection", default="emoji", choices=["emoji", "tabler"])
    p.add_argument("--minutes", type=float, default=2.0)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--results", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    args.results.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    runs: dict[str, list[dict]] = {n: [] for n in ARMS}
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(run_one, n, args.collection, s, args.minutes) for s in args.seeds for n in ARMS]
        for f in futures:
            r = f.result()
            runs[r["name"]].append(r)
            m = r["metrics"]
            print(f"{r['name']:14s} seed {r['seed']}: exact rsum {m['sem@exact_rsum']:.1f}, "
                  + ", ".join(f"sem@{t:g} rsum {m[f'sem@{t:g}_rsum']:.1f}" for t in THRESHOLDS), flush=True)
    wall = time.perf_counter() - t0
    levels = ["exact", *[f"{t:g}" for t in THRESHOLDS]]
    head = " | ".join(f"rsum {lv}" for lv in levels) + " | " + " | ".join(
        f"mAP@R {lv} (i2t / t2i)" for lv in levels)
    lines = [f"{args.collection}, {args.minutes:g} min per run (one thread), seeds {args.seeds}, best validation "
             "checkpoint, test split; 'exact' = the standard protocol, t = LSA-cosine threshold of a plausible "
             "match; mean ± std.", "", f"| loss | {head} |", "|---|" + "---|" * (2 * len(levels))]
    for name, rs in runs.items():
        cells = [fmt([r["metrics"][f"sem@{lv}_rsum"] for r in rs]) for lv in levels]
        cells += [f"{fmt([r['metrics'][f'sem@{lv}_i2t_map_at_r'] for r in rs])} / "
                  f"{fmt([r['metrics'][f'sem@{lv}_t2i_map_at_r'] for r in rs])}" for lv in levels]
        lines.append(f"| {NAMES[name]} | " + " | ".join(cells) + " |")
    import torch

    lines += ["", f"Wall time {wall / 60:.1f} min, {args.jobs} jobs of one thread. Machine: {os.cpu_count()}-core "
              f"CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}, Python "
              f"{sys.version.split()[0]}."]
    table = "\n".join(lines)
    print(table)
    (args.results / f"semantic_losses_{args.collection}.md").write_text(table + "\n")
    (args.results / f"semantic_losses_{args.collection}.json").write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
