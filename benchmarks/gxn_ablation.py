"""GXN (Look, Imagine and Match) ablation: which of its paths helps retrieval, on the demo set and on real data.

Four arms of the one shipped recipe, ``gxn_demo`` (two-level order embeddings; 1 epoch of embedding, then 6 of
caption cross-entropy with the GAN, 2 of self-critical caption training with the GAN at a tenth of the
encoders' rate; 1, 3 and 1 before issue 25's second round), differing only in the weights of the generative terms in the last two stages -- so every arm
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
Whether the generative paths depend on their input (issue 25, :func:`dependence`; also ``measure RUN_FOLDER``
for a run trained elsewhere): the share of distinct greedy test captions, the CIDEr-D of a nearest-neighbour
captioning baseline (each test image gets the first caption of its nearest training image under the same
model's embedding), caption -> image R@1/5/10 with each generated caption as the query, the R-precision of
generated images (the generating caption ranked first among it and 99 random ones; chance 1 %), on the demo set
whether those images show the colour and shape of the image's main object (``appearance``: against the same
measure on the real test images, its ceiling, and chance) and the discriminator's accuracies per epoch.

``--recipe gxn_scratch_small`` runs the same four arms of that recipe instead (tuned for small real images: 12
epochs, 512-d levels, a bi-GRU, the per-level max of hinges after a warm-up; its rows carry ``recipe``).

On pretrained features (issue 22): ``emoji_224`` and ``tabler_224`` (the collections rendered at 224 px from their
vector sources) with ``--recipe gxn_pretrained``: ``gxn_scratch_small`` with the small CNN replaced by the frozen
ImageNet EfficientNet-Lite0 (timm ``tf_efficientnet_lite0``, the converted weights of
``efficientnet_lite_check.py``) under the two heads. GXN's GAN draws *pixels* (64 x 64) and its
matching-aware discriminator compares them with the batch's real images (the term refuses precomputed
features), so these runs read the raw images, not the ``_pooled`` features: each image resized whole to
``--image-size`` px (default 96, a small size for the CPU: the frozen network's forward runs every step; at
224 its pooled output is the ``_pooled`` features up to their float16 rounding: no flips, no crops), and the
real images given to the discriminator are the same input brought to 64 px. All four arms read the same input. The stages are
``--stages`` epochs of look/match, caption XE (decayed x0.1 after two thirds of it) and SCST (default 2 3 1: a
frozen pretrained encoder leaves only the heads to train), the per-level max of hinges after
``max(1, look_match // 2)`` epochs of the sum. The captions are all of the JSON's (emoji: 2-4 per image; the
precomputed folders keep 2), so the test rsum compares the arms with each other, not with precomp runs.

    python benchmarks/gxn_ablation.py run --datasets demo emoji --seeds 0 1 2   # results appended
    python benchmarks/gxn_ablation.py run --datasets emoji --recipe gxn_scratch_small
    python benchmarks/gxn_ablation.py run --datasets emoji_224 tabler_224 --recipe gxn_pretrained --image-size 96
    python benchmarks/gxn_ablation.py measure runs/gxn_demo                     # one trained run's measures
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
    "tabler": ["arrow left", "shopping cart", "calendar", "user", "home"],
}
DATASETS = ("demo", "emoji", "emoji_224", "tabler_224")
PRETRAINED = ("emoji_224", "tabler_224")  # rendered at 224 px from the vector sources (real_data.render_collection)
RECIPES = ("gxn_demo", "gxn_scratch_small", "gxn_pretrained")
RECIPE_FILE = {"gxn_pretrained": "gxn_scratch_small"}  # gxn_pretrained = that file + pretrained_overrides()


def recipe_of(row: dict) -> str:
    return row.get("recipe", "gxn_demo")  # the first rows were all gxn_demo's


def pretrained_overrides(image_size: int, stages: tuple[int, int, int]) -> list[str]:
    """gxn_scratch_small with the frozen pretrained EfficientNet-Lite0 under the two heads, whole images at
    ``image_size`` px without flips, and ``stages`` epochs (look/match, caption XE, SCST)."""
    from efficientnet_lite_check import fetch_weights

    look, xe, scst = stages
    return ["model.image_encoder={name: two_level, encoder: {name: timm, model: tf_efficientnet_lite0, "
            f"weights: {fetch_weights()}, finetune: false}}}}",
            f"transform.image_size={image_size}", f"transform.resize={image_size}",
            "transform.resize_policy=square", "transform.augment={crop: center, hflip: false, color_jitter: 0.0}",
            f"objective.terms.level_ranking.loss.warmup_epochs={max(1, look // 2)}",
            f"train.epochs={look + xe + scst}", f"train.stages[0].epochs={look}", f"train.stages[1].epochs={xe}",
            f"train.stages[1].optim.lr_decay_every={max(1, 2 * xe // 3)}", f"train.stages[2].epochs={scst}"]


def data_overrides(dataset: str, recipe: str) -> list[str]:
    if dataset == "demo":
        return [] if recipe == "gxn_demo" else ["data.format=demo"]
    if dataset in PRETRAINED:
        from real_data import render_collection

        info = render_collection(dataset.split("_")[0], int(dataset.split("_")[1]))
        return [f"data={{format: karpathy, path: {info['path']}, image_root: {info['image_root']}, "
                "val_max_images: 1000}"]
    from real_data import prepare

    info = prepare(dataset)
    out = [f"data={{format: karpathy, path: {info['path']}, image_root: {info['image_root']}, "
           "val_max_images: 1000}"]
    if recipe == "gxn_demo":
        # whole images, no random crops: what the real-data benchmark found for small images named by their
        # captions (scratch_small's choice; gxn_scratch_small has it)
        out += ["transform.resize_policy=square", "transform.augment={crop: center, hflip: true, color_jitter: 0.0}"]
    return out


def arm_overrides(arm: str, stages: list) -> list[str]:
    """The arm's term weights in the generative stages of the recipe's ``stages``; each stage keeps its
    learning-rate multipliers except those of a term switched off (its parameters take no step then, and a
    multiplier naming them is refused), so e.g. the caption arm's decoder runs at the rate the full arm's does."""
    from vsekit.utils.freeze import matches

    out = []
    for stage in GENERATIVE_STAGES:
        for term, weight in ARMS[arm].items():
            out.append(f"train.stages[{stage}].objective.terms.{term}.weight={weight}")
        mult = stages[stage].optim.get("lr_mult") or {}
        off = [f"objective.{t}" for t, w in ARMS[arm].items() if not w]
        kept = {k: v for k, v in mult.items() if not matches(k, off)}
        if kept != mult:
            out.append(f"train.stages[{stage}].optim.lr_mult={json.dumps(kept)}")
    return out


def one_run(dataset: str, recipe: str, arm: str, seed: int, image_size: int, stages: str, extra: list[str],
            out_dir: str) -> dict:
    import torch

    from vsekit.config import resolve_config
    from vsekit.data.sources import load_split
    from vsekit.inference import Embedder
    from vsekit.train.trainer import Trainer

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    pretrained = recipe == "gxn_pretrained"
    if pretrained != (dataset in PRETRAINED):
        raise SystemExit(f"recipe gxn_pretrained goes with the datasets {', '.join(PRETRAINED)} and only with them, "
                         f"not {dataset} with {recipe}")
    epochs = tuple(int(e) for e in stages.split(","))
    recipe_file = ROOT / "vsekit" / "configs" / f"{RECIPE_FILE.get(recipe, recipe)}.yaml"
    base = [*data_overrides(dataset, recipe), *(pretrained_overrides(image_size, epochs) if pretrained else [])]
    overrides = [*base, *arm_overrides(arm, resolve_config(recipe_file, base).train.stages), f"seed={seed}",
                 "train.progress=false", f"output_dir={out_dir}", *extra]
    cfg = resolve_config(recipe_file, overrides)
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
    if pretrained:
        result.update(image_size=image_size, stages=list(epochs), extra_overrides=extra)
    last = [r for r in records if r["kind"] == "train" and r["epoch"] == records[-1]["epoch"]]
    term_keys = sorted({k for r in last for k in r if k.startswith("term_")})
    result["terms_last_epoch"] = {k: statistics.mean(r[k] for r in last if k in r) for k in term_keys}
    result.update(dependence(Path(out_dir), caption=bool(ARMS[arm]["caption"]), gan=bool(ARMS[arm]["gan"])))
    if ARMS[arm]["gan"] and seed == 0:
        from vsekit.imagine import Imaginer, image_grid

        im = Imaginer.from_checkpoint(Path(out_dir) / "last.pt")
        tag = "" if recipe == "gxn_demo" else f"_{recipe}"
        grid = RESULTS / f"gxn_ablation_{dataset}{tag}_{arm}_grid.png"
        image_grid(im.generate(GRID_TEXTS[dataset.split("_")[0]], n=8, seed=0)).save(grid)
        result["grid"] = str(grid.relative_to(HERE))
    return result


def dependence(run: Path, caption: bool, gan: bool) -> dict:
    """Do the generative paths of ``run/last.pt`` depend on their input (issue 25)? On the test images: the
    caption scores, the share of distinct greedy captions, the nearest-neighbour captioning baseline's scores
    and caption -> image R@1/5/10 of the generated captions (``caption_test``); the GAN's R-precision
    (``gan_test``); the discriminator's accuracies per epoch, from the validation lines (``d_acc_per_epoch``)."""
    from vsekit.checkpoint import load_checkpoint
    from vsekit.config import validate_config
    from vsekit.data.sources import load_split

    data = validate_config(load_checkpoint(run / "last.pt")["config"]).data
    test, train = load_split(data, "test"), load_split(data, data.train_split)
    out: dict = {}
    if caption:
        from vsekit.captioning import Captioner

        dep = Captioner.from_checkpoint(run / "last.pt").dependence(test, train)
        out["caption_test"] = {**dep.pop("decoder"), **dep,
                               "distinct_captions": round(dep["distinct"] * dep["num_images"])}
    if gan:
        from vsekit.imagine import Imaginer

        im = Imaginer.from_checkpoint(run / "last.pt")
        out["gan_test"] = im.r_precision(test)
        if data.format == "demo":
            out["gan_test"]["appearance"] = appearance(im, data, test, train)
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        out["d_acc_per_epoch"] = [{"epoch": r["epoch"], **{k[len("train_term_"):]: round(r[k], 3) for k in r
                                                           if k.startswith("train_term_d_")}}
                                  for r in records if r["kind"] == "val" and "train_term_d_real_acc" in r]
    return out


def appearance(im, data, test, train) -> dict:
    """Demo set only: do the images generated from the test captions (the first of each image, R-precision's)
    show the colour and shape of the image's main object (``vsekit.eval.appearance``)? Agreement on the generated
    images, the same measure on the real test images (the ceiling: the colour rule and the shape classifier,
    fitted on the real training images, are not exact) and chance."""
    import numpy as np
    from PIL import Image

    from vsekit.data.demo import build_demo
    from vsekit.eval.appearance import ShapeClassifier, agreement, as_pixels, dominant_colour, main_objects

    json_path = build_demo(data.root, num_images=data.num_images, seed=data.seed, image_size=data.render_size)
    real = {name: np.stack([np.asarray(Image.open(p).convert("RGB").resize((im.image_size,) * 2))
                            for p in c.image_paths]) for name, c in (("train", train), ("test", test))}
    truth = {name: main_objects(json_path, c.image_paths) for name, c in (("train", train), ("test", test))}
    gen = im.first_caption_images(test)
    rows = np.unique(test.caption_to_image)
    targets = [truth["test"][r] for r in rows]
    shapes = ShapeClassifier().fit(real["train"], [s for _, s in truth["train"]])
    out = {}
    for what, i, predict in (("colour", 0, lambda x: [dominant_colour(p) for p in as_pixels(x)]),
                             ("shape", 1, shapes.predict)):
        g = agreement(predict(gen), [t[i] for t in targets])
        ceiling = agreement(predict(real["test"][rows]), [t[i] for t in targets])["agreement"]
        out[what] = {"generated": round(g["agreement"], 4), "real_ceiling": round(ceiling, 4),
                     "chance": round(g["chance"], 4)}
    return out


def cmd_measure(args) -> None:
    print(json.dumps(dependence(Path(args.run), caption=not args.no_caption, gan=not args.no_gan), indent=1))


def cmd_one(args) -> None:
    print_result(one_run, args.dataset, args.recipe, args.arm, args.seed, args.image_size, args.stages, args.override)


def run_key(r: dict) -> tuple:
    """What makes runs the same configuration (the pretrained recipe's image size and stages included)."""
    return (r["dataset"], recipe_of(r), r["arm"], r["seed"], r.get("image_size"), tuple(r.get("stages") or ()),
            tuple(r.get("extra_overrides") or ()))


def _summary(r: dict) -> str:
    cap = r.get("caption_test")
    return (f"{r['dataset']:6s} {recipe_of(r)} {r['arm']:10s} seed {r['seed']}: test rsum {r['test_rsum']:.1f} (best epoch "
            f"{r['best_epoch']}), val {[round(v, 1) for v in r['val_rsum']]}"
            + (f", BLEU-4 {cap['bleu4']:.3f} CIDEr-D {cap['cider_d']:.3f}" if cap else "") + f", {r['train_s']:.0f} s")


def cmd_run(args) -> None:
    done = {run_key(r) for r in read_results(args.results)}
    pretrained = args.recipe == "gxn_pretrained"
    if any((d in PRETRAINED) != pretrained for d in args.datasets):
        raise SystemExit(f"--recipe gxn_pretrained goes with --datasets {' '.join(PRETRAINED)}, and only with them")
    size, stages = (args.image_size, tuple(args.stages)) if pretrained else (None, ())
    if args.override and not pretrained:
        raise SystemExit("--override is for --recipe gxn_pretrained (its rows record them)")
    extra = [x for o in args.override for x in ("--override", o)]
    jobs = [(d, args.recipe, a, s, args.image_size, ",".join(map(str, args.stages)), *extra)
            for s in args.seeds for d in args.datasets for a in args.arms
            if run_key({"dataset": d, "recipe": args.recipe, "arm": a, "seed": s, "image_size": size,
                        "stages": stages, "extra_overrides": args.override}) not in done]
    run_jobs(__file__, jobs, args.results, threads=args.threads, parallel=args.jobs, summary=_summary, cwd=ROOT)


def _setting(r: dict) -> str:
    if not r.get("image_size"):
        return ""
    return " ".join([f"{r['image_size']} px, stages {'+'.join(map(str, r['stages']))}", *r.get("extra_overrides", [])])


def _dependence_cols(rs: list[dict]) -> str:
    """NN-baseline CIDEr-D, caption -> image R@1, R-precision (%), colour and shape agreement of the generated
    images (%, chance in brackets) and D's accuracy on generated images in the last epoch: means, where the rows
    have them (issue 25)."""
    def col(values: list[float], fmt: str) -> str:
        return format(statistics.mean(values), fmt) if values else ""

    caps = [r["caption_test"] for r in rs if "nearest_neighbour" in r.get("caption_test", {})]
    gans = [r["gan_test"] for r in rs if "gan_test" in r]
    looks = [g["appearance"] for g in gans if "appearance" in g]
    agree = [f"{col([a[k]['generated'] * 100 for a in looks], '.0f')} ({col([a[k]['chance'] * 100 for a in looks], '.0f')})"
             if looks else "" for k in ("colour", "shape")]
    d_fake = [r["d_acc_per_epoch"][-1]["d_fake_acc"] for r in rs if r.get("d_acc_per_epoch")]
    return " | ".join([col([c["nearest_neighbour"]["cider_d"] for c in caps], ".3f"),
                       col([c["retrieval"]["r1"] for c in caps], ".1f"),
                       col([g["r_precision"] * 100 for g in gans], ".1f"), *agree, col(d_fake, ".2f")])


def cmd_report(args) -> None:
    rows = read_results(args.results)
    configs = list(dict.fromkeys((r["dataset"], recipe_of(r), _setting(r)) for r in rows))
    configs.sort(key=lambda c: (DATASETS.index(c[0]), RECIPES.index(c[1])))
    print("| collection | recipe | setting | arm | seeds | test rsum (mean ± sd) | per seed | best val rsum | test BLEU-1 | "
          "test BLEU-4 | test CIDEr-D | distinct test captions | NN-baseline CIDEr-D | generated caption -> image R@1 | "
          "R-precision | colour agreement (chance) | shape agreement (chance) | D accuracy on generated, last epoch | "
          "min / run |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    paired = []
    for (dataset, recipe, setting), arm in itertools.product(configs, ARMS):
        rs = sorted((r for r in rows if (r["dataset"], recipe_of(r), _setting(r)) == (dataset, recipe, setting)
                     and r["arm"] == arm), key=lambda r: r["seed"])
        if not rs:
            continue
        caps = [r["caption_test"] for r in rs if "caption_test" in r]
        cap_cols = (f"{statistics.mean(c['bleu1'] for c in caps):.3f} | "
                    f"{statistics.mean(c['bleu4'] for c in caps):.3f} | "
                    f"{statistics.mean(c['cider_d'] for c in caps):.3f} | "
                    f"{statistics.mean(c['distinct_captions'] for c in caps):.0f}") if caps else " | | | "
        print(f"| {dataset} | {recipe} | {setting} | {arm} | {len(rs)} | {mean_sd([r['test_rsum'] for r in rs])} | "
              f"{', '.join(format(r['test_rsum'], '.1f') for r in rs)} | "
              f"{mean_sd([max(r['val_rsum']) for r in rs])} | {cap_cols} | {_dependence_cols(rs)} | "
              f"{statistics.mean(r['train_s'] for r in rs) / 60:.1f} |")
        if arm != "embeddings":  # paired with the embeddings-only arm of the same seed (same init, same batches)
            base = {r["seed"]: r["test_rsum"] for r in rows if r["arm"] == "embeddings"
                    and (r["dataset"], recipe_of(r), _setting(r)) == (dataset, recipe, setting)}
            d = [(r["seed"], r["test_rsum"] - base[r["seed"]]) for r in rs if r["seed"] in base]
            if d:
                paired.append(f"| {dataset} | {recipe} | {setting} | {arm} − embeddings | "
                              f"{', '.join(f'{x:+.1f} (seed {s})' for s, x in d)} | "
                              f"{statistics.mean(x for _, x in d):+.1f} | {sum(x > 0 for _, x in d)} of {len(d)} |")
    if paired:
        print("\n| collection | recipe | setting | arms | test rsum difference per seed | mean | seeds ahead |")
        print("|---|---|---|---|---|---|---|")
        print("\n".join(paired))


def main() -> None:
    p, sub, r = job_commands(__doc__, run=cmd_run, one=cmd_one, report=cmd_report,
                           one_args=[("dataset", {"choices": DATASETS}), ("recipe", {"choices": RECIPES}),
                                     ("arm", {"choices": list(ARMS)}), ("seed", {"type": int}),
                                     ("image_size", {"type": int}), ("stages", {"help": "e.g. 2,3,1"}),
                                     ("--override", {"action": "append", "default": [],
                                                     "help": "an extra config override (smoke tests)"})])
    m = sub.add_parser("measure", help="the dependence measures of a trained run folder (issue 25)")
    m.add_argument("run")
    m.add_argument("--no-caption", action="store_true")
    m.add_argument("--no-gan", action="store_true")
    m.set_defaults(fn=cmd_measure)
    for name in ("run", "report"):
        sub.choices[name].add_argument("--results", type=Path, default=OUT, help="the results file (JSON lines)")
    r.add_argument("--datasets", nargs="+", default=["demo", "emoji"], choices=DATASETS)
    r.add_argument("--recipe", default="gxn_demo", choices=RECIPES)
    r.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    r.add_argument("--image-size", type=int, default=96, help="gxn_pretrained: the frozen encoder's input size")
    r.add_argument("--stages", type=int, nargs=3, default=[2, 3, 1], metavar=("LOOK", "XE", "SCST"),
                   help="gxn_pretrained: epochs of each stage")
    r.add_argument("--override", action="append", default=[],
                   help="gxn_pretrained: an extra config override for every run, recorded in its row "
                        "(e.g. data.sample=image: one caption per image per epoch)")
    args = p.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
