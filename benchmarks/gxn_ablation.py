"""GXN (Look, Imagine and Match) ablation: which of its paths helps retrieval, on the demo set and on real data.

Four arms of the one shipped recipe, ``gxn_demo`` (two-level order embeddings; 1 epoch of embedding, then 3 of
caption cross-entropy with the GAN, 1 of self-critical caption training with the GAN at a tenth of the
encoders' rate), differing only in the weights of the generative terms in the last two stages -- so every arm
has the same epochs, stage restarts and learning rates:

  embeddings   the per-level ranking term alone            (caption weight 0, GAN weight 0)
  caption      + the image-to-text path (XE, then SCST)     (GAN weight 0)
  gan          + the text-to-image GAN                      (caption weight 0)
  full         both, as shipped

Collections: ``demo`` (the embedded synthetic scenes, 64 px) and ``emoji`` (real: the npm emoji collection of
``real_data.py``, 64 px PNGs with human-written names and keywords; licences there), the images trained from
raw pixels by the small CNN (no pretrained weights; on emoji each image whole, without random crops, as
``scratch_small`` does). Reported per run: test rsum of the best-validation
checkpoint (the retrieval protocol), the validation rsum per epoch, and for the arms with a decoder, greedy
BLEU-4 / CIDEr-D of ``last.pt`` on the test images. ``grid`` writes a sample grid of a GAN arm's ``last.pt``.

``--recipe gxn_scratch_small`` runs the same four arms of that recipe instead (tuned for small real images: 12
epochs, 512-d levels, a bi-GRU, the per-level max of hinges after a warm-up; its rows carry ``recipe``).

    python benchmarks/gxn_ablation.py run --datasets demo emoji --seeds 0 1 2   # results appended
    python benchmarks/gxn_ablation.py run --datasets emoji --recipe gxn_scratch_small
    python benchmarks/gxn_ablation.py report
"""

from __future__ import annotations

import itertools
import json
import os
import resource
import statistics
import time
from pathlib import Path

from _jobs import HERE, RESULTS, ROOT, job_commands, mean_sd, print_result, read_results, run_jobs

OUT = RESULTS / "gxn_ablation.jsonl"
GENERATIVE_STAGES = (1, 2)  # imagine_xe, imagine_scst

ARMS: dict[str, dict[str, float]] = {  # the generative terms' weights in the generative stages
    "embeddings": {"caption": 0.0, "gan": 0.0},
    "caption": {"caption": 1.0, "gan": 0.0},
    "gan": {"caption": 0.0, "gan": 1.0},
    "full": {"caption": 1.0, "gan": 1.0},
}
GRID_TEXTS = {
    "demo": ["a large red circle", "a small blue square in the top left corner", "two green stars",
             "a white cross and a yellow triangle", "three purple shapes"],
    "emoji": ["red apple", "smiling face with heart eyes", "blue heart", "dog face", "sun"],
}


RECIPES = ("gxn_demo", "gxn_scratch_small")


def recipe_of(row: dict) -> str:
    return row.get("recipe", "gxn_demo")  # the first rows were all gxn_demo's


def data_overrides(dataset: str, recipe: str) -> list[str]:
    if dataset == "demo":
        return [] if recipe == "gxn_demo" else ["data.format=demo"]
    from real_data import prepare

    info = prepare(dataset)
    out = [f"data={{format: karpathy, path: {info['path']}, image_root: {info['image_root']}, "
           "val_max_images: 1000}"]
    if recipe == "gxn_demo":
        # whole images, no random crops: what the real-data benchmark found for small images named by their
        # captions (scratch_small's choice; gxn_scratch_small has it)
        out += ["transform.resize_policy=square", "transform.augment={crop: center, hflip: true, color_jitter: 0.0}"]
    return out


def arm_overrides(arm: str) -> list[str]:
    out = []
    for stage in GENERATIVE_STAGES:
        for term, weight in ARMS[arm].items():
            out.append(f"train.stages[{stage}].objective.terms.{term}.weight={weight}")
        if not ARMS[arm]["gan"]:  # the generator's learning-rate multiplier has no parameters to name then
            out.append(f"train.stages[{stage}].optim.lr_mult={{}}")
    return out


def one_run(dataset: str, recipe: str, arm: str, seed: int, out_dir: str) -> dict:
    import torch

    from vsekit.captioning import Captioner
    from vsekit.config import resolve_config
    from vsekit.data.sources import load_split
    from vsekit.inference import Embedder
    from vsekit.train.trainer import Trainer

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    overrides = [*data_overrides(dataset, recipe), *arm_overrides(arm), f"seed={seed}", "train.progress=false",
                 f"output_dir={out_dir}"]
    cfg = resolve_config(ROOT / "vsekit" / "configs" / f"{recipe}.yaml", overrides)
    t0 = time.perf_counter()
    Trainer(cfg).fit()
    train_s = time.perf_counter() - t0
    test_corpus = load_split(cfg.data, "test")
    best = Embedder.from_checkpoint(Path(out_dir) / "best.pt")
    test = best.evaluate(test_corpus)
    last_test = Embedder.from_checkpoint(Path(out_dir) / "last.pt").evaluate(test_corpus)
    records = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    vals = [r["rsum"] for r in records if r["kind"] == "val"]
    result = {"dataset": dataset, "recipe": recipe, "arm": arm, "seed": seed, "test_rsum": test["rsum"], "test": test,
              "last_test_rsum": last_test["rsum"], "val_rsum": vals, "best_epoch": vals.index(max(vals)) + 1,
              "train_s": train_s, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "collapse_events": sum(r["kind"] == "collapse" for r in records)}
    last = [r for r in records if r["kind"] == "train" and r["epoch"] == records[-1]["epoch"]]
    term_keys = sorted({k for r in last for k in r if k.startswith("term_")})
    result["terms_last_epoch"] = {k: statistics.mean(r[k] for r in last if k in r) for k in term_keys}
    if ARMS[arm]["caption"]:
        cap = Captioner.from_checkpoint(Path(out_dir) / "last.pt")
        scores = cap.evaluate(test_corpus)
        captions = cap.caption_corpus(test_corpus)
        result["caption_test"] = {**scores, "distinct_captions": len(set(captions)),
                                  "examples": captions[:5]}
    if ARMS[arm]["gan"] and seed == 0:
        from vsekit.imagine import Imaginer, image_grid

        im = Imaginer.from_checkpoint(Path(out_dir) / "last.pt")
        tag = "" if recipe == "gxn_demo" else f"_{recipe}"
        grid = RESULTS / f"gxn_ablation_{dataset}{tag}_{arm}_grid.png"
        image_grid(im.generate(GRID_TEXTS[dataset], n=8, seed=0)).save(grid)
        result["grid"] = str(grid.relative_to(HERE))
    return result


def cmd_one(args) -> None:
    print_result(one_run, args.dataset, args.recipe, args.arm, args.seed)


def _summary(r: dict) -> str:
    cap = r.get("caption_test")
    return (f"{r['dataset']:6s} {recipe_of(r)} {r['arm']:10s} seed {r['seed']}: test rsum {r['test_rsum']:.1f} (best epoch "
            f"{r['best_epoch']}), val {[round(v, 1) for v in r['val_rsum']]}"
            + (f", BLEU-4 {cap['bleu4']:.3f} CIDEr-D {cap['cider_d']:.3f}" if cap else "") + f", {r['train_s']:.0f} s")


def cmd_run(args) -> None:
    done = {(r["dataset"], recipe_of(r), r["arm"], r["seed"]) for r in read_results(OUT)}
    jobs = [(d, args.recipe, a, s) for s in args.seeds for d in args.datasets for a in args.arms
            if (d, args.recipe, a, s) not in done]
    run_jobs(__file__, jobs, OUT, threads=args.threads, parallel=args.jobs, summary=_summary, cwd=ROOT)


def cmd_report(args) -> None:
    rows = read_results(OUT)
    print("| collection | recipe | arm | seeds | test rsum (mean ± sd) | per seed | best val rsum | test BLEU-1 | test BLEU-4 | "
          "test CIDEr-D | distinct test captions | min / run |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for dataset, recipe, arm in itertools.product(("demo", "emoji"), RECIPES, ARMS):
        rs = sorted((r for r in rows if r["dataset"] == dataset and recipe_of(r) == recipe and r["arm"] == arm),
                    key=lambda r: r["seed"])
        if not rs:
            continue
        caps = [r["caption_test"] for r in rs if "caption_test" in r]
        cap_cols = (f"{statistics.mean(c['bleu1'] for c in caps):.3f} | "
                    f"{statistics.mean(c['bleu4'] for c in caps):.3f} | "
                    f"{statistics.mean(c['cider_d'] for c in caps):.3f} | "
                    f"{statistics.mean(c['distinct_captions'] for c in caps):.0f}") if caps else " | | | "
        print(f"| {dataset} | {recipe} | {arm} | {len(rs)} | {mean_sd([r['test_rsum'] for r in rs])} | "
              f"{', '.join(format(r['test_rsum'], '.1f') for r in rs)} | "
              f"{mean_sd([max(r['val_rsum']) for r in rs])} | {cap_cols} | "
              f"{statistics.mean(r['train_s'] for r in rs) / 60:.1f} |")


def main() -> None:
    p, _, r = job_commands(__doc__, run=cmd_run, one=cmd_one, report=cmd_report,
                           one_args=[("dataset", {"choices": ["demo", "emoji"]}), ("recipe", {"choices": RECIPES}),
                                     ("arm", {"choices": list(ARMS)}), ("seed", {"type": int})])
    r.add_argument("--datasets", nargs="+", default=["demo", "emoji"], choices=["demo", "emoji"])
    r.add_argument("--recipe", default="gxn_demo", choices=RECIPES)
    r.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    args = p.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
